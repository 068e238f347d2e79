"""FastComposer checkpoints with seeded random weights in the official file's exact layout (keys, shapes, dtypes).

The layout (`fastcomposer_layout.tsv`) was derived by instantiating the public training module under the
library versions it was released with. Two forms:
- independent: every tensor its own draw (5.5 GB); the host tier's exactness tests use it;
- light: every tensor a view of one seeded block per scale (fan-in), so `torch.save` stores each block once and
  the file is about 0.7 GB. It goes through the same loader, the same split and the same ComfyUI model
  construction; its weights only repeat across layers. The main job's self-check uses it.
"""
import math
from pathlib import Path

import torch

from ..encoders.kill_safe import written_beside

LAYOUT_FILE = Path(__file__).with_name("fastcomposer_layout.tsv")
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def read_layout() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rows = []
    for line in LAYOUT_FILE.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(size) for size in shape.split("x")), DTYPES[dtype]))
    return rows


def _scale(key: str, shape: tuple[int, ...]) -> str | int:
    """How a tensor is drawn: 'bias', 'norm' or 'vector', or the fan-in of a weight."""
    name = key.rsplit(".", 2)[-2] + "." + key.rsplit(".", 1)[-1]
    if key.endswith(".bias"):
        return "bias"
    if len(shape) == 1:
        return "norm" if "norm" in name or "ln" in name else "vector"
    return math.prod(shape[1:])


def _draw(scale: str | int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Scales chosen so a random UNet, VAE and both CLIP towers stay finite and non-trivial."""
    values = torch.randn(shape, generator=generator)
    if scale == "norm":
        return 1.0 + values * 0.05
    if scale in ("bias", "vector"):
        return values * 0.02
    return values / math.sqrt(scale)


def _dtype(key: str, dtype: torch.dtype, vae_dtype: torch.dtype) -> torch.dtype:
    """The VAE is stored in bf16 (the release mixes dtypes), everything else as the layout says."""
    return vae_dtype if key.startswith("vae.") else dtype


def random_fastcomposer_state_dict(seed: int = 0, vae_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor drawn on its own."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape, dtype in read_layout():
        if dtype == torch.int64:  # position_ids buffers
            state_dict[key] = torch.arange(shape[-1]).view(shape)
        else:
            state_dict[key] = _draw(_scale(key, shape), shape, generator).to(_dtype(key, dtype, vae_dtype))
    return state_dict


def light_fastcomposer_state_dict(seed: int = 0, vae_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor a view of the block of its scale and dtype, drawn once at the largest size that scale needs."""
    layout = [(key, shape, _scale(key, shape), _dtype(key, dtype, vae_dtype)) for key, shape, dtype in read_layout()
              if dtype != torch.int64]
    sizes: dict[tuple, int] = {}
    for _, shape, scale, dtype in layout:
        sizes[scale, dtype] = max(sizes.get((scale, dtype), 0), math.prod(shape))
    generator = torch.Generator().manual_seed(seed)
    blocks = {(scale, dtype): _draw(scale, (size,), generator).to(dtype) for (scale, dtype), size in sizes.items()}
    state_dict = {key: torch.arange(shape[-1]).view(shape) for key, shape, dtype in read_layout() if dtype == torch.int64}
    for key, shape, scale, dtype in layout:
        state_dict[key] = blocks[scale, dtype][:math.prod(shape)].view(shape)
    return state_dict


def write_random_fastcomposer(path: str | Path, seed: int = 0, light: bool = False) -> Path:
    """Write a .bin (zip pickle, as released) or, for the independent form, a .safetensors file."""
    path = Path(path)
    if light and path.suffix != ".bin":
        raise ValueError("the light form shares storage between tensors, which only a .bin (torch.save) keeps")
    state_dict = (light_fastcomposer_state_dict if light else random_fastcomposer_state_dict)(seed)
    with written_beside(path) as partial:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(state_dict, partial)
        else:
            torch.save(state_dict, partial)
    return path
