"""Subject attention maps: record, average, turn into masks, and draw as a labelled heatmap.

Plain torch, no ComfyUI import. The sampler patch calls `subject_attention(..., return_subject_probs=True)`,
which gives per layer call each subject token's attention probability per image token, averaged over
heads: (B, S, N) with N = h*w of that layer. `AttentionMapRecorder.add` takes exactly that.

Layer and step selection is the caller's job: the recorder averages every map it is given, each
`add()` call weighing the same. A caller that wants "up-blocks at 16x16, steps 5-15 only" checks the
layer key / resolution and the current step (or sigma) before calling `add()`; with recording off
it simply never builds a recorder or calls `add()` (zero cost). `add()` does no host sync.

Images follow ComfyUI's layout: IMAGE (B, H, W, 3) floats in [0, 1], MASK (B, H, W) floats in [0, 1].
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AttentionMapRecorder", "infer_layer_size", "normalise_maps", "maps_to_masks", "palette",
    "render_heatmap", "render_legend", "legend_swatch_boxes", "render_heatmap_with_legend", "draw_text",
]


def infer_layer_size(tokens: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """(h, w) of a UNet layer with `tokens` image tokens, for a latent of the given size.

    UNet downsampling halves each side rounding up (stride-2 conv, padding 1), so a layer at factor f
    has h = ceil(H / f), w = ceil(W / f). Tries f = 1, 2, 4, ... 64.
    """
    for level in range(7):
        factor = 2 ** level
        h, w = -(-latent_height // factor), -(-latent_width // factor)
        if h * w == tokens:
            return h, w
    raise ValueError(
        f"{tokens} image tokens is no power-of-two downsampling of a {latent_height}x{latent_width} latent")


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, C, h, w) to size (half-pixel centres; antialiased when shrinking)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[0] * maps.shape[1] == 0:
        return maps.new_zeros(*maps.shape[:2], *size)
    shrink = maps.shape[-2] > size[0] or maps.shape[-1] > size[1]
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


class AttentionMapRecorder:
    """Running average of per-subject attention maps over the layer calls and steps given to `add()`.

    Maps of every layer resolution are summed per resolution (float32, detached, on the device of the
    first input) and resized only in `maps()`: bilinear resizing is linear, so resizing the sums equals
    summing the resized maps, and `add()` stays a single in-place addition. The output resolution is
    the fixed `resolution` given here, or else the largest (by h*w) resolution seen.
    """

    def __init__(self, resolution: tuple[int, int] | None = None) -> None:
        if resolution is not None:
            resolution = (int(resolution[0]), int(resolution[1]))
            if min(resolution) < 1:
                raise ValueError(f"resolution must be two positive sizes (H, W), got {resolution}")
        self.resolution = resolution
        self._lock = threading.Lock()  # a sampler that splits its batch over devices adds from one thread per device
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        self._sums: dict[tuple[int, int], Tensor] = {}
        self._count = 0
        self._rows: tuple[int, int] | None = None  # (B, S) of the first add
        self._device: torch.device | None = None

    @property
    def count(self) -> int:
        """How many maps (layer calls x steps) were added since the last reset."""
        return self._count

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """Layer resolutions (h, w) seen since the last reset."""
        return list(self._sums)

    def add(self, probs: Tensor, height: int, width: int) -> None:
        """Add one layer call's subject probabilities (B, S, N), N = height * width (row-major image tokens)."""
        if probs.ndim != 3:
            raise ValueError(f"expected subject probabilities (B, S, N), got shape {tuple(probs.shape)}")
        batch, subjects, tokens = probs.shape
        if height * width != tokens:
            raise ValueError(
                f"probabilities have N={tokens} image tokens but height*width={height}*{width}={height * width}; "
                f"pass this layer's own h and w")
        with self._lock:
            if self._rows is None:
                self._rows, self._device = (batch, subjects), probs.device
            elif self._rows != (batch, subjects):
                raise ValueError(
                    f"probabilities of shape (B, S) = {(batch, subjects)} after earlier ones of {self._rows}; "
                    f"record one batch layout per recorder (reset() between runs)")
            maps = probs.detach().to(self._device, torch.float32).reshape(batch, subjects, height, width)
            key = (height, width)
            if key in self._sums:
                self._sums[key].add_(maps)
            else:
                self._sums[key] = maps.clone()
            self._count += 1

    def output_size(self) -> tuple[int, int]:
        if self.resolution is not None:
            return self.resolution
        if not self._sums:
            raise RuntimeError("no attention maps recorded yet")
        return max(self._sums, key=lambda hw: (hw[0] * hw[1], hw[0]))

    def maps(self) -> Tensor:
        """The average map (B, S, H, W), float32; probability maps stay in [0, 1]."""
        if not self._count:
            raise RuntimeError("no attention maps recorded yet: add() was never called since the last reset")
        size = self.output_size()
        total = None
        for summed in self._sums.values():
            resized = _resize(summed, size)
            total = resized.clone() if total is None else total.add_(resized)
        return total.div_(self._count)


def normalise_maps(maps: Tensor) -> Tensor:
    """Each map (over the last two dims) scaled to [0, 1] by its maximum; negatives clipped; all-zero stays 0."""
    maps = maps.float().clamp_min(0)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def maps_to_masks(maps: Tensor, threshold: float | None = None, resolution: tuple[int, int] | None = None,
                  normalise: bool = True) -> Tensor:
    """Masks (B*S, H, W) from maps (B, S, h, w) (batch-major: index b*S + s), or (S, H, W) from (S, h, w).

    Each map is normalised to [0, 1] (unless normalise=False), resized bilinearly to `resolution`
    (H, W), the output image size (None: keep h, w), and, with a threshold, made hard: 1 where the
    value is > threshold, else 0.
    """
    if maps.ndim not in (3, 4):
        raise ValueError(f"expected maps (B, S, h, w) or (S, h, w), got shape {tuple(maps.shape)}")
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if normalise:
        flat = normalise_maps(flat)
    if resolution is not None:
        flat = _resize(flat, (int(resolution[0]), int(resolution[1])))
    masks = flat[:, 0].clamp(0, 1)
    if threshold is not None:
        masks = (masks > threshold).to(masks.dtype)
    return masks


# Distinct, saturated colours that read on photos and on a white legend.
_PALETTE = (
    (1.00, 0.15, 0.15),  # red
    (0.15, 0.45, 1.00),  # blue
    (0.10, 0.85, 0.20),  # green
    (1.00, 0.85, 0.10),  # yellow
    (0.85, 0.20, 0.95),  # magenta
    (0.10, 0.90, 0.95),  # cyan
    (1.00, 0.55, 0.05),  # orange
    (0.50, 0.25, 0.90),  # violet
    (0.65, 1.00, 0.30),  # lime
    (1.00, 0.50, 0.75),  # pink
    (0.05, 0.55, 0.50),  # teal
    (0.60, 0.35, 0.15),  # brown
)


def _hsv(hue: float, saturation: float, value: float) -> tuple[float, float, float]:
    sector, frac = divmod(hue * 6, 1)
    p, q, t = value * (1 - saturation), value * (1 - saturation * frac), value * (1 - saturation * (1 - frac))
    return [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][int(sector) % 6]


def palette(count: int) -> Tensor:
    """(count, 3) float32 RGB in [0, 1]: the fixed palette, then each further colour the one of an HSV
    grid farthest (RGB distance) from all colours chosen so far (colours repeat only past 12 + 108)."""
    chosen = torch.tensor(_PALETTE[:count], dtype=torch.float32).reshape(-1, 3)
    if count > len(_PALETTE):
        grid = torch.tensor([_hsv(h / 36, s, v) for h in range(36) for s, v in ((0.9, 0.95), (0.45, 1.0), (0.9, 0.6))],
                            dtype=torch.float32)
        extra = []
        nearest = torch.cdist(grid, chosen).amin(dim=1)
        for _ in range(count - len(_PALETTE)):
            pick = int(nearest.argmax())
            extra.append(grid[pick])
            nearest = torch.minimum(nearest, (grid - grid[pick]).norm(dim=1))
        chosen = torch.cat([chosen, torch.stack(extra)])
    return chosen


def _colours(colours, count: int, device=None) -> Tensor:
    if colours is None:
        out = palette(count)
    else:
        out = torch.as_tensor(colours, dtype=torch.float32).reshape(-1, 3)
        if out.shape[0] < count:
            raise ValueError(f"{out.shape[0]} colours given for {count} subjects")
        out = out[:count].clamp(0, 1)
    return out.to(device)


def render_heatmap(image: Tensor, maps: Tensor, colours=None, alpha: float = 0.6) -> Tensor:
    """Image (B, H, W, 3) with each subject's normalised map tinting it in that subject's colour.

    maps (B or 1, S, h, w) are normalised per map and resized to (H, W). Per pixel, with weights
    m_s in [0, 1]: tint = sum_s m_s c_s / sum_s m_s (overlaps blend by map value), opacity
    a = alpha * max_s m_s, out = (1 - a) image + a tint. Where every map is 0 the image is unchanged.
    """
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"expected an IMAGE (B, H, W, 3), got shape {tuple(image.shape)}")
    if maps.ndim != 4 or maps.shape[0] not in (1, image.shape[0]):
        raise ValueError(
            f"expected maps (B, S, h, w) with B = 1 or the image batch {image.shape[0]}, got {tuple(maps.shape)}")
    batch, height, width, _ = image.shape
    subjects = maps.shape[1]
    if subjects == 0:
        return image.clone()
    weights = _resize(normalise_maps(maps.to(image.device)), (height, width)).clamp(0, 1)  # (B, S, H, W)
    weights = weights.expand(batch, -1, -1, -1)
    rgb = _colours(colours, subjects, image.device)  # (S, 3)
    total = weights.sum(dim=1)  # (B, H, W)
    tint = torch.einsum("bshw,sc->bhwc", weights, rgb) / total.clamp_min(1e-12)[..., None]
    opacity = (alpha * weights.amax(dim=1))[..., None]  # (B, H, W, 1)
    out = image.float() * (1 - opacity) + tint * opacity
    return out.clamp(0, 1).to(image.dtype)


# 5x7 bitmap font: 7 rows per glyph, two hex digits a row, bit 4 = leftmost pixel. Lower case draws as upper.
_FONT_HEX = {
    "A": "0e11111f111111", "B": "1e11111e11111e", "C": "0e11101010110e",
    "D": "1c12111111121c", "E": "1f10101e10101f", "F": "1f10101e101010",
    "G": "0e11101711110f", "H": "1111111f111111", "I": "0e04040404040e",
    "J": "0702020202120c", "K": "11121418141211", "L": "1010101010101f",
    "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e", "P": "1e11111e101010",
    "Q": "0e11111115120d", "R": "1e11111e141211", "S": "0f10100e01011e", "T": "1f040404040404",
    "U": "1111111111110e", "V": "11111111110a04", "W": "1111111515150a",
    "X": "11110a040a1111", "Y": "11110a04040404", "Z": "1f01020408101f",
    "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f",
    "3": "1f02040201110e", "4": "02060a121f0202", "5": "1f101e0101110e",
    "6": "0608101e11110e", "7": "1f010204080808", "8": "0e11110e11110e", "9": "0e11110f01020c",
    " ": "00000000000000", ".": "00000000000c0c", ",": "000000000c0408",
    "-": "0000001f000000", "_": "0000000000001f", "'": "0c040800000000", '"': "0a0a0000000000",
    "!": "04040404040004", "?": "0e110102040004", ":": "000c0c000c0c00", ";": "000c0c000c0408",
    "(": "02040808080402", ")": "08040202020408", "[": "0e08080808080e", "]": "0e02020202020e",
    "/": "00010204081000", "+": "0004041f040400", "=": "00001f001f0000", "*": "0004150e150400",
    "#": "0a0a1f0a1f0a0a", "&": "0c12140815120d", "<": "02040810080402", ">": "08040201020408",
}
_GLYPH_WIDTH, _GLYPH_HEIGHT = 5, 7
_GLYPHS: dict[str, Tensor] = {}


def _glyph(char: str) -> Tensor:
    """(7, 5) bool pixels of one character; unknown characters draw as '?'."""
    char = char.upper() if char.upper() in _FONT_HEX else char
    if char not in _FONT_HEX:
        char = "?"
    if char not in _GLYPHS:
        rows = [int(_FONT_HEX[char][i:i + 2], 16) for i in range(0, 14, 2)]
        _GLYPHS[char] = torch.tensor([[(row >> (4 - col)) & 1 for col in range(5)] for row in rows], dtype=torch.bool)
    return _GLYPHS[char]


def draw_text(canvas: Tensor, text: str, top: int, left: int, colour, scale: int = 1) -> int:
    """Draw `text` into canvas (H, W, 3) in place with the 5x7 font, each font pixel scale x scale;
    clipped at the canvas edges. Returns the x just past the last glyph (1 font pixel spacing)."""
    colour = torch.as_tensor(colour, dtype=canvas.dtype, device=canvas.device)
    height, width = canvas.shape[:2]
    x = left
    for char in text:
        if x >= width:
            break
        pixels = _glyph(char).repeat_interleave(scale, 0).repeat_interleave(scale, 1).to(canvas.device)
        y0, x0 = max(top, 0), max(x, 0)
        y1, x1 = min(top + pixels.shape[0], height), min(x + pixels.shape[1], width)
        if y1 > y0 and x1 > x0:
            region = canvas[y0:y1, x0:x1]
            region[pixels[y0 - top:y1 - top, x0 - x:x1 - x]] = colour
        x += (_GLYPH_WIDTH + 1) * scale
    return x


def _legend_metrics(scale: int) -> tuple[int, int, int]:
    """(padding, row height, swatch side) in pixels."""
    pad = 2 * scale
    swatch = (_GLYPH_HEIGHT + 2) * scale
    return pad, swatch + pad, swatch


def legend_swatch_boxes(count: int, scale: int = 2) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) pixel box (end-exclusive) of each subject's swatch in `render_legend`."""
    pad, row, swatch = _legend_metrics(scale)
    return [(pad + i * row, pad, pad + i * row + swatch, pad + swatch) for i in range(count)]


def render_legend(words: Sequence[str], colours=None, height: int | None = None, width: int = 256,
                  scale: int = 2, background=(1.0, 1.0, 1.0), text_colour=(0.0, 0.0, 0.0)) -> Tensor:
    """Legend strip (H, W, 3) float32: one row per subject, a colour swatch then its word.

    Rows of (9 * scale) px swatches with 2 * scale px padding (see `legend_swatch_boxes`); text is the
    built-in 5x7 font at `scale`. height None fits all rows; a given height pads or clips.
    """
    if scale < 1 or width < 1:
        raise ValueError(f"scale and width must be >= 1, got scale={scale}, width={width}")
    pad, row, swatch = _legend_metrics(scale)
    rgb = _colours(colours, len(words))
    if height is None:
        height = pad + row * len(words)
    canvas = torch.empty(height, width, 3, dtype=torch.float32)
    canvas[:] = torch.as_tensor(background, dtype=torch.float32)
    for (top, left, bottom, right), word, colour in zip(legend_swatch_boxes(len(words), scale), words, rgb):
        canvas[top:bottom, left:right] = colour
        draw_text(canvas, str(word), top + scale, right + pad, text_colour, scale)
    return canvas


def render_heatmap_with_legend(image: Tensor, maps: Tensor, words: Sequence[str], colours=None,
                               alpha: float = 0.6, scale: int | None = None) -> Tensor:
    """`render_heatmap` with the legend of `words` stacked under each image: (B, H + legend, W, 3)."""
    if len(words) != maps.shape[1]:
        raise ValueError(f"{len(words)} words for {maps.shape[1]} subject maps; give one word per subject")
    heat = render_heatmap(image, maps, colours, alpha)
    width = image.shape[2]
    if scale is None:
        scale = max(1, round(width / 256))
    legend = render_legend(words, _colours(colours, len(words)), width=width, scale=scale)
    legend = legend.to(heat.device, heat.dtype).expand(heat.shape[0], -1, -1, -1)
    return torch.cat([heat, legend], dim=1)
