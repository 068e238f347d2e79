"""Regional subject masks: feathering, checking against the image, and resizing to an attention layer.

A subject mask (H, W) in [0, 1] says where in the image the subject's token may be attended. Each
cross-attention layer sees the image as h x w tokens, so the mask is resized to every layer; the
attention adds log(mask) to that token's logit (`subject_attention.SubjectBinding.query_mask`).
Plain torch, no ComfyUI import.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def as_single_mask(mask: Tensor) -> Tensor:
    """(H, W) or (1, H, W) -> (H, W) float in [0, 1], with a clear error for a batch or an empty mask."""
    if mask.ndim == 3:
        if mask.shape[0] != 1:
            raise ValueError(f"a subject takes one mask, got a batch of {mask.shape[0]}; pick one per subject "
                             f"(e.g. with a mask-from-batch node)")
        mask = mask[0]
    if mask.ndim != 2 or mask.numel() == 0:
        raise ValueError(f"expected a MASK of shape (H, W) or (1, H, W), got {tuple(mask.shape)}")
    return mask.float().clamp(0, 1)


def feather_mask(mask: Tensor, width: int) -> Tensor:
    """(H, W) mask with edges softened over about `width` pixels (Gaussian, sigma = width / 3; 0 = unchanged)."""
    if width < 0:
        raise ValueError(f"feather width must be >= 0 pixels, got {width}")
    if width == 0:
        return mask
    sigma = width / 3
    offsets = torch.arange(-width, width + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(mask)
    # Replicate padding: a mask that reaches the image border keeps full weight there.
    blurred = mask[None, None]
    blurred = F.conv2d(F.pad(blurred, (width, width, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, width, width), mode="replicate"), kernel.view(1, 1, -1, 1))
    return blurred[0, 0].clamp(0, 1)


def check_mask_fits(mask_size: tuple[int, int], latent_size: tuple[int, int]) -> None:
    """Refuse a mask whose aspect ratio differs from the image's by more than one latent pixel."""
    (mask_height, mask_width), (latent_height, latent_width) = mask_size, latent_size
    if abs(mask_height * latent_width / mask_width - latent_height) > 1:
        raise ValueError(
            f"a subject mask is {mask_width}x{mask_height} but the image being generated is "
            f"{latent_width * 8}x{latent_height * 8} (another aspect ratio): make the mask at the image's size "
            f"(e.g. 'Subject Region Mask' with the latent's width and height)")


def layer_query_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """(H, W) mask -> (1, height * width), the weight of each image token of a layer.

    Shrinking averages the mask over each token's patch (the fraction of the patch inside the region);
    growing (a mask smaller than the layer) interpolates bilinearly.
    """
    shrinking = mask.shape[-2] >= height and mask.shape[-1] >= width
    resized = F.interpolate(mask[None, None].float(), size=(height, width),
                            **({"mode": "area"} if shrinking else {"mode": "bilinear", "align_corners": False}))
    return resized.flatten(1).clamp(0, 1)


def region_mask(height: int, width: int, left: float, top: float, right: float, bottom: float) -> Tensor:
    """(H, W) mask that is 1 inside the box given as fractions of the image size, 0 outside."""
    if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
        raise ValueError(f"the region (left={left}, top={top}, right={right}, bottom={bottom}) must satisfy "
                         f"0 <= left < right <= 1 and 0 <= top < bottom <= 1 (fractions of the image)")
    mask = torch.zeros(height, width)
    rows = slice(math.floor(top * height), max(math.ceil(bottom * height), math.floor(top * height) + 1))
    columns = slice(math.floor(left * width), max(math.ceil(right * width), math.floor(left * width) + 1))
    mask[rows, columns] = 1.0
    return mask
