"""The last CLIP vision transformer layers, as an optional trainable part of a Nested Attention adapter.

The same computation and state-dict names as the CLIP encoder layer of ComfyUI and transformers (pre-LayerNorm
self-attention with biases, then a pre-LayerNorm MLP, both residual), so the base model's own layers copy in
unchanged and the adapter carries its fine-tuned copies.
"""
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint_io import numbered_children


@dataclass(frozen=True)
class VisionLayerShape:
    heads: int
    intermediate: int
    activation: str


# By hidden width: ViT-L/14 (OpenAI), ViT-H/14 and ViT-bigG/14 (LAION), as their configs give them.
VISION_LAYER_SHAPES = {1024: VisionLayerShape(16, 4096, "quick_gelu"), 1280: VisionLayerShape(16, 5120, "gelu"),
                       1664: VisionLayerShape(16, 8192, "gelu")}
ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class VisionSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class VisionMLP(nn.Module):
    def __init__(self, width: int, intermediate: int, activation: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, intermediate), nn.Linear(intermediate, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        shape = VISION_LAYER_SHAPES[width]
        self.layer_norm1 = nn.LayerNorm(width)
        self.self_attn = VisionSelfAttention(width, shape.heads)
        self.layer_norm2 = nn.LayerNorm(width)
        self.mlp = VisionMLP(width, shape.intermediate, shape.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def stored_vision_layers(shapes: Mapping[str, tuple[int, ...]], prefix: str, width: int) -> int:
    """How many complete vision layers of this width the state-dict shapes hold under `prefix` (numbered from 0);
    ValueError for a gap or a layer that is partial or of another width."""
    if width not in VISION_LAYER_SHAPES:
        raise ValueError(f"{width}-wide CLIP vision tokens are no known CLIP vision model's "
                         f"(widths {', '.join(map(str, VISION_LAYER_SHAPES))})")
    with torch.device("meta"):  # shapes only
        layer = {key: tuple(value.shape) for key, value in VisionLayer(width).state_dict().items()}
    return numbered_children(shapes, prefix, layer)


def run_vision_layers(layers: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
    """(..., tokens, W) hidden states -> the same after every layer; leading dims (photos per subject) are flattened."""
    if len(layers) == 0:
        return hidden
    flat = hidden.reshape(-1, *hidden.shape[-2:])
    for layer in layers:
        flat = layer(flat)
    return flat.reshape(hidden.shape)
