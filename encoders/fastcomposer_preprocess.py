"""FastComposer's reference-image preprocessing, byte for byte as its training and inference code does it.

Pad to square with black (floor of half the difference on each side, so an odd difference
leaves the image one pixel short and the resize stretches it, as the reference does), resize
to 224x224 bilinear with antialias on uint8 values, then scale to [0, 1] and normalise with the CLIP statistics.
The reference resizes uint8 tensors with torchvision's v1 Resize, which interpolates in float32 and rounds
back to uint8; torch's native uint8 kernel (which torchvision v2 uses) rounds its fixed-point sums
differently and puts many values (about one in nine at common sizes) one level off, so it is not used here.
"""
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224


def pad_to_square(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> zero-padded along the shorter side by (long - short) // 2 on both ends."""
    height, width = images.shape[-2:]
    padding = abs(height - width) // 2
    if height > width:
        return F.pad(images, (padding, padding, 0, 0))
    return F.pad(images, (0, 0, padding, padding))


def resize_uint8(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, C, H, W) uint8 -> (B, C, size, size) uint8, bilinear with antialias, the bytes torchvision v1 gives.

    v1's Resize((size, size), BILINEAR, antialias=True) on a uint8 tensor interpolates in float32, rounds
    (half to even) and casts back; so does this.
    """
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().to(torch.uint8)  # no clamp, as torchvision: bilinear weights keep values in [0, 255]


def preprocess_subject_images(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) floats in [0, 1] -> CLIP pixel values (B, 3, size, size) float32."""
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"expected a non-empty IMAGE batch (B, H, W, C), got shape {tuple(images.shape)}")
    # The reference pads and resizes uint8 tensors (decoded image files), so the pixels are quantised first.
    pixels = (images[..., :3].movedim(-1, 1).cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)
    pixels = resize_uint8(pad_to_square(pixels), size).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std
