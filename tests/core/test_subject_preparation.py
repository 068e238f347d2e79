"""Subject preparation: boxes, crops and backgrounds on synthetic images with known regions;
face choice, similarity estimate and alignment on synthetic landmarks; insightface error paths."""
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from subject_personalization.encoders.subject_preparation import (
    ARCFACE_TEMPLATE_112,
    INSIGHTFACE_MODEL_FILES,
    FaceDetection,
    align_face,
    box_mask,
    choose_face,
    crop_to_box,
    detect_faces,
    estimate_similarity,
    expand_box,
    face_template,
    load_face_analysis,
    mask_box,
    prepare_faces,
    prepare_with_box,
    prepare_with_mask,
    replace_background,
)


def noise_image(height: int, width: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def rectangle_mask(height: int, width: int, box) -> torch.Tensor:
    top, left, bottom, right = box
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1.0
    return mask


# ----------------------------------------------------------------------------- mask_box


def test_mask_box_of_a_rectangle_is_exact():
    assert mask_box(rectangle_mask(60, 80, (7, 11, 23, 50))) == (7, 11, 23, 50)


def test_mask_box_of_an_ellipse_is_exact():
    y, x = torch.meshgrid(torch.arange(90.0), torch.arange(120.0), indexing="ij")
    mask = ((((y - 40) / 15.5) ** 2 + ((x - 70) / 25.5) ** 2) <= 1).float()
    # Extremes are on the axes through the integer centre: |dy| <= 15, |dx| <= 25.
    assert mask_box(mask) == (25, 45, 56, 96)


def test_mask_box_threshold_batch_union_and_empty_error():
    mask = torch.zeros(2, 30, 30)
    mask[0, 2:5, 3:9] = 1.0
    mask[1, 10:20, 1:4] = 0.4  # below the default threshold
    assert mask_box(mask) == (2, 3, 5, 9)
    assert mask_box(mask, threshold=0.3) == (2, 1, 20, 9)
    with pytest.raises(ValueError, match="the mask selects no pixel"):
        mask_box(torch.zeros(16, 16))


# ----------------------------------------------------------------------------- expand_box


def test_expand_box_margin_without_square():
    assert expand_box((10, 20, 30, 60), 100, 100, margin=0.1, square=False) == (8, 16, 32, 64)


def test_expand_box_square_is_centred():
    assert expand_box((10, 20, 30, 60), 100, 100, margin=0.0, square=True) == (0, 20, 40, 60)
    assert expand_box((40, 40, 50, 60), 100, 100, margin=0.0, square=True) == (35, 40, 55, 60)


def test_expand_box_square_is_shifted_inside_the_image():
    assert expand_box((0, 0, 10, 30), 100, 100, margin=0.0, square=True) == (0, 0, 30, 30)
    # rows 88..102 and columns 82..103 with the margin; side 21, centred, then shifted back inside.
    assert expand_box((90, 85, 100, 100), 100, 100, margin=0.2, square=True) == (79, 79, 100, 100)


def test_expand_box_clamps_to_the_image():
    assert expand_box((0, 0, 10, 10), 40, 40, margin=0.5, square=False) == (0, 0, 15, 15)
    # Wider than the image is tall: the square cannot fit, the box is clamped (crop_to_box pads it).
    assert expand_box((10, 0, 20, 100), 50, 100, margin=0.0, square=True) == (0, 0, 50, 100)


def test_expand_box_rejects_bad_input():
    with pytest.raises(ValueError, match="empty or outside"):
        expand_box((5, 5, 5, 10), 20, 20)
    with pytest.raises(ValueError, match="margin"):
        expand_box((0, 0, 5, 5), 20, 20, margin=-0.1)


# ----------------------------------------------------------------------------- crop_to_box


def test_crop_returns_the_exact_pixels():
    image = noise_image(40, 50, batch=2)
    crop = crop_to_box(image, (5, 7, 25, 31))
    assert torch.equal(crop, image[:, 5:25, 7:31])


def test_crop_resize_shape_and_constant_region():
    image = noise_image(64, 64)
    image[:, 10:42, 20:52] = torch.tensor([0.2, 0.6, 0.9])
    crop = crop_to_box(image, (10, 20, 42, 52), size=16)
    assert crop.shape == (1, 16, 16, 3)
    torch.testing.assert_close(crop, torch.tensor([0.2, 0.6, 0.9]).expand(1, 16, 16, 3), atol=1e-6, rtol=0)


def test_crop_of_a_non_square_box_is_padded_not_stretched():
    image = noise_image(30, 30)
    crop = crop_to_box(image, (0, 0, 10, 20), size=20, pad_color="white")
    assert crop.shape == (1, 20, 20, 3)
    assert torch.equal(crop[:, 5:15], image[:, 0:10, 0:20])
    assert bool((crop[:, :5] == 1).all()) and bool((crop[:, 15:] == 1).all())


# ----------------------------------------------------------------------------- replace_background


@pytest.mark.parametrize("background, color", [("black", (0.0, 0.0, 0.0)), ("white", (1.0, 1.0, 1.0)), ((0.1, 0.2, 0.3), (0.1, 0.2, 0.3))])
def test_background_replaced_outside_and_untouched_inside(background, color):
    image = noise_image(32, 40)
    mask = rectangle_mask(32, 40, (4, 6, 20, 30))
    result = replace_background(image, mask, background)
    inside = mask.bool()
    assert torch.equal(result[0][inside], image[0][inside])
    assert torch.equal(result[0][~inside], torch.tensor(color).expand(int((~inside).sum()), 3))


def test_background_soft_edge_blends_and_bad_colour_is_refused():
    image = torch.full((1, 4, 4, 3), 0.8)
    result = replace_background(image, torch.full((4, 4), 0.5), "black")
    torch.testing.assert_close(result, torch.full((1, 4, 4, 3), 0.4))
    with pytest.raises(ValueError, match="unknown background"):
        replace_background(image, torch.ones(4, 4), "purple")
    with pytest.raises(ValueError, match="3 values in"):
        replace_background(image, torch.ones(4, 4), (0.0, 2.0, 0.0))


# ----------------------------------------------------------------------------- prepare_with_mask / box


def test_prepare_with_mask_crops_the_subject_exactly():
    image = noise_image(50, 70)
    box = (12, 15, 31, 44)
    images, masks = prepare_with_mask(image, rectangle_mask(50, 70, box), size=None, margin=0.0, square=False)
    assert torch.equal(images, image[:, 12:31, 15:44])
    assert bool((masks == 1).all()) and masks.shape == (1, 19, 29)


def test_prepare_with_mask_square_margin_background_and_size():
    image = noise_image(80, 80)
    mask = rectangle_mask(80, 80, (30, 30, 50, 50))
    images, masks = prepare_with_mask(image, mask, size=None, margin=0.5, background="black")
    assert images.shape == (1, 40, 40, 3)  # (20, 20, 60, 60)
    assert torch.equal(images[0, 10:30, 10:30], image[0, 30:50, 30:50])
    assert float(images[0, :10].abs().max()) == 0.0 and float(masks[0, :10].max()) == 0.0
    resized, resized_masks = prepare_with_mask(image, mask, size=224)
    assert resized.shape == (1, 224, 224, 3) and resized_masks.shape == (1, 224, 224)


def test_prepare_with_mask_batches_one_mask_per_image():
    image = noise_image(40, 40, batch=2)
    masks = torch.stack([rectangle_mask(40, 40, (0, 0, 10, 10)), rectangle_mask(40, 40, (5, 5, 35, 35))])
    images, _ = prepare_with_mask(image, masks, size=32, margin=0.0)
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="set a size"):
        prepare_with_mask(image, masks, size=None, margin=0.0)
    masks[1] = 0
    with pytest.raises(ValueError, match="image 1 of the batch: the mask selects no pixel"):
        prepare_with_mask(image, masks)
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        prepare_with_mask(image, torch.ones(3, 40, 40))


def test_mask_size_mismatch_says_what_to_do():
    with pytest.raises(ValueError) as error:
        prepare_with_mask(torch.zeros(1, 512, 512, 3), torch.ones(64, 64))
    assert str(error.value) == (
        "mask is 64x64 but the image is 512x512: resize the mask (e.g. with 'Upscale Image' / 'Mask resize') "
        "or use the mask from the same image"
    )


def test_prepare_with_box_keeps_the_photo_and_crops_exactly():
    image = noise_image(30, 40)
    images, masks = prepare_with_box(image, (3, 4, 13, 14), size=None)
    assert torch.equal(images, image[:, 3:13, 4:14]) and bool((masks == 1).all())
    assert box_mask((3, 4, 13, 14), 30, 40).sum() == 100


# ----------------------------------------------------------------------------- choose_face


def face(x1, y1, x2, y2, score=0.9):
    return FaceDetection(box=(x1, y1, x2, y2), score=score, landmarks=torch.zeros(5, 2))


def test_choose_face_largest_and_by_index():
    faces = [face(200, 0, 240, 40), face(0, 10, 100, 110), face(120, 0, 150, 30)]
    assert choose_face(faces) is faces[1]
    assert [choose_face(faces, i) for i in range(3)] == [faces[1], faces[2], faces[0]]  # left to right


def test_choose_face_errors():
    with pytest.raises(ValueError, match="no face found in image 2; use a clearer photo or the mask/box path for non-faces"):
        choose_face([], image_index=2)
    with pytest.raises(ValueError, match="found 3 faces, index 5 requested"):
        choose_face([face(0, 0, 1, 1), face(2, 0, 3, 1), face(4, 0, 5, 1)], 5)
    with pytest.raises(ValueError, match="found 1 face, index -1 requested"):
        choose_face([face(0, 0, 1, 1)], -1)


# ----------------------------------------------------------------------------- similarity and alignment


def similarity(scale, angle, tx, ty):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]], dtype=torch.float64)


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_estimate_similarity_recovers_a_known_transform():
    points = torch.rand(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 100
    for matrix in (similarity(0.73, -1.1, 12.5, -3.25), similarity(2.4, 2.9, -40.0, 7.0), similarity(1.0, 0.0, 0.0, 0.0)):
        torch.testing.assert_close(estimate_similarity(points, apply(matrix, points)), matrix, atol=1e-5, rtol=0)


def test_estimate_similarity_never_reflects():
    points = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64)
    mirrored = points * torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert float(torch.linalg.det(estimate_similarity(points, mirrored)[:, :2])) > 0
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(torch.ones(5, 2), torch.rand(5, 2))


def test_align_face_on_the_template_is_the_identity():
    image = noise_image(96, 96)
    torch.testing.assert_close(align_face(image, face_template(96), size=96), image, atol=1e-5, rtol=0)


def test_align_face_translation_follows_the_pixel_convention():
    image = noise_image(64, 64)
    landmarks = face_template(48) + torch.tensor([5.0, 9.0], dtype=torch.float64)  # face sits 5 right, 9 down
    aligned = align_face(image, landmarks, size=48)
    torch.testing.assert_close(aligned[0], image[0, 9:57, 5:53], atol=1e-5, rtol=0)


def gaussian_dots(height, width, centres, sigma):
    """Analytic image: one Gaussian dot per (x, y) centre (independent of any warping code)."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    image = torch.zeros(height, width, dtype=torch.float64)
    for cx, cy in centres.tolist():
        image += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return image.clamp(max=1.0).float()[None, ..., None].expand(1, height, width, 3)


def test_align_face_recovers_the_canonical_placement():
    size = 128
    template = face_template(size)
    matrix = similarity(1.7, math.radians(25), 60.0, 20.0)  # canonical crop -> photo
    photo_landmarks = apply(matrix, template)
    photo = gaussian_dots(300, 320, photo_landmarks, sigma=1.5 * 1.7)
    aligned = align_face(photo, photo_landmarks, size=size)[0, ..., 0].double()
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    for cx, cy in template.tolist():
        window = ((x - cx).abs() <= 6) & ((y - cy).abs() <= 6)
        weights = aligned * window
        centroid = torch.stack([(weights * x).sum(), (weights * y).sum()]) / weights.sum()
        assert float(torch.linalg.norm(centroid - torch.tensor([cx, cy], dtype=torch.float64))) < 0.5
        assert float(aligned[round(cy), round(cx)]) > 0.8


def test_align_face_rejects_wrong_landmarks():
    with pytest.raises(ValueError, match="5 \\(x, y\\) face landmarks"):
        align_face(noise_image(10, 10), torch.zeros(68, 2))


PHOTOS = Path(__file__).resolve().parents[2] / "photos"

# ----------------------------------------------------------------------------- insightface hand-off


class FakeFaceAnalysis:
    """Stands in for insightface's FaceAnalysis: records the array it is given, returns set faces."""

    def __init__(self, faces):
        self.faces, self.seen = faces, []

    def get(self, array):
        self.seen.append(array)
        return self.faces


def test_detect_faces_gives_insightface_bgr_uint8_and_converts_results():
    image = torch.zeros(1, 6, 8, 3)
    image[..., 0] = 1.0  # pure red
    kps = np.arange(10, dtype=np.float32).reshape(5, 2)
    found = SimpleNamespace(bbox=np.array([1, 2, 5, 6], np.float32), det_score=np.float32(0.75), kps=kps, normed_embedding=np.ones(512, np.float32))
    fake = FakeFaceAnalysis([found])
    (detection,) = detect_faces(fake, image)
    array = fake.seen[0]
    assert array.dtype == np.uint8 and array.shape == (6, 8, 3)
    assert (array[..., 2] == 255).all() and (array[..., :2] == 0).all()
    assert detection.box == (1.0, 2.0, 5.0, 6.0) and detection.score == pytest.approx(0.75)
    assert torch.equal(detection.landmarks, torch.from_numpy(kps).double()) and detection.embedding.shape == (512,)
    with pytest.raises(ValueError, match="one image at a time"):
        detect_faces(fake, torch.zeros(2, 6, 8, 3))


def test_prepare_faces_aligns_the_chosen_face_and_reports_missing_faces():
    image = noise_image(64, 64, batch=2)
    landmarks = face_template(48).numpy() + np.array([5.0, 9.0])
    fake = FakeFaceAnalysis([SimpleNamespace(bbox=np.array([0, 0, 50, 50]), det_score=0.9, kps=landmarks)])
    aligned, faces = prepare_faces(fake, image, size=48)
    assert aligned.shape == (2, 48, 48, 3) and len(faces) == 2 and faces[0].embedding is None
    torch.testing.assert_close(aligned[1], image[1, 9:57, 5:53], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no face found in image 0"):
        prepare_faces(FakeFaceAnalysis([]), image)


@pytest.mark.parametrize("name", sorted(INSIGHTFACE_MODEL_FILES))
def test_missing_models_name_the_folder_and_the_files(tmp_path, name):
    with pytest.raises(FileNotFoundError) as error:
        load_face_analysis(tmp_path / name)
    message = str(error.value)
    assert f"'{name}' is incomplete in {tmp_path / name}/" in message
    assert all(file in message for file in INSIGHTFACE_MODEL_FILES[name])


def test_partly_missing_models_name_only_what_is_missing(tmp_path):
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    (folder / "glintr100.onnx").touch()
    with pytest.raises(FileNotFoundError) as error:
        load_face_analysis(folder)
    missing = str(error.value).split("(missing: ")[1].split(")")[0]
    assert "glintr100.onnx" not in missing and "scrfd_10g_bnkps.onnx" in missing
    with pytest.raises(FileNotFoundError, match=r"\(missing: \*\.onnx\)"):
        load_face_analysis(tmp_path / "my_pack")


def test_missing_insightface_says_how_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "buffalo_l"
    folder.mkdir()
    for file in INSIGHTFACE_MODEL_FILES["buffalo_l"]:
        (folder / file).touch()
    monkeypatch.setitem(sys.modules, "insightface", None)  # makes `import insightface...` raise ImportError
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ImportError, match=r"pip install insightface onnxruntime .*2\.x .*0\.7\.3"):
        load_face_analysis(folder)


@pytest.mark.parametrize("name", sorted(INSIGHTFACE_MODEL_FILES))
def test_insightface_itself_reports_the_faces_through_the_pack(tmp_path, name):
    """The real insightface (0.7.3 or 2.x) on a stand-in model pack (tests/insightface_models.py) whose detector
    reports two faces the test placed: the pack hands it the photo as BGR uint8, reads the boxes, landmarks and
    embeddings back in the photo's pixels, and its alignment equals insightface's own (face_align.norm_crop)."""
    insightface = pytest.importorskip("insightface", reason="insightface is not installed (CI installs it)")
    from insightface.utils import face_align
    from insightface_models import detector_scale, write_model_pack
    from PIL import Image
    photo = np.asarray(Image.open(PHOTOS / "subject-personalization-astronaut.jpg").convert("RGB"))
    chosen = [(np.array([130.0, 40.0, 215.0, 135.0]), np.array([[150, 80], [195, 78], [172, 100], [155, 118], [190, 117]], float)),
              (np.array([20.0, 250.0, 60.0, 300.0]), np.array([[30, 265], [50, 265], [40, 278], [32, 290], [48, 290]], float))]
    scale = detector_scale(*photo.shape[:2])
    pack = write_model_pack(tmp_path, name, [(tuple(box * scale), landmarks * scale) for box, landmarks in chosen])
    analysis = load_face_analysis(pack)
    seen = []
    analysis.get = lambda array, get=analysis.get: seen.append(array.copy()) or get(array)
    image = torch.from_numpy(photo.copy()).float()[None] / 255.0
    faces = detect_faces(analysis, image)
    assert np.array_equal(seen[0], photo[..., ::-1]), "insightface gets the photo's pixels as BGR uint8"
    assert len(faces) == 2
    for face, (box, landmarks) in zip(sorted(faces, key=lambda face: -face.area), chosen):
        np.testing.assert_allclose(face.box, box, atol=1e-3)
        np.testing.assert_allclose(face.landmarks.numpy(), landmarks, atol=1e-3)
        assert face.score == pytest.approx(0.99, abs=0.011) and face.embedding.shape == (512,)
    for index, expected in ((None, chosen[0]), (0, chosen[1])):  # the largest; the leftmost
        aligned, (face,) = prepare_faces(analysis, image, index, size=224)
        theirs = face_align.norm_crop(photo[..., ::-1].copy(), landmark=expected[1].astype(np.float32), image_size=224)
        ours = (aligned[0].numpy() * 255).round().astype(np.int16)
        difference = np.abs(ours - theirs[..., ::-1].astype(np.int16))
        print(f"\ninsightface {insightface.__version__} ({name}): aligned crop vs norm_crop, mean |diff| "
              f"{difference.mean():.3f}, max {difference.max()} (of 255)")
        assert difference.max() <= 2, "the crop is insightface's own, up to rounding"
