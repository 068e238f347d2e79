"""Every shipped workflow opens (known nodes, consistent links, clean layout) and runs end to end in ComfyUI."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostenv import require_comfyui
from peers import require_peer

require_comfyui()
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from synthetic_photos import synthetic_subject  # noqa: E402

from build_workflows import drawn_box  # noqa: E402

from subject_personalization.tools.comfy_headless import small_and_quick  # noqa: E402

PACK_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
FAST_SIZE = 64   # image side used when executing, so a full-size SD1.5 UNet samples quickly on a CPU
FAST_STEPS = 2
# Where to keep the attention-map previews the workflows produce (unset: not kept).
ARTIFACTS = Path(os.environ["SUBJECT_TEST_ARTIFACTS"]) if os.environ.get("SUBJECT_TEST_ARTIFACTS") else None
# The session fixture that puts in place each model file a workflow names (seeded random weights, real layouts).
MODEL_FILE_FIXTURES = {
    "pytorch_model.bin": "fastcomposer_file",
    "v1-5-pruned-emaonly.safetensors": "sd15_checkpoint_file",
    "CLIP-ViT-L-14.safetensors": "clip_vision_file",
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "clip_vision_h_file",
    "ip-adapter-plus_sd15.safetensors": "ipadapter_plus_file",
    "ip-adapter-plus-face_sd15.safetensors": "ipadapter_plus_face_file",
    "sd_xl_base_1.0.safetensors": "official_sdxl_files",
    "nested_attention_official_sdxl.safetensors": "official_sdxl_files",
}
# Run by test_official_sdxl_workflow.py instead, in a server in bf16: SDXL in float32 does not fit beside this session.
SDXL_WORKFLOWS = {"nested_official_sdxl.json"}
MODEL_LOADERS = {"SubjectPersonalization_FastComposerLoader", "CheckpointLoaderSimple", "CLIPVisionLoader", "SubjectPersonalization_NestedAttentionIPAdapterLoader",
                 "SubjectPersonalization_NestedAttentionOfficialLoader", "IPAdapterModelLoader"}


def load(path, comfy=None):
    """The workflow; with comfy, first skip (a failure in CI) where a pack it uses beside this one is not loaded."""
    workflow = json.loads(path.read_text())
    if comfy is not None:
        require_peer(comfy.nodes.NODE_CLASS_MAPPINGS, *{node["type"] for node in workflow["nodes"]})
    return workflow


def test_there_are_workflows():
    names = {path.name for path in WORKFLOWS}
    assert {"fastcomposer_single_subject.json", "fastcomposer_two_subjects.json", "nested_ipadapter_single_subject.json",
            "nested_ipadapter_person_and_cat.json", "nested_official_sdxl.json", "two_subjects_with_masks.json",
            "nested_with_ipadapter.json"} <= names


def test_the_workflows_are_what_tools_build_workflows_writes(tmp_path):
    """Hand edits never drift from the builder (and its layout checks)."""
    (tmp_path / "workflows").mkdir()
    subprocess.run([sys.executable, str(PACK_ROOT / "tools" / "build_workflows.py")], cwd=tmp_path, check=True)
    assert sorted(path.name for path in (tmp_path / "workflows").iterdir()) == [path.name for path in WORKFLOWS]
    for path in WORKFLOWS:
        assert (tmp_path / "workflows" / path.name).read_text() == path.read_text(), f"{path.name}: run tools/build_workflows.py"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_names_only_shipped_photos_and_public_model_files(path, comfy):
    """Its photos ship with the pack and were copied into the top level of ComfyUI's input folder at start-up, where
    Load Image lists them; every model file it names is one a user can download (the names the tests' random stand-ins
    take), and its loader says where from and into which folder (properties.models, as ComfyUI's own templates do)."""
    workflow = load(path, comfy)
    prompt = comfy.workflow_to_prompt(workflow)
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            name = node["inputs"]["image"]
            assert name.startswith("subject-personalization-") and (PACK_ROOT / "photos" / name).is_file(), name
            assert (comfy.input_dir / name).read_bytes() == (PACK_ROOT / "photos" / name).read_bytes()
            assert name in comfy.nodes.NODE_CLASS_MAPPINGS["LoadImage"].INPUT_TYPES()["required"]["image"][0]
    for node in workflow["nodes"]:
        if node["type"] in MODEL_LOADERS:
            named = [value for value in node["widgets_values"] if isinstance(value, str) and "." in value]
            assert named and all(name in MODEL_FILE_FIXTURES for name in named), node
            models = {model["name"]: model for model in node["properties"].get("models", [])}
            assert sorted(models) == sorted(named), f"{path.name}: {node['type']} gives no download for {named}"
            for model in models.values():
                assert model["url"].startswith("https://") and model["url"].rstrip("/").split("/")[-1], model
                # the folder the loader lists the file from: ComfyUI's, or one the pack registers
                assert model["directory"] in comfy.folder_paths.folder_names_and_paths, model


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_opens_in_the_graph_editor_format(path, comfy):
    workflow = load(path, comfy)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in comfy.nodes.NODE_CLASS_MAPPINGS, f"{path.name}: missing node type {node['type']}"
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[source]["outputs"][source_slot]["type"] == kind
    boxes = [drawn_box(node) for node in nodes.values()]  # the browser tier checks them as the editor draws them
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{path.name}: overlapping nodes"
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= len(workflow["links"])


@pytest.mark.compat
@pytest.mark.parametrize("path", [path for path in WORKFLOWS if path.name not in SDXL_WORKFLOWS],
                         ids=lambda path: path.name)
def test_workflow_runs_deterministically_and_follows_the_subject(path, comfy, compat_run, request):
    prompt = small_and_quick(comfy.workflow_to_prompt(load(path, comfy)), FAST_SIZE, FAST_STEPS)
    for node in prompt.values():
        for value in node["inputs"].values():
            if isinstance(value, str) and value in MODEL_FILE_FIXTURES:
                request.getfixturevalue(MODEL_FILE_FIXTURES[value])
    image_nodes = [node for node in prompt.values() if node["class_type"] == "LoadImage"]
    assert image_nodes, f"{path.name} has no subject image"
    sampler = next(node for node in prompt.values() if "seed" in node["inputs"])

    def run():
        outputs = comfy.execute(prompt)
        saved = comfy.output_images({id_: out for id_, out in outputs.items() if prompt[id_]["class_type"] == "SaveImage"})
        assert len(saved) == 1
        previews = comfy.output_images({id_: out for id_, out in outputs.items() if prompt[id_]["class_type"] == "PreviewImage"})
        for preview in previews:  # the attention-map heatmap: the image plus a legend below it, in colour
            heatmap = np.asarray(Image.open(preview))
            assert heatmap.shape[0] > FAST_SIZE and heatmap.shape[1:] == (FAST_SIZE, 3) and heatmap.std() > 0
            if ARTIFACTS:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shutil.copy(preview, ARTIFACTS / f"{path.stem}_attention_map.png")
        return np.asarray(Image.open(saved[0]))

    first = run()
    assert first.shape == (FAST_SIZE, FAST_SIZE, 3) and first.std() > 0
    if compat_run:
        return
    sampler["inputs"]["seed"] += 1
    other_seed = run()
    sampler["inputs"]["seed"] -= 1
    assert np.array_equal(run(), first), "same seed, same inputs: the image must be identical"
    assert not np.array_equal(other_seed, first)

    synthetic_subject(comfy.input_dir / "changed_subject.png", seed=99)
    image_nodes[0]["inputs"]["image"] = "changed_subject.png"
    assert not np.array_equal(run(), first), "a different subject image must change the result"


def test_the_example_photos_never_overwrite_a_file_in_the_input_folder(comfy):
    example_photos = comfy.pack_module("nodes.example_photos")
    photo = comfy.input_dir / "subject-personalization-chelsea.jpg"
    shipped = photo.read_bytes()
    try:
        photo.write_bytes(b"the user's own picture")
        (comfy.input_dir / "subject-personalization-camera.jpg").unlink()
        example_photos.install_example_photos()
        assert photo.read_bytes() == b"the user's own picture"
        assert (comfy.input_dir / "subject-personalization-camera.jpg").is_file()  # a missing one comes back
    finally:
        photo.write_bytes(shipped)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_a_workflow_saved_with_the_old_ids_upgrades_to_the_shipped_one(path, comfy, tmp_path):
    """tools/upgrade_workflow.py: a 0.1.0 workflow (ids without the pack's prefix, in both formats) becomes the one
    the pack ships, and every id it writes is a node ComfyUI registered."""
    from upgrade_workflow import NODE_ID_PREFIX, OLD_IDS
    assert {NODE_ID_PREFIX + name for name in OLD_IDS} <= set(comfy.nodes.NODE_CLASS_MAPPINGS)
    shipped = path.read_text()
    old = tmp_path / path.name
    old.write_text(shipped.replace(f'"{NODE_ID_PREFIX}', '"'))
    assert old.read_text() != shipped
    subprocess.run([sys.executable, str(PACK_ROOT / "tools" / "upgrade_workflow.py"), str(old)], check=True,
                   capture_output=True)
    assert json.loads(old.with_suffix(".upgraded.json").read_text()) == json.loads(shipped)

    prompt = comfy.workflow_to_prompt(load(path, comfy))
    old_prompt = tmp_path / "api.json"
    old_prompt.write_text(json.dumps(prompt).replace(f'"{NODE_ID_PREFIX}', '"'))
    subprocess.run([sys.executable, str(PACK_ROOT / "tools" / "upgrade_workflow.py"), str(old_prompt)], check=True,
                   capture_output=True)
    assert json.loads(old_prompt.with_suffix(".upgraded.json").read_text()) == prompt
