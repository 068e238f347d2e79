"""The one place where the ComfyUI versions the pack supports (0.3.64 to 0.8.0, README) differ for it.

Everything else the pack calls (attention replacement and its extra_options, model wrappers, transformer_options,
CLIP vision outputs, folder_paths, the classic node API) is the same in both; the host tier runs against both.
"""
try:  # 0.8.0: CLIP's image preprocessing lives in clip_model; clip_vision keeps an alias marked for removal
    from comfy.clip_model import clip_preprocess
except ImportError:  # 0.3.64
    from comfy.clip_vision import clip_preprocess

__all__ = ["clip_preprocess"]
