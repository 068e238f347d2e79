"""What a ComfyUI MODEL / CLIP is, in the terms of this pack: base family, attn2 weights, tokenizers."""
import torch

from ..encoders.unet_layers import CONTEXT_WIDTH, CrossAttentionLayer, cross_attention_layers

# ComfyUI's attn2 parameter paths inside the UNet, per block name.
_BLOCK_PATHS = {"input": "input_blocks.{id}.1", "middle": "middle_block.1", "output": "output_blocks.{id}.1"}


def model_family(model) -> str:
    """'sd15' or 'sdxl' for a MODEL, or a clear error naming what it is."""
    config = model.model.model_config
    name = type(config).__name__
    context = config.unet_config.get("context_dim")
    if name == "SD15" and context == CONTEXT_WIDTH["sd15"]:
        return "sd15"
    if name in ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B") and context == CONTEXT_WIDTH["sdxl"]:
        return "sdxl" if name == "SDXL" else _unsupported(name, context)
    return _unsupported(name, context)


def _unsupported(name: str, context) -> str:
    raise ValueError(f"this MODEL is {name} (context width {context}); the subject attention patch supports SD1.5 and SDXL UNets")


def attn2_weights(model, layers: list[CrossAttentionLayer], projection: str) -> dict[str, torch.Tensor]:
    """The base UNet's attn2 to_k or to_v weight of each layer (by layer key), as float32 copies on the CPU."""
    unet = model.model.diffusion_model
    weights = {}
    for layer in layers:
        block_name, block_id, index = layer.block
        path = _BLOCK_PATHS[block_name].format(id=block_id) + f".transformer_blocks.{index}.attn2.{projection}"
        weights[layer.key] = unet.get_submodule(path).weight.detach().float().cpu().clone()
    return weights


def model_cross_attention_layers(model) -> list[CrossAttentionLayer]:
    """The MODEL's attn2 layers with their actual widths and head counts (the family's table for full-size UNets)."""
    unet = model.model.diffusion_model
    layers = []
    for layer in cross_attention_layers(model_family(model)):
        block_name, block_id, index = layer.block
        attention = unet.get_submodule(_BLOCK_PATHS[block_name].format(id=block_id) + f".transformer_blocks.{index}.attn2")
        layers.append(CrossAttentionLayer(layer.key, layer.block, attention.to_k.out_features, attention.heads))
    return layers


def clip_tokenizers(clip) -> dict[str, object]:
    """{'l': tokenizer} for SD1.5, {'l': ..., 'g': ...} for SDXL: ComfyUI's per-encoder tokenizers."""
    return {key: getattr(clip.tokenizer, f"clip_{key}") for key in clip.tokenize("").keys()}
