"""Writing the tests' model files, and telling a ComfyUI server where they are."""
import json
from pathlib import Path

from safetensors.torch import save_file


def save_half(state_dict: dict, path: Path, metadata: dict | None = None) -> None:
    """Floating tensors in fp16, as most published checkpoints: half the disk of fp32."""
    save_file({key: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
               for key, tensor in state_dict.items()}, path, metadata)


def save_checkpoint(path: Path, model, clip, vae) -> Path:
    """A checkpoint file as ComfyUI writes one (comfy.sd.save_checkpoint, what its Save Checkpoint node calls): the
    layout and key names the host under test writes and therefore reads; `model` a MODEL (a ModelPatcher). Its floating
    tensors are stored in fp16 as they are written, as most published checkpoints: half the disk, memory and reading
    time of fp32."""
    import comfy.sd
    import comfy.utils
    write = comfy.utils.save_torch_file
    comfy.utils.save_torch_file = lambda state_dict, file, metadata=None: save_half(state_dict, Path(file), metadata)
    try:
        comfy.sd.save_checkpoint(str(path), model, clip, vae)
    finally:
        comfy.utils.save_torch_file = write
    return path


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
