"""Prepare Face in ComfyUI's executor with the real insightface (CI: 2.1 against the newest ComfyUI, 0.7.3 against the
oldest, SUBJECT_TEST_INSIGHTFACE names the one expected) on stand-in model packs (tests/insightface_models.py): the
packs found where InstantID and PuLID users keep them, the face found where the detector put it, and the crop the one
insightface's own alignment makes. Without insightface or a pack, the node crops its face_box, or names what is
missing."""
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hostenv import require_comfyui

require_comfyui()
insightface = pytest.importorskip("insightface", reason="insightface is not installed (CI installs it)")
from insightface.utils import face_align  # noqa: E402
from build_workflows import FACE_BOXES, PHOTO_SIZE  # noqa: E402
from insightface_models import detector_scale, write_model_pack  # noqa: E402

PHOTO = "subject-personalization-astronaut.jpg"
FACE_BOX = np.array([130.0, 40.0, 215.0, 135.0])  # in the photo's pixels, where the stand-in detector reports the face
LANDMARKS = np.array([[150, 80], [195, 78], [172, 100], [155, 118], [190, 117]], float)
SIZE = 224


def prompt(model: str, face_box: bool = False) -> dict:
    nodes = {
        "1": {"class_type": "LoadImage", "inputs": {"image": PHOTO}},
        "2": {"class_type": "SubjectPersonalization_PrepareFace",
              "inputs": {"image": ["1", 0], "model": model, "face_index": -1, "size": SIZE}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "face"}},
    }
    if face_box:  # the shipped workflows' box for this photo
        left, top, right, bottom = FACE_BOXES[PHOTO]
        nodes["4"] = {"class_type": "SubjectPersonalization_SubjectRegionMask",
                      "inputs": {"width": PHOTO_SIZE, "height": PHOTO_SIZE, "left": left, "top": top, "right": right,
                                 "bottom": bottom}}
        nodes["2"]["inputs"]["face_box"] = ["4", 0]
    return nodes


def crop(comfy, nodes: dict) -> np.ndarray:
    outputs = comfy.execute(nodes)
    (saved,) = comfy.output_images({node: out for node, out in outputs.items() if nodes[node]["class_type"] == "SaveImage"})
    return np.asarray(Image.open(saved).convert("RGB"))


@pytest.fixture
def photo(comfy) -> np.ndarray:
    """The photo's pixels as ComfyUI's Load Image gives them (0.33.0 decodes with PyAV, not PIL), in uint8 RGB."""
    image = comfy.nodes.NODE_CLASS_MAPPINGS["LoadImage"]().load_image(PHOTO)[0]
    return (image[0].float().numpy() * 255).round().astype(np.uint8)


@pytest.fixture
def stand_in_pack(comfy, photo):
    """Writes a stand-in pack where asked (a folder under models/insightface, or elsewhere) and removes it after."""
    written = []

    def write(folder, name: str = "antelopev2"):
        scale = detector_scale(*photo.shape[:2])
        written.append(write_model_pack(folder, name, [(tuple(FACE_BOX * scale), LANDMARKS * scale)]))
        return written[-1]

    yield write
    for folder in written:  # a test may have moved or removed it already
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.compat
def test_the_insightface_under_test_is_the_one_ci_installed():
    expected = os.environ.get("SUBJECT_TEST_INSIGHTFACE")
    print(f"\ninsightface {insightface.__version__}")
    assert expected is None or insightface.__version__ == expected


@pytest.mark.compat
@pytest.mark.parametrize("name", ["antelopev2", "buffalo_l"])
def test_prepare_face_crops_the_face_insightface_found(comfy, photo, stand_in_pack, name, monkeypatch):
    """In InstantID's and PuLID's folder, models/insightface/models/<pack>/: insightface gets the photo as BGR uint8,
    and the node's crop is insightface's own alignment (face_align.norm_crop) of the landmarks its detector reported,
    up to rounding: so they came back in the photo's pixels."""
    from insightface.app import FaceAnalysis
    stand_in_pack(comfy.model_dir("insightface") / "models", name)
    given = []
    monkeypatch.setattr(FaceAnalysis, "get", lambda analysis, array, *args, get=FaceAnalysis.get, **kwargs:
                        given.append(array.copy()) or get(analysis, array, *args, **kwargs))
    ours = crop(comfy, prompt(name)).astype(np.int16)
    assert len(given) == 1 and np.array_equal(given[0], photo[..., ::-1])
    theirs = face_align.norm_crop(photo[..., ::-1].copy(), landmark=LANDMARKS.astype(np.float32), image_size=SIZE)
    assert ours.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - theirs[..., ::-1].astype(np.int16)).max() <= 2


@pytest.mark.compat
def test_model_packs_are_found_beside_the_models_folder_and_in_extra_model_paths(comfy, stand_in_pack, tmp_path):
    insightface_models = comfy.pack_module("nodes.insightface_models")
    direct = stand_in_pack(comfy.model_dir("insightface"))  # models/insightface/antelopev2/
    assert insightface_models.find_model_pack("antelopev2") == direct
    shutil.rmtree(direct)
    extra = tmp_path / "shared_models" / "insightface"
    comfy.folder_paths.add_model_folder_path("insightface", str(extra))  # what extra_model_paths.yaml adds
    try:
        pack = stand_in_pack(extra / "models")
        assert insightface_models.find_model_pack("antelopev2") == pack
    finally:
        comfy.folder_paths.folder_names_and_paths["insightface"][0].remove(str(extra))


@pytest.mark.compat
def test_without_a_model_pack_the_face_box_is_cropped_and_without_a_box_the_pack_is_named(comfy, photo):
    boxed = crop(comfy, prompt("antelopev2", face_box=True))
    # The glue: the box, square with a quarter of its size around it, the photo kept (the crop itself: core tier).
    prepare_with_mask = comfy.pack_module("encoders.subject_preparation").prepare_with_mask
    box = comfy.nodes.NODE_CLASS_MAPPINGS["SubjectPersonalization_SubjectRegionMask"]().mask(PHOTO_SIZE, PHOTO_SIZE, *FACE_BOXES[PHOTO])[0]
    expected = prepare_with_mask(torch.from_numpy(photo.copy()).float()[None] / 255, box, SIZE, 0.25, None)[0]
    assert np.abs(boxed.astype(int) - (expected[0].numpy() * 255).astype(int)).max() <= 1
    node = comfy.nodes.NODE_CLASS_MAPPINGS["SubjectPersonalization_PrepareFace"]()
    other = np.random.default_rng(0).random((1, 96, 80, 3), dtype=np.float32)
    (faces,) = node.prepare(torch.from_numpy(other), "antelopev2", -1, SIZE, face_box=box)  # a box read as fractions
    assert tuple(faces.shape) == (1, SIZE, SIZE, 3)
    insightface_models = comfy.pack_module("nodes.insightface_models")
    with pytest.raises(FileNotFoundError) as refusal:
        insightface_models.find_model_pack("antelopev2")
    message = str(refusal.value)
    for needed in ("insightface model pack 'antelopev2' not found", "scrfd_10g_bnkps.onnx", "glintr100.onnx",
                   f"{comfy.model_dir('insightface') / 'models' / 'antelopev2'}/ (where InstantID and PuLID keep it)",
                   "extra_model_paths.yaml", "pip install insightface onnxruntime", "0.7.3"):
        assert needed in message, needed
    image = comfy.nodes.NODE_CLASS_MAPPINGS["LoadImage"]().load_image(PHOTO)[0]
    with pytest.raises(FileNotFoundError, match="insightface model pack 'antelopev2' not found"):
        node.prepare(image, "antelopev2", -1, SIZE)


@pytest.mark.compat
def test_a_pack_one_folder_too_deep_is_explained(comfy, stand_in_pack):
    nested = stand_in_pack(comfy.model_dir("insightface") / "models" / "antelopev2")  # .../antelopev2/antelopev2/
    try:
        with pytest.raises(FileNotFoundError, match=r"holds a folder antelopev2/: move its files up one level"):
            comfy.pack_module("nodes.insightface_models").find_model_pack("antelopev2")
    finally:
        shutil.rmtree(nested.parent)


def test_without_insightface_the_node_says_how_to_install_it(comfy, stand_in_pack, monkeypatch):
    stand_in_pack(comfy.model_dir("insightface") / "models", "buffalo_l")
    monkeypatch.setitem(sys.modules, "insightface", None)  # as on a machine without it
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    comfy.pack_module("nodes.insightface_models")._cached_face_analysis.cache_clear()
    node = comfy.nodes.NODE_CLASS_MAPPINGS["SubjectPersonalization_PrepareFace"]()
    image = comfy.nodes.NODE_CLASS_MAPPINGS["LoadImage"]().load_image(PHOTO)[0]
    with pytest.raises(ImportError, match=r"pip install insightface onnxruntime .*0\.7\.3"):
        node.prepare(image, "buffalo_l", -1, SIZE)
