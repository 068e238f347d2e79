"""Reading weight files safely: safetensors directly, pickles only through weights-only unpickling."""
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header (whose length may start with 0x80).
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= Path(path).stat().st_size - 8:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # zip-based torch.save, or a raw pickle


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a flat tensor dict from .safetensors or a PyTorch pickle, refusing anything that needs code to unpickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        if looks_like_pickle(path):
            raise ValueError(f"{path.name} is a PyTorch pickle, not safetensors: rename it to .bin "
                             f"(it is then read with weights-only unpickling) or convert it")
        return load_file(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path.name}: expected a .safetensors file or a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)})")
    try:
        # Memory-map zip-based files so the weights are paged in, not copied; legacy pickles cannot be mapped.
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise ValueError(f"{path.name} could not be read as a plain tensor state dict ({error}); "
                         f"this pack never unpickles arbitrary objects") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path.name} holds a {type(state_dict).__name__}, expected a flat dict of tensors")
    return state_dict
