"""The one place where the ComfyUI versions the pack supports (0.8.0 to 0.33.0, README) differ for it.

Everything else the pack calls (attention replacement and its extra_options, model wrappers, transformer_options,
CLIP vision outputs, folder_paths, the classic node API) is the same in all; docs/comfyui_versions.md says what
changed between them and what the pack does about it.
"""
import inspect

import comfy.sd

# 0.16 and later load a checkpoint for DynamicVRAM on NVIDIA GPUs unless told not to (its loader's disable_dynamic)
_CAN_DISABLE_DYNAMIC = "disable_dynamic" in inspect.signature(comfy.sd.load_checkpoint_guess_config).parameters


def load_checkpoint_resident(path: str) -> tuple:
    """(MODEL, CLIP, VAE) of a checkpoint file through ComfyUI's own loader, the UNet's weights held as ordinary
    parameters: the trainer runs the frozen UNet forward and backward itself, which DynamicVRAM's offloaded weights
    (cast per operation) are not made for."""
    options = {"disable_dynamic": True} if _CAN_DISABLE_DYNAMIC else {}
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True, **options)[:3]


__all__ = ["load_checkpoint_resident"]
