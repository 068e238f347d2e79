"""The cross-attention ("attn2") layers of the SD1.5 and SDXL UNets, in ComfyUI's patch-key terms.

ComfyUI addresses an attn2 layer by `(block_name, block_id, transformer_index)`: the UNet block list
("input" / "middle" / "output") and position as in `input_blocks` / `output_blocks`, and the index of
the transformer block inside that block's SpatialTransformer. Diffusers names the same layer
`{down,mid,up}_blocks.B.attentions.A.transformer_blocks.T.attn2`.

IP-Adapter files number their per-layer weights `ip_adapter.<i>` by position in diffusers'
`UNet2DConditionModel.attn_processors`, which lists every attention module (attn1 and attn2) in module
registration order: `down_blocks`, then `up_blocks`, then `mid_block` (the UNet's __init__ registers the two
ModuleLists before building the mid block), and inside each block attentions[A].transformer_blocks[T].attn1,
attn2. IP-Adapter loads `ModuleList(attn_processors.values())` and diffusers' loader counts `key_id` 1, 3, 5, ...
over the attn2 processors, so the k-th attn2 layer in that order has index 2k + 1 (attn1 entries hold no
weights): SD1.5 1..31 with the middle block last (31), SDXL 1..139 with the middle block 121..139.
"""
import re
from dataclasses import dataclass
from typing import Mapping

CONTEXT_WIDTH = {"sd15": 768, "sdxl": 2048}
HEAD_SIZE_SDXL = 64
HEADS_SD15 = 8

# (block_name, block_ids, inner_dim, transformers per block) for each family.
_LAYOUT = {
    "sd15": [("input", (1, 2), 320, 1), ("input", (4, 5), 640, 1), ("input", (7, 8), 1280, 1),
             ("middle", (0,), 1280, 1),
             ("output", (3, 4, 5), 1280, 1), ("output", (6, 7, 8), 640, 1), ("output", (9, 10, 11), 320, 1)],
    "sdxl": [("input", (4, 5), 640, 2), ("input", (7, 8), 1280, 10),
             ("middle", (0,), 1280, 10),
             ("output", (0, 1, 2), 1280, 10), ("output", (3, 4, 5), 640, 2)],
}
_DIFFUSERS_BLOCK = {"input": "down_blocks", "middle": "mid_block", "output": "up_blocks"}
_DIFFUSERS_REGISTRATION = {"input": 0, "output": 1, "middle": 2}  # down_blocks, up_blocks, then mid_block
_DIFFUSERS_PATTERN = re.compile(r"^(?:(down_blocks|up_blocks)\.(\d+)|mid_block)\.attentions\.(\d+)"
                                r"\.transformer_blocks\.(\d+)\.attn2$")


@dataclass(frozen=True)
class CrossAttentionLayer:
    key: str                        # stable state-dict prefix, e.g. "input_4_1"
    block: tuple[str, int, int]     # ComfyUI patch key (block_name, block_id, transformer_index)
    inner_dim: int                  # heads * head size = width of to_k / to_v outputs
    heads: int


def check_family(base_family: str) -> None:
    if base_family not in _LAYOUT:
        raise ValueError(f"unknown base family {base_family!r}; expected one of {', '.join(_LAYOUT)}")


def layer_key(block: tuple[str, int, int]) -> str:
    return "_".join(str(part) for part in block)


def family_heads(base_family: str, inner_dim: int) -> int:
    """The attn2 head count of the family's UNets for a layer of this width: SD1.5 has 8 heads of varying size,
    SDXL heads of size 64."""
    check_family(base_family)
    heads = HEADS_SD15 if base_family == "sd15" else inner_dim // HEAD_SIZE_SDXL
    if heads < 1 or inner_dim % heads:
        raise ValueError(f"an attn2 layer {inner_dim} wide does not split into {base_family} heads "
                         f"({'8 heads' if base_family == 'sd15' else 'heads of 64'})")
    return heads


def cross_attention_layers(base_family: str) -> list[CrossAttentionLayer]:
    """Every attn2 layer of the family's UNet, in forward order (input, middle, output)."""
    check_family(base_family)
    layers = []
    for block_name, block_ids, inner_dim, transformers in _LAYOUT[base_family]:
        heads = family_heads(base_family, inner_dim)
        for block_id in block_ids:
            for index in range(transformers):
                block = (block_name, block_id, index)
                layers.append(CrossAttentionLayer(layer_key(block), block, inner_dim, heads))
    return layers


def to_diffusers_name(block: tuple[str, int, int]) -> str:
    """ComfyUI patch key -> diffusers module name of the same attn2 layer (same for SD1.5 and SDXL)."""
    block_name, block_id, index = block
    if block_name == "middle":
        return f"mid_block.attentions.0.transformer_blocks.{index}.attn2"
    if block_name == "input":
        # Each diffusers down block is 3 input blocks: 2 (resnet + attention) then a downsampler.
        down, attention = divmod(block_id - 1, 3)
    elif block_name == "output":
        # Each diffusers up block is 3 output blocks (resnet + attention [+ upsampler]).
        down, attention = divmod(block_id, 3)
    else:
        raise ValueError(f"unknown block name {block_name!r}; expected input, middle or output")
    return f"{_DIFFUSERS_BLOCK[block_name]}.{down}.attentions.{attention}.transformer_blocks.{index}.attn2"


def from_diffusers_name(name: str) -> tuple[str, int, int]:
    """Diffusers attn2 module name -> ComfyUI patch key; inverse of `to_diffusers_name`."""
    match = _DIFFUSERS_PATTERN.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a diffusers attn2 name like "
                         f"'up_blocks.0.attentions.0.transformer_blocks.5.attn2'")
    blocks, number, attention, index = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    if blocks is None:
        return ("middle", 0, index)
    if blocks == "down_blocks":
        return ("input", 3 * int(number) + attention + 1, index)
    return ("output", 3 * int(number) + attention, index)


def ip_adapter_layers(base_family: str) -> dict[int, CrossAttentionLayer]:
    """IP-Adapter's index `i` of `ip_adapter.<i>` -> the attn2 layer it belongs to (see the module docstring)."""
    in_diffusers_order = sorted(cross_attention_layers(base_family),  # stable: forward order inside each block list
                                key=lambda layer: _DIFFUSERS_REGISTRATION[layer.block[0]])
    return {2 * position + 1: layer for position, layer in enumerate(in_diffusers_order)}


def layers_with_widths(base_family: str, inner_dims: Mapping[str, int]) -> list[CrossAttentionLayer]:
    """The family's attn2 layers with the inner widths a file gives by layer key (a layer it does not give keeps the
    family's width), heads as the family's UNets split them."""
    return [CrossAttentionLayer(layer.key, layer.block, width, family_heads(base_family, width))
            if (width := inner_dims.get(layer.key)) is not None else layer for layer in cross_attention_layers(base_family)]
