"""Writing the tests' model files."""
from pathlib import Path

from safetensors.torch import save_file


def save_half(state_dict: dict, path: Path) -> None:
    """Floating tensors in fp16, as most published checkpoints: half the disk of fp32."""
    save_file({key: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
               for key, tensor in state_dict.items()}, path)
