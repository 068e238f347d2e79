"""FastComposer's fusion written straight from docs/methods.md §1.3, for float64 comparisons (no pack code)."""
import math

import torch


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def mlp(x, params, prefix):
    hidden = layer_norm(x, params[f"{prefix}.layernorm.weight"], params[f"{prefix}.layernorm.bias"])
    hidden = hidden @ params[f"{prefix}.fc1.weight"].T + params[f"{prefix}.fc1.bias"]
    hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
    return hidden @ params[f"{prefix}.fc2.weight"].T + params[f"{prefix}.fc2.bias"]


def fuse(text, embed, params):
    """text, embed: (..., D); params: the postfuse_module tensors without their prefix."""
    fused = mlp(torch.cat([text, embed], -1), params, "mlp1") + text
    fused = mlp(fused, params, "mlp2") + fused
    return layer_norm(fused, params["layer_norm.weight"], params["layer_norm.bias"])
