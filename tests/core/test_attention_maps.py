"""Attention-map recording, masks and heatmap rendering (issue #3).

The recorder's average is checked against a float64 mean of maps resized with a bilinear
interpolation written here from its definition (half-pixel centres, edge clamping), not F.interpolate.
"""
import math

import pytest
import torch

from subject_personalization.attention.attention_maps import (
    AttentionMapRecorder, draw_text, infer_layer_size, legend_swatch_boxes, maps_to_masks, normalise_maps, palette,
    render_heatmap, render_heatmap_with_legend, render_legend)
from subject_personalization.attention.subject_attention import SubjectBinding, subject_attention

AVG_ATOL = 2e-6  # float32 sums of a handful of O(1) maps against float64


def bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out, in) float64 weights of 1-D bilinear upsampling with half-pixel centres, clamped at the edges."""
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        src = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        lo = min(int(math.floor(src)), size_in - 1)
        hi = min(lo + 1, size_in - 1)
        frac = src - lo
        weights[i, lo] += 1 - frac
        weights[i, hi] += frac
    return weights


def reference_resize(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, S, h, w) -> (B, S, height, width) float64, upsampling only."""
    rows = bilinear_matrix(maps.shape[-2], height)
    cols = bilinear_matrix(maps.shape[-1], width)
    return torch.einsum("Hh,bshw,Ww->bsHW", rows, maps.double(), cols)


def softmax_subject_probs(batch, heads, height, width, tokens, subject_tokens, generator):
    """Head-averaged attention probability of each subject token per image token, (B, S, h*w), from a softmax."""
    logits = 3 * torch.randn(batch, heads, height * width, tokens, generator=generator)
    probs = logits.softmax(dim=-1)  # (B, H, N, T)
    return probs[..., subject_tokens].mean(dim=1).transpose(1, 2)


# ---------------------------------------------------------------- recorder


@pytest.mark.parametrize("fixed", [None, (40, 48)])
def test_recorder_average_is_exact_mean_of_resized_maps(fixed):
    generator = torch.Generator().manual_seed(0)
    sizes = [(8, 8), (16, 16), (32, 32), (16, 16), (8, 8)]  # several layers, two "steps" at some sizes
    recorder = AttentionMapRecorder(resolution=fixed)
    added = []
    for step in range(3):
        for h, w in sizes:
            maps = torch.rand(2, 3, h * w, generator=generator)
            recorder.add(maps, h, w)
            added.append(maps.reshape(2, 3, h, w))
    out_h, out_w = fixed or (32, 32)
    expected = torch.stack([reference_resize(m, out_h, out_w) for m in added]).mean(dim=0)
    got = recorder.maps()
    assert got.shape == (2, 3, out_h, out_w) and got.dtype == torch.float32
    assert recorder.count == len(added)
    torch.testing.assert_close(got.double(), expected, atol=AVG_ATOL, rtol=0)


def test_recorder_single_resolution_is_plain_mean():
    generator = torch.Generator().manual_seed(1)
    maps = [torch.rand(1, 2, 12 * 20, generator=generator) for _ in range(4)]
    recorder = AttentionMapRecorder()
    for m in maps:
        recorder.add(m, 12, 20)
    expected = torch.stack([m.double() for m in maps]).mean(dim=0).reshape(1, 2, 12, 20)
    torch.testing.assert_close(recorder.maps().double(), expected, atol=AVG_ATOL, rtol=0)


@pytest.mark.parametrize("sizes, expected", [
    ([(8, 8), (16, 16), (32, 32)], (32, 32)),
    ([(32, 32), (8, 8), (16, 16)], (32, 32)),
    ([(8, 12), (16, 24), (32, 48)], (32, 48)),
])
def test_recorder_mixed_resolutions_shape(sizes, expected):
    recorder = AttentionMapRecorder()
    for h, w in sizes:
        recorder.add(torch.rand(2, 2, h * w), h, w)
    assert recorder.maps().shape == (2, 2, *expected)
    assert sorted(recorder.resolutions) == sorted(sizes)


def test_recorder_fixed_resolution_downsamples_too():
    recorder = AttentionMapRecorder(resolution=(8, 8))
    recorder.add(torch.rand(1, 2, 32 * 32), 32, 32)
    recorder.add(torch.rand(1, 2, 4 * 4), 4, 4)
    out = recorder.maps()
    assert out.shape == (1, 2, 8, 8)
    assert out.min() >= 0 and out.max() <= 1


def test_recorder_wrong_token_count_names_both():
    recorder = AttentionMapRecorder()
    with pytest.raises(ValueError, match=r"N=256.*16\*8=128"):
        recorder.add(torch.rand(1, 1, 256), 16, 8)
    with pytest.raises(ValueError, match="B, S, N"):
        recorder.add(torch.rand(1, 256), 16, 16)


def test_recorder_layout_change_empty_and_reset():
    recorder = AttentionMapRecorder()
    with pytest.raises(RuntimeError, match="no attention maps"):
        recorder.maps()
    recorder.add(torch.rand(2, 2, 64), 8, 8)
    with pytest.raises(ValueError, match="reset"):
        recorder.add(torch.rand(2, 3, 64), 8, 8)
    recorder.reset()
    assert recorder.count == 0 and recorder.resolutions == []
    with pytest.raises(RuntimeError):
        recorder.maps()
    recorder.add(torch.ones(2, 3, 16), 4, 4)
    torch.testing.assert_close(recorder.maps(), torch.ones(2, 3, 4, 4))


def test_recorder_detaches_and_stores_float32():
    probs = torch.rand(1, 2, 64, dtype=torch.float64, requires_grad=True)
    recorder = AttentionMapRecorder()
    recorder.add(probs, 8, 8)
    recorder.add(torch.rand(1, 2, 16).half(), 4, 4)
    out = recorder.maps()
    assert out.dtype == torch.float32 and not out.requires_grad
    assert out.device == probs.device
    # the recorder keeps its own copy: later in-place changes to an input do not leak in
    before = out.clone()
    with torch.no_grad():
        probs.zero_()
    torch.testing.assert_close(recorder.maps(), before)


def test_softmax_probability_maps_stay_probability_maps():
    generator = torch.Generator().manual_seed(2)
    subject_tokens = [3, 7]
    recorder = AttentionMapRecorder()
    for step in range(2):
        for h, w in [(8, 8), (16, 16), (32, 32)]:
            probs = softmax_subject_probs(2, 4, h, w, 20, subject_tokens, generator)
            assert probs.shape == (2, 2, h * w)
            assert probs.min() >= 0 and probs.max() <= 1
            assert (probs.sum(dim=1) <= 1 + 1e-6).all()  # distinct tokens of one softmax
            recorder.add(probs, h, w)
    avg = recorder.maps()
    assert avg.shape == (2, 2, 32, 32)
    assert avg.min() >= 0 and avg.max() <= 1
    # bilinear resizing and averaging are convex combinations: the subjects' mass per pixel stays <= 1
    assert (avg.sum(dim=1) <= 1 + 1e-6).all()


def test_records_subject_attention_probs():
    """The recorder takes subject_attention's return_subject_probs output as it is."""
    generator = torch.Generator().manual_seed(3)
    heads, width, tokens = 2, 16, 6
    recorder = AttentionMapRecorder()
    for h, w in [(4, 4), (8, 8)]:
        q = torch.randn(2, h * w, width, generator=generator)
        k = torch.randn(2, tokens, width, generator=generator)
        v = torch.randn(2, tokens, width, generator=generator)
        subjects = [SubjectBinding(token_index=torch.tensor([2, -1])),
                    SubjectBinding(token_index=torch.tensor([4, -1]))]
        _, probs = subject_attention(q, k, v, heads, subjects, return_subject_probs=True)
        recorder.add(probs, h, w)
    avg = recorder.maps()
    assert avg.shape == (2, 2, 8, 8)
    assert avg.min() >= 0 and avg.max() <= 1
    assert avg[0].amax() > 0 and avg[1].abs().max() == 0  # row without subjects records zeros


def test_infer_layer_size():
    assert infer_layer_size(128 * 128, 128, 128) == (128, 128)
    assert infer_layer_size(32 * 32, 128, 128) == (32, 32)
    assert infer_layer_size(13 * 17, 100, 136) == (13, 17)  # ceil(100/8), ceil(136/8)
    with pytest.raises(ValueError, match="77 image tokens"):
        infer_layer_size(77, 64, 64)


# ---------------------------------------------------------------- normalisation and masks


def test_normalise_maps():
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 0] = torch.rand(4, 4) * 0.03
    maps[1, 1, 2, 3] = 0.2
    out = normalise_maps(maps)
    torch.testing.assert_close(out[0, 0], maps[0, 0] / maps[0, 0].max())
    assert out[0, 0].max() == 1 and out[1, 1].max() == 1
    assert (out[0, 1] == 0).all() and (out[1, 0] == 0).all()
    assert out.min() >= 0 and out.max() <= 1


def test_masks_shape_order_and_range():
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(2, 3, 8, 8, generator=generator) * 0.1
    masks = maps_to_masks(maps, resolution=(64, 48))
    assert masks.shape == (6, 64, 48)
    assert masks.min() >= 0 and masks.max() <= 1
    # batch-major: mask b*S + s is subject s of row b
    single = maps_to_masks(maps[1, 2][None], resolution=(64, 48))
    torch.testing.assert_close(masks[5], single[0])
    assert maps_to_masks(maps[0], resolution=(16, 16)).shape == (3, 16, 16)
    assert maps_to_masks(maps).shape == (6, 8, 8)


def test_masks_threshold():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :, :2] = 0.05   # left half, becomes 1 after normalising
    maps[0, 0, :, 2:] = 0.01   # 0.2 after normalising
    soft = maps_to_masks(maps)
    torch.testing.assert_close(soft[0, :, 2:], torch.full((4, 2), 0.2))
    hard = maps_to_masks(maps, threshold=0.5)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert (hard[0, :, :2] == 1).all() and (hard[0, :, 2:] == 0).all()
    assert (hard[1] == 0).all()  # an all-zero map gives an empty mask, not a full one
    hard_up = maps_to_masks(maps, threshold=0.5, resolution=(32, 32))
    torch.testing.assert_close(hard_up, (maps_to_masks(maps, resolution=(32, 32)) > 0.5).float())
    raw = maps_to_masks(maps, threshold=0.02, normalise=False)
    assert (raw[0, :, :2] == 1).all() and (raw[0, :, 2:] == 0).all()


# ---------------------------------------------------------------- heatmap, legend, palette


def test_palette_colours_are_distinct():
    colours = palette(12)
    assert colours.shape == (12, 3) and colours.min() >= 0 and colours.max() <= 1
    distance = torch.cdist(colours, colours) + torch.eye(12) * 10
    assert distance.min() > 0.25
    more = palette(24)
    torch.testing.assert_close(more[:12], colours)
    assert (torch.cdist(more, more) + torch.eye(24) * 10).min() > 0.2  # extra colours stay apart too


def test_heatmap_zero_map_leaves_image_unchanged():
    image = torch.rand(2, 16, 24, 3)
    out = render_heatmap(image, torch.zeros(2, 3, 4, 6))
    assert torch.equal(out, image)
    assert torch.equal(render_heatmap(image, torch.zeros(2, 0, 4, 6)), image)


def test_heatmap_left_half_tints_only_left_half():
    image = torch.rand(1, 16, 16, 3)
    maps = torch.zeros(1, 2, 16, 16)
    maps[0, 1, :, :8] = 0.3  # subject 1 only; its normalised map is 1 on the left
    colour = palette(2)[1]
    out = render_heatmap(image, maps, alpha=0.6)
    torch.testing.assert_close(out[0, :, :8], 0.4 * image[0, :, :8] + 0.6 * colour)
    assert torch.equal(out[0, :, 8:], image[0, :, 8:])


def test_heatmap_upsampled_map_tints_left_side_only():
    image = torch.rand(1, 64, 64, 3)
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, :, :4] = 1.0
    colours = [(0.0, 0.0, 1.0)]
    out = render_heatmap(image, maps, colours=colours, alpha=0.5)
    # bilinear blur reaches at most half a map cell (4 px) across the boundary
    torch.testing.assert_close(out[0, :, :28], 0.5 * image[0, :, :28] + 0.5 * torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(out[0, :, 36:], image[0, :, 36:])


def test_heatmap_overlap_blends_by_map_value():
    image = torch.zeros(1, 2, 2, 3)
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0] = 1.0
    maps[0, 1] = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    red, green = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    out = render_heatmap(image, maps, colours=[red.tolist(), green.tolist()], alpha=1.0)
    torch.testing.assert_close(out[0, 0, 0], (red + green) / 2)
    torch.testing.assert_close(out[0, 0, 1], (red + 0.5 * green) / 1.5)
    torch.testing.assert_close(out[0, 1, 0], red)
    # maps with batch 1 apply to every image of the batch
    batch = render_heatmap(torch.rand(3, 2, 2, 3), maps)
    assert batch.shape == (3, 2, 2, 3) and batch.min() >= 0 and batch.max() <= 1
    with pytest.raises(ValueError, match="colours given"):
        render_heatmap(image, maps, colours=[red.tolist()])


def test_legend_swatches_and_text():
    words = ["dog", "Cat2", ""]
    colours = palette(3)
    legend = render_legend(words, colours, width=200, scale=2)
    boxes = legend_swatch_boxes(3, scale=2)
    assert legend.shape == (boxes[-1][2] + 4, 200, 3)  # rows end with one padding
    for (top, left, bottom, right), colour in zip(boxes, colours):
        swatch = legend[top:bottom, left:right]
        assert swatch.shape[0] > 0 and swatch.shape[1] > 0
        assert torch.equal(swatch, colour.expand_as(swatch))
    black = (legend == 0).all(dim=-1)
    for (top, left, bottom, right), word in zip(boxes, words):
        text_pixels = black[top:bottom, right:].sum().item()
        assert (text_pixels > 0) == bool(word)
    # fixed height pads or clips
    assert render_legend(words, colours, height=10, width=50).shape == (10, 50, 3)
    assert render_legend(["x"], height=100, width=50)[60:].eq(1).all()


def test_draw_text_glyphs():
    canvas = torch.zeros(7, 30, 3)
    end = draw_text(canvas, "I1", 0, 0, (1.0, 1.0, 1.0))
    assert end == 12
    lit = canvas[..., 0]
    # 'I': rows 0 and 6 are .###., the middle column between
    assert lit[0, :5].tolist() == [0, 1, 1, 1, 0] and lit[3, :5].tolist() == [0, 0, 1, 0, 0]
    lower, upper = torch.zeros(7, 6, 3), torch.zeros(7, 6, 3)
    draw_text(lower, "q", 0, 0, (1, 1, 1))
    draw_text(upper, "Q", 0, 0, (1, 1, 1))
    assert torch.equal(lower, upper) and lower.sum() > 0
    unknown = torch.zeros(7, 6, 3)
    draw_text(unknown, "\u00e9", 0, 0, (1, 1, 1))
    assert unknown.sum() > 0  # drawn as '?', not skipped
    draw_text(torch.zeros(3, 4, 3), "WIDE TEXT", -2, -1, (1, 1, 1), scale=3)  # clipped, no error


def test_heatmap_with_legend_stacks_under_image():
    image = torch.rand(2, 32, 64, 3)
    maps = torch.rand(2, 2, 4, 8)
    out = render_heatmap_with_legend(image, maps, ["dog", "cat"])
    heat = render_heatmap(image, maps)
    assert out.shape[0] == 2 and out.shape[2] == 64 and out.shape[1] > 32
    assert torch.equal(out[:, :32], heat)
    assert torch.equal(out[0, 32:], out[1, 32:])
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="one word per subject"):
        render_heatmap_with_legend(image, maps, ["dog"])


def test_adds_from_several_threads_are_all_counted():
    """A sampler that splits its batch over devices (ComfyUI 0.33) records from one thread per device."""
    import threading
    recorder = AttentionMapRecorder()
    probs = torch.full((1, 2, 16), 0.25)
    threads = [threading.Thread(target=lambda: [recorder.add(probs, 4, 4) for _ in range(200)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorder.count == 1600
    assert torch.equal(recorder.maps(), probs.reshape(1, 2, 4, 4)), "an add was lost"
