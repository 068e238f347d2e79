"""Writing the tests' model files, and telling a ComfyUI server where they are."""
import json
from pathlib import Path

from safetensors.torch import save_file


def save_half(state_dict: dict, path: Path) -> None:
    """Floating tensors in fp16, as most published checkpoints: half the disk of fp32."""
    save_file({key: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
               for key, tensor in state_dict.items()}, path)


def model_paths_config(path: Path, files: list[Path]) -> Path:
    """An extra_model_paths.yaml that puts each file's directory in the model folder it is named after
    (<...>/checkpoints/x.safetensors: checkpoints); ComfyUI reads a folder's directories one per line."""
    folders: dict[str, set[str]] = {}
    for file in files:
        folders.setdefault(file.parent.name, set()).add(str(file.parent))
    # JSON strings are YAML strings: any character a temporary path may hold is quoted.
    path.write_text("test_models:\n" + "".join(f"    {name}: {json.dumps(chr(10).join(sorted(where)))}\n"
                                                for name, where in sorted(folders.items())))
    return path
