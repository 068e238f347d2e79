"""One training step's mathematics against a frozen ComfyUI UNet: noising, the target, the subject attention.

The UNet is ComfyUI's own module, called the way ComfyUI's BaseModel calls it, with an attn2 replacement
that applies `attention.subject_attention` (the function the inference patch uses) with per-row nested
keys/values that carry gradients back to the adapter; or, with attention = "decoupled", IP-Adapter's ungated
decoupled cross-attention over the same keys/values (`decoupled_attention`).
"""
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from ..attention.localization_loss import balanced_localization_loss
from ..attention.subject_attention import SubjectBinding, plain_attention, subject_attention
from ..attention.subject_masks import layer_query_mask
from ..nodes.subject_patch import layer_key

# FastComposer supervises the middle levels: down 1-2, mid, up 1-2 (docs/methods.md §1.5), in ComfyUI's block ids.
LOCALIZATION_BLOCKS = {"sd15": {("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
                                ("output", 3), ("output", 4), ("output", 5), ("output", 6), ("output", 7), ("output", 8)},
                       "sdxl": {("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
                                ("output", 0), ("output", 1), ("output", 2), ("output", 3), ("output", 4), ("output", 5)}}
DECOUPLED_SCALE = 1.0  # IP-Adapter trains its image attention at scale 1; users change it at inference


def prediction_target(model_sampling, sigma: torch.Tensor, latent: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """The model output that ComfyUI's sampler turns into exactly `latent`, in the model's own prediction type.

    ComfyUI's `calculate_denoised` is affine in the model output for every prediction type (eps, v, x0, flow):
    denoised = a + b * output. Solving a + b * target = latent gives the target: the noise for eps models,
    v for v-prediction models.
    """
    sigma = sigma.reshape(-1, *([1] * (latent.ndim - 1)))
    offset = model_sampling.calculate_denoised(sigma, torch.zeros_like(noisy), noisy)
    slope = model_sampling.calculate_denoised(sigma, torch.ones_like(noisy), noisy) - offset
    return (latent - offset) / slope


class TrainingAttention:
    """attn2 replacements that apply this step's subject bindings and collect the subject attention maps (nested), or
    add the subjects IP-Adapter's way (decoupled)."""

    def __init__(self, family: str, record_localization: bool):
        self.localization_blocks = LOCALIZATION_BLOCKS[family] if record_localization else set()
        self.token_index: list[torch.Tensor] = []              # per subject slot: (B,) positions, -1 = absent
        self.nested: list[dict] = []                           # per slot: layer key -> (K~, V~), each (B, M, inner)
        self.probs: list[tuple[torch.Tensor, tuple[int, int]]] = []  # (B, S, N) per supervised layer call

    def set_step(self, token_index: list[torch.Tensor], nested: list[dict]) -> None:
        self.token_index, self.nested, self.probs = token_index, nested, []

    def replacement(self, q, k, v, extra_options):
        key = layer_key(extra_options)
        bindings = [SubjectBinding(index, keys_values[key][0], keys_values[key][1], 1.0)
                    for index, keys_values in zip(self.token_index, self.nested)]
        if tuple(extra_options["block"]) not in self.localization_blocks:
            return subject_attention(q, k, v, extra_options["n_heads"], bindings)
        out, probs = subject_attention(q, k, v, extra_options["n_heads"], bindings, return_subject_probs=True)
        # The loss in float32 whatever dtype the UNet computes in (fp16 or bf16 on most GPUs).
        self.probs.append((probs.float(), tuple(extra_options["activations_shape"][-2:])))
        return out

    def decoupled(self, q, k, v, extra_options):
        """The attn2 replacement for attention = "decoupled": every present subject added to every query, ungated."""
        key = layer_key(extra_options)
        subjects = [(index >= 0, *keys_values[key]) for index, keys_values in zip(self.token_index, self.nested)]
        return decoupled_attention(q, k, v, extra_options["n_heads"], subjects, DECOUPLED_SCALE)

    def localization_loss(self, masks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """masks (B, S, h, w) at latent resolution, present (B, S): the balanced loss averaged over layer calls."""
        losses = [balanced_localization_loss(probs, _layer_masks(masks, size), present) for probs, size in self.probs]
        return torch.stack(losses).mean()


def decoupled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        subjects: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """IP-Adapter's decoupled cross-attention (Ye et al., 2023), ungated, per head:

        out = softmax(q K^T / sqrt(d)) V + scale * sum_i softmax(q K_i^T / sqrt(d)) V_i

    subjects: per subject i, (rows (B,) bool: the rows that carry it, K_i, V_i (B, M, H*d)), K_i = E_i A_k and
    V_i = E_i A_v its tokens through this layer's maps, the nested keys/values. Rows that carry no subject are plain
    attention bit for bit. Both terms through the pack's kernel (plain_attention: SDPA at its default scale)."""
    out = plain_attention(q, k, v, heads)
    for rows, keys, values in subjects:
        if bool(rows.any()):  # rows live on the CPU (token positions): no device sync
            image = plain_attention(q, keys.to(q), values.to(q), heads)
            out = torch.where(rows.to(q.device)[:, None, None], out + scale * image, out)
    return out


def _layer_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    batch, slots = masks.shape[:2]
    flat = masks.reshape(batch * slots, *masks.shape[2:])
    return torch.cat([layer_query_mask(mask, *size) for mask in flat]).reshape(batch, slots, -1)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, pixel_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per row; with pixel weights (B, h, w), the mean over the weighted pixels only."""
    error = (prediction.float() - target.float()).square().mean(dim=1)  # (B, h, w)
    if pixel_weight is None:
        return error.mean()
    weight = pixel_weight.to(error)
    return ((error * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp_min(1e-6)).mean()


@contextmanager
def gradient_checkpointing(unet, enabled: bool):
    """Recompute each ResBlock's and transformer's activations in the backward pass instead of storing them."""
    if not enabled:
        yield
        return
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    wrapped = [module for module in unet.modules() if isinstance(module, (ResBlock, SpatialTransformer))]
    for module in wrapped:
        module.forward = _checkpointed(type(module).forward.__get__(module))
    try:
        yield
    finally:
        for module in wrapped:
            del module.forward


def _checkpointed(forward):
    def run(*args, **kwargs):
        # ComfyUI updates transformer_options (block, block_index) in place as it walks the UNet: the recomputation
        # in the backward pass must see this call's values, so it gets its own shallow copy.
        args = tuple(dict(arg) if isinstance(arg, dict) else arg for arg in args)
        kwargs = {name: dict(value) if isinstance(value, dict) else value for name, value in kwargs.items()}
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def noised(model_sampling, latent: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly drawn training timestep per row, and the latent noised to it: (sigma (B,), noisy latent)."""
    steps = torch.randint(0, len(model_sampling.sigmas), (latent.shape[0],), generator=generator)
    sigma = model_sampling.sigmas[steps].to(latent)
    noise = torch.randn(latent.shape, generator=generator).to(latent)
    return sigma, model_sampling.noise_scaling(sigma.reshape(-1, 1, 1, 1), noise, latent)
