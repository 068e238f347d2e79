"""Subject-image preprocessing against the reference pipeline: PadToSquare, then torchvision v1's Resize on uint8.

torchvision v1 resizes a uint8 tensor in float32 and rounds back; torch's native uint8 kernel, which
torchvision.transforms.v2 shares, gives other bytes, so v2 is not a reference.
"""
import pytest
import torch
import torch.nn.functional as F

from subject_personalization.encoders.fastcomposer_preprocess import (CLIP_MEAN, CLIP_STD, pad_to_square,
                                                                      preprocess_subject_images, resize_uint8)

SHAPES = [(300, 200), (201, 300), (224, 224), (97, 97), (64, 513), (1000, 750), (768, 1024), (225, 224),
          (223, 226), (150, 149), (7, 5), (1, 1), (224, 100), (1365, 2048)]  # portrait, landscape, odd, tiny, big


def random_images(height, width, count=2):
    generator = torch.Generator().manual_seed(height * 4099 + width)
    return torch.randint(0, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8)


def as_comfy_image(images_uint8):
    return (images_uint8.float() / 255.0).permute(0, 2, 3, 1)


def reference_pad(image_uint8_chw: torch.Tensor) -> torch.Tensor:
    """The reference PadToSquare: (long - short) // 2 zero columns or rows on both sides."""
    _, height, width = image_uint8_chw.shape
    pad = abs(height - width) // 2
    pad_rows, pad_columns = (pad, 0) if width > height else (0, pad)
    padded = torch.zeros(3, height + 2 * pad_rows, width + 2 * pad_columns, dtype=torch.uint8)
    padded[:, pad_rows:pad_rows + height, pad_columns:pad_columns + width] = image_uint8_chw
    return padded


def assert_identical(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(ours, expected), f"{(ours != expected).sum()} of {expected.numel()} values differ"


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def restated_reference_resize(image_uint8_chw: torch.Tensor) -> torch.Tensor:
    """torchvision v1's resize of a uint8 tensor, restated without torchvision: float32, interpolate, round, uint8."""
    if image_uint8_chw.shape[-2:] == (224, 224):
        return image_uint8_chw
    resized = F.interpolate(image_uint8_chw[None].float(), size=(224, 224), mode="bilinear", antialias=True)
    return resized[0].round().to(torch.uint8)


def torchvision_reference(image_uint8_chw: torch.Tensor) -> torch.Tensor:
    """The official object transform on one uint8 (3, H, W) image, with torchvision v1's functional API:
    pad to square with fill 0, Resize((224, 224), BILINEAR, antialias=True). Returns the uint8 image."""
    functional = pytest.importorskip("torchvision.transforms.functional")
    _, height, width = image_uint8_chw.shape
    pad = abs(height - width) // 2
    padded = functional.pad(image_uint8_chw, [pad, 0, pad, 0] if height > width else [0, pad, 0, pad], fill=0)
    return functional.resize(padded, [224, 224], interpolation=functional.InterpolationMode.BILINEAR, antialias=True)


@pytest.mark.parametrize("height, width", SHAPES)
def test_bytes_match_torchvision_v1_resize_of_the_reference_code(height, width):
    """The official pipeline's bytes exactly, and so its normalised pixels, for every image of a batch."""
    images = random_images(height, width)
    expected = torch.stack([torchvision_reference(image) for image in images])
    assert_identical(resize_uint8(pad_to_square(images)), expected)
    assert_identical(preprocess_subject_images(as_comfy_image(images)), normalise(expected.float() / 255.0))


@pytest.mark.parametrize("height, width", SHAPES)
def test_matches_restated_reference_without_torchvision(height, width):
    images = random_images(height, width)
    expected = torch.stack([restated_reference_resize(reference_pad(image)) for image in images])
    assert_identical(resize_uint8(pad_to_square(images)), expected)
    assert_identical(preprocess_subject_images(as_comfy_image(images)), normalise(expected.float() / 255.0))


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
