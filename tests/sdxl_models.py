"""SDXL base models built by ComfyUI itself from its own SDXL configuration, with seeded random weights."""
import torch

from random_modules import randomise

SDXL_UNET = {  # ComfyUI's SDXL base UNet configuration (comfy/supported_models.py, model_detection.py)
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def random_sdxl(dtype: torch.dtype, seed: int):
    """(UNet model, CLIP): ComfyUI's SDXL BaseModel and its two text encoders, seeded random weights in dtype."""
    import comfy.model_detection
    import comfy.sd
    import comfy.sdxl_clip
    config = comfy.model_detection.model_config_from_unet_config({**SDXL_UNET, "dtype": dtype})
    assert type(config).__name__ == "SDXL"
    config.set_inference_dtype(dtype, None)
    unet = config.get_model({}, "")
    randomise(unet, seed=seed)

    class SDXLText:
        clip, tokenizer, params = comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer, {}

    clip = comfy.sd.CLIP(target=SDXLText(), model_options={"dtype": dtype})
    randomise(clip.cond_stage_model, seed=seed + 1)
    return unet, clip
