"""Regional masks: feathering, fitting and per-layer resizing, against direct float64 computations."""
import pytest
import torch

from subject_personalization.attention.subject_masks import (as_single_mask, check_mask_fits, feather_mask,
                                                             layer_query_mask, region_mask)


def reference_feather(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Direct 2-D Gaussian weighted sum with clamped (replicated) borders, float64, loops over offsets."""
    mask = mask.double()
    height, breadth = mask.shape
    offsets = range(-width, width + 1)
    weights = {o: torch.exp(torch.tensor(-0.5 * (o / (width / 3)) ** 2, dtype=torch.float64)) for o in offsets}
    total = sum(weights.values())
    rows, columns = torch.arange(height), torch.arange(breadth)
    out = torch.zeros_like(mask)
    for dy in offsets:
        for dx in offsets:
            shifted = mask[(rows + dy).clamp(0, height - 1)][:, (columns + dx).clamp(0, breadth - 1)]
            out += weights[dy] * weights[dx] / total ** 2 * shifted
    return out


@pytest.mark.parametrize("shape, width", [((32, 48), 3), ((17, 9), 5), ((40, 40), 12)])
def test_feather_matches_a_direct_gaussian(shape, width):
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(width)) > 0.5).float()
    assert torch.allclose(feather_mask(mask, width).double(), reference_feather(mask, width), atol=1e-6)


def test_feather_zero_is_identity_and_keeps_full_regions_whole():
    mask = region_mask(64, 64, 0.0, 0.0, 0.5, 1.0)
    assert torch.equal(feather_mask(mask, 0), mask)
    soft = feather_mask(mask, 6)
    assert torch.allclose(soft[:, :20], torch.ones(64, 20)) and torch.allclose(soft[:, 44:], torch.zeros(64, 20))
    assert 0 < soft[0, 32] < 1, "the edge is softened"
    with pytest.raises(ValueError, match="feather width"):
        feather_mask(mask, -1)


def test_region_mask_selects_the_given_fractions():
    mask = region_mask(40, 100, 0.25, 0.5, 0.75, 1.0)
    expected = torch.zeros(40, 100)
    for y in range(40):
        for x in range(100):
            expected[y, x] = float(25 <= x < 75 and 20 <= y < 40)
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="left < right"):
        region_mask(8, 8, 0.6, 0.0, 0.5, 1.0)


@pytest.mark.parametrize("layer", [(8, 8), (4, 4), (2, 2), (1, 1)])
def test_layer_mask_is_the_area_average(layer):
    blocks = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    mask = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)  # 64x64 of constant 8x8 blocks
    height, width = layer
    expected = blocks.double().reshape(height, 8 // height, width, 8 // width).mean(dim=(1, 3))
    assert torch.allclose(layer_query_mask(mask, height, width).double(), expected.reshape(1, -1), atol=1e-6)


def test_mask_fit_is_checked_by_aspect_ratio():
    check_mask_fits((512, 512), (64, 64))
    check_mask_fits((512, 768), (64, 96))
    check_mask_fits((100, 150), (8, 12))
    with pytest.raises(ValueError, match="768x512 .*512x512"):
        check_mask_fits((512, 768), (64, 64))


def test_single_mask_shapes():
    assert as_single_mask(torch.ones(1, 4, 6) * 2).shape == (4, 6)
    assert as_single_mask(torch.ones(1, 4, 6) * 2).max() == 1
    with pytest.raises(ValueError, match="batch of 2"):
        as_single_mask(torch.ones(2, 4, 6))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        as_single_mask(torch.ones(4))
