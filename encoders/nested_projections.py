"""Per cross-attention layer, the nested key/value maps A_k, A_v: subject tokens (D) -> that layer's K~, V~
(docs/methods.md §2.1)."""
import torch
from torch import nn

from .unet_layers import CrossAttentionLayer


class KeyValueMap(nn.Module):
    def __init__(self, context_width: int, inner_dim: int):
        super().__init__()
        self.to_k = nn.Linear(context_width, inner_dim, bias=False)
        self.to_v = nn.Linear(context_width, inner_dim, bias=False)


class NestedProjections(nn.Module):
    def __init__(self, layers: list[CrossAttentionLayer], context_width: int):
        super().__init__()
        self.context_width = context_width
        self.maps = nn.ModuleDict({layer.key: KeyValueMap(context_width, layer.inner_dim) for layer in layers})

    def project(self, subject_tokens: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(B, M, D) -> {layer key: (K~ (B, M, inner), V~ (B, M, inner))}; depends only on the image, so once per generation."""
        return {key: (kv.to_k(subject_tokens), kv.to_v(subject_tokens)) for key, kv in self.maps.items()}

    @torch.no_grad()
    def init_from_base(self, to_k: dict[str, torch.Tensor], to_v: dict[str, torch.Tensor]) -> None:
        """Copy the base model's own attn2 to_k / to_v weights (inner, D), so that K~, V~ of the initializer word's
        context vector are exactly the base model's key and value of that word."""
        for name, weights in (("to_k", to_k), ("to_v", to_v)):
            missing, unexpected = sorted(set(self.maps) - set(weights)), sorted(set(weights) - set(self.maps))
            if missing or unexpected:
                raise ValueError(f"base {name} weights do not match the adapter's layers: "
                                 f"missing {missing[:4]}, unexpected {unexpected[:4]}")
            for key, kv in self.maps.items():
                linear = getattr(kv, name)
                if tuple(weights[key].shape) != tuple(linear.weight.shape):
                    raise ValueError(f"base {name} of layer {key} has shape {tuple(weights[key].shape)}, "
                                     f"expected {tuple(linear.weight.shape)}")
                linear.weight.copy_(weights[key])
