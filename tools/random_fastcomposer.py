"""A FastComposer checkpoint with seeded random weights in the official file's exact layout (keys, shapes).

The layout (`fastcomposer_layout.tsv`) was derived by instantiating the public training module under the
library versions it was released with. Used by the host-tier tests and by the self-check of
`tools/run_workflow.py`, where no real weights exist.
"""
import math
from pathlib import Path

import torch

LAYOUT_FILE = Path(__file__).with_name("fastcomposer_layout.tsv")
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def read_layout() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rows = []
    for line in LAYOUT_FILE.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(size) for size in shape.split("x")), DTYPES[dtype]))
    return rows


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Scales chosen so a random UNet, VAE and both CLIP towers stay finite and non-trivial."""
    name = key.rsplit(".", 2)[-2] + "." + key.rsplit(".", 1)[-1]
    if key.endswith(".bias"):
        return torch.randn(shape, generator=generator) * 0.02
    if len(shape) == 1 and ("norm" in name or "ln" in name):
        return 1.0 + torch.randn(shape, generator=generator) * 0.05
    if len(shape) == 1:
        return torch.randn(shape, generator=generator) * 0.02
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def random_fastcomposer_state_dict(seed: int = 0, vae_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The VAE is stored in bf16 (the release mixes dtypes), everything else as the layout says."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape, dtype in read_layout():
        if dtype == torch.int64:  # position_ids buffers
            state_dict[key] = torch.arange(shape[-1]).view(shape)
            continue
        tensor = _random_tensor(key, shape, generator)
        state_dict[key] = tensor.to(vae_dtype) if key.startswith("vae.") else tensor
    return state_dict


def write_random_fastcomposer(path: str | Path, seed: int = 0) -> Path:
    """Write a .bin (zip pickle, as released) or .safetensors file."""
    path = Path(path)
    state_dict = random_fastcomposer_state_dict(seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path
