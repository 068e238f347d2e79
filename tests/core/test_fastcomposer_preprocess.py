"""Subject-image preprocessing against an independent re-statement of the reference pipeline."""
import pytest
import torch
import torch.nn.functional as F

from subject_personalization.encoders.fastcomposer_preprocess import CLIP_MEAN, CLIP_STD, pad_to_square, preprocess_subject_images

ONE_UINT8_LEVEL = 1.0 / 255.0 / min(CLIP_STD) + 1e-6  # uint8 rounding may differ by one level after normalising


def reference_pad(image_uint8_chw: torch.Tensor) -> torch.Tensor:
    """The reference PadToSquare: (long - short) // 2 zero columns or rows on both sides."""
    _, height, width = image_uint8_chw.shape
    pad = abs(height - width) // 2
    pad_rows, pad_columns = (pad, 0) if width > height else (0, pad)
    padded = torch.zeros(3, height + 2 * pad_rows, width + 2 * pad_columns, dtype=torch.uint8)
    padded[:, pad_rows:pad_rows + height, pad_columns:pad_columns + width] = image_uint8_chw
    return padded


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def reference_preprocess(image_uint8_chw: torch.Tensor) -> torch.Tensor:
    """Reference order: pad (fill 0) on uint8, resize to 224 bilinear+antialias on uint8, /255, normalise."""
    padded = reference_pad(image_uint8_chw)
    resized = F.interpolate(padded[None].float(), size=(224, 224), mode="bilinear", antialias=True).round().clamp(0, 255)
    return normalise(resized[0] / 255.0)


@pytest.mark.parametrize("height, width", [(300, 200), (201, 300), (224, 224), (97, 97), (64, 513)])
def test_matches_reference_pipeline(height, width):
    generator = torch.Generator().manual_seed(height * width)
    image_uint8 = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
    comfy_image = (image_uint8.float() / 255.0).permute(1, 2, 0)[None]
    ours = preprocess_subject_images(comfy_image)[0]
    expected = reference_preprocess(image_uint8)
    assert ours.shape == (3, 224, 224)
    assert (ours - expected).abs().max() <= ONE_UINT8_LEVEL


def test_pad_to_square_centres_the_image_with_black():
    image = torch.ones(1, 3, 10, 4)
    padded = pad_to_square(image)
    assert padded.shape == (1, 3, 10, 10)
    assert padded[..., :3].abs().sum() == 0 and padded[..., 7:].abs().sum() == 0
    assert torch.equal(padded[..., 3:7], image)


def test_odd_difference_leaves_the_image_one_pixel_short_like_the_reference():
    assert pad_to_square(torch.ones(1, 3, 10, 5)).shape == (1, 3, 10, 9)


def test_alpha_channel_is_ignored_and_empty_input_rejected():
    rgba = torch.rand(2, 50, 60, 4)
    assert torch.equal(preprocess_subject_images(rgba), preprocess_subject_images(rgba[..., :3]))
    with pytest.raises(ValueError, match="non-empty IMAGE"):
        preprocess_subject_images(torch.zeros(0, 64, 64, 3))


def test_matches_torchvision_uint8_resize_of_the_reference_code():
    """The reference resizes uint8 tensors with torchvision; the bytes, and so the pixels, must match exactly."""
    transforms = pytest.importorskip("torchvision.transforms.v2.functional")
    generator = torch.Generator().manual_seed(3)
    image_uint8 = torch.randint(0, 256, (3, 180, 250), generator=generator, dtype=torch.uint8)
    resized = transforms.resize(reference_pad(image_uint8), [224, 224], antialias=True)
    expected = normalise(resized.float() / 255.0)
    ours = preprocess_subject_images((image_uint8.float() / 255.0).permute(1, 2, 0)[None])[0]
    assert torch.equal(ours, expected)
