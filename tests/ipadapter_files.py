"""IP-Adapter files for tests: seeded random weights in the published layouts (keys, shapes, fp16 as released).

Layouts, as tencent-ailab/IP-Adapter builds and saves them (ip_adapter/ip_adapter.py, ip_adapter_faceid.py,
resampler.py, attention_processor_faceid.py) and diffusers 0.42.1 reads them (loaders/unet.py
`_convert_ip_adapter_image_proj_to_diffusers`, `_convert_ip_adapter_attn_to_diffusers`, `_load_ip_adapter_loras`):
  .bin = torch.save({"image_proj": {...}, "ip_adapter": {...}}); .safetensors = the same keys as image_proj.<key>,
  ip_adapter.<key>. ip_adapter.<i>: i numbers diffusers' attn_processors, attn2 layers odd.
  Plus: Resampler(dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult); published:
    SD1.5 (IPAdapterPlus.init_proj)  dim=768 (cross_attention_dim), depth=4, dim_head=64, heads=12, num_queries=16,
                                     embedding_dim=1280 (ViT-H/14 hidden_size), output_dim=768, ff_mult=4
    SDXL (IPAdapterPlusXL.init_proj) dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=1280,
                                     output_dim=2048, ff_mult=4
  Plain (ImageProjModel): proj (4 * D, image_embeds), norm (D). Full Face (MLPProjModel): proj.0 (W, W), proj.2 (D, W),
  proj.3 LayerNorm(D). FaceID (MLPProjModel of ip_adapter_faceid.py): proj.0 (1024, 512), proj.2 (4 D, 1024), norm (D).
  FaceID Plus (ProjPlusModel): the same + perceiver_resampler (FacePerceiverResampler: proj_in, proj_out, norm_out,
  layers.<n>.0/1 as the Plus resampler). FaceID LoRA: every processor i has to_{q,k,v,out}_lora.{down,up}.weight.
"""
from pathlib import Path

import torch
from safetensors.torch import save_file

from subject_personalization.encoders.unet_layers import CONTEXT_WIDTH, ip_adapter_layers

PLUS_RESAMPLER = {
    "sd15": dict(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=768, ff_mult=4),
    "sdxl": dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=1280, output_dim=2048,
                 ff_mult=4),
}


class Weights:
    """Seeded random tensors at the scale of a trained model's: linear maps ~ N(0, 1/fan_in), LayerNorm gains near 1."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.generator, self.dtype = torch.Generator().manual_seed(seed), dtype

    def normal(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.generator) * std).to(self.dtype)

    def linear(self, prefix: str, out_features: int, in_features: int, bias: bool = True) -> dict[str, torch.Tensor]:
        tensors = {f"{prefix}.weight": self.normal(out_features, in_features, std=in_features ** -0.5)}
        return tensors | ({f"{prefix}.bias": self.normal(out_features, std=0.02)} if bias else {})

    def layer_norm(self, prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": (1 + self.normal(width, std=0.1).float()).to(self.dtype),
                f"{prefix}.bias": self.normal(width, std=0.05)}


def plus_resampler(weights: Weights, dim: int, depth: int, dim_head: int, heads: int, num_queries: int,
                   embedding_dim: int, output_dim: int, ff_mult: int, max_seq_len: int = 0,
                   num_latents_mean_pooled: int = 0, with_latents: bool = True) -> dict[str, torch.Tensor]:
    """IP-Adapter's Resampler state dict (with its optional pos_emb / to_latents_from_mean_pooled_seq when asked);
    without latents it is FacePerceiverResampler's."""
    inner = dim_head * heads
    state = {"latents": weights.normal(1, num_queries, dim, std=dim ** -0.5)} if with_latents else {}
    state |= weights.linear("proj_in", dim, embedding_dim) | weights.linear("proj_out", output_dim, dim)
    state |= weights.layer_norm("norm_out", output_dim)
    for n in range(depth):
        state |= weights.layer_norm(f"layers.{n}.0.norm1", dim) | weights.layer_norm(f"layers.{n}.0.norm2", dim)
        state |= weights.linear(f"layers.{n}.0.to_q", inner, dim, bias=False)
        state |= weights.linear(f"layers.{n}.0.to_kv", 2 * inner, dim, bias=False)
        state |= weights.linear(f"layers.{n}.0.to_out", dim, inner, bias=False)
        state |= weights.layer_norm(f"layers.{n}.1.0", dim)
        state |= weights.linear(f"layers.{n}.1.1", dim * ff_mult, dim, bias=False)
        state |= weights.linear(f"layers.{n}.1.3", dim, dim * ff_mult, bias=False)
    if max_seq_len:
        state["pos_emb.weight"] = weights.normal(max_seq_len, embedding_dim, std=0.1)
    if num_latents_mean_pooled:
        state |= weights.layer_norm("to_latents_from_mean_pooled_seq.0", dim)
        state |= weights.linear("to_latents_from_mean_pooled_seq.1", dim * num_latents_mean_pooled, dim)
    return state


def layer_maps(weights: Weights, family: str, widths: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """ip_adapter.<i>.to_{k,v}_ip.weight for every attn2 layer; widths by index (default: the family's)."""
    context, state = CONTEXT_WIDTH[family], {}
    for index, layer in ip_adapter_layers(family).items():
        inner = layer.inner_dim if widths is None else widths[index]
        for kv in "kv":
            state[f"{index}.to_{kv}_ip.weight"] = weights.normal(inner, context, std=context ** -0.5)
    return state


def ip_adapter_plus(family: str, seed: int = 0, dtype: torch.dtype = torch.float16, widths: dict[int, int] | None = None,
                    **resampler) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj", "ip_adapter"} of an IP-Adapter Plus; the published resampler unless `resampler` overrides sizes."""
    weights = Weights(seed, dtype)
    return {"image_proj": plus_resampler(weights, **(PLUS_RESAMPLER[family] | resampler)),
            "ip_adapter": layer_maps(weights, family, widths)}


def lora_maps(weights: Weights, family: str, rank: int = 4) -> dict[str, torch.Tensor]:
    """The FaceID family's LoRA on every processor (attn1 on even numbers, attn2 on odd), narrow: hidden width 8."""
    state = {}
    for index in range(2 * len(ip_adapter_layers(family))):
        source = CONTEXT_WIDTH[family] if index % 2 else 8
        for name, width_in in (("to_q", 8), ("to_k", source), ("to_v", source), ("to_out", 8)):
            state[f"{index}.{name}_lora.down.weight"] = weights.normal(rank, width_in)
            state[f"{index}.{name}_lora.up.weight"] = weights.normal(8, rank)
    return state


def other_variant(variant: str, family: str = "sd15", seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A non-Plus IP-Adapter in its real key layout, narrow (attn2 layers 8 wide): plain | full_face | faceid |
    faceid_plus."""
    weights, context = Weights(seed, torch.float16), CONTEXT_WIDTH[family]
    narrow = {index: 8 for index in ip_adapter_layers(family)}
    if variant == "plain":
        image_proj = weights.linear("proj", 4 * context, 1024) | weights.layer_norm("norm", context)
    elif variant == "full_face":
        image_proj = weights.linear("proj.0", 1280, 1280) | weights.linear("proj.2", context, 1280)
        image_proj |= weights.layer_norm("proj.3", context)
    elif variant in ("faceid", "faceid_plus"):
        image_proj = weights.linear("proj.0", 1024, 512) | weights.linear("proj.2", 4 * context, 1024)
        image_proj |= weights.layer_norm("norm", context)
        if variant == "faceid_plus":
            perceiver = plus_resampler(weights, dim=context, depth=4, dim_head=64, heads=context // 64, num_queries=4,
                                       embedding_dim=1280, output_dim=context, ff_mult=4, with_latents=False)
            image_proj |= {f"perceiver_resampler.{key}": tensor for key, tensor in perceiver.items()}
    else:
        raise ValueError(f"unknown variant {variant!r}")
    ip_adapter = layer_maps(weights, family, narrow)
    if variant.startswith("faceid"):
        ip_adapter |= lora_maps(weights, family)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def flattened(grouped: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The .safetensors form's keys: image_proj.<key>, ip_adapter.<key>."""
    return {f"{group}.{key}": tensor for group, tensors in grouped.items() for key, tensor in tensors.items()}


def write_ip_adapter(path: Path, grouped: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Written as released: a .bin pickles the dict of dicts, a .safetensors holds the flattened keys."""
    if path.suffix == ".bin":
        torch.save(grouped, path)
    else:
        save_file({key: tensor.contiguous() for key, tensor in flattened(grouped).items()}, path)
    return path


def assert_same_adapter(loaded, expected, vision_hidden: torch.Tensor) -> None:
    """`loaded` computes what `expected` computes, bit for bit: subject tokens from the CLIP vision hidden states, and
    every layer's nested keys and values from them."""
    with torch.no_grad():
        tokens = expected.subject_tokens(vision_hidden)
        assert torch.equal(loaded.subject_tokens(vision_hidden), tokens)
        ours, theirs = expected.projections.project(tokens), loaded.projections.project(tokens)
    for key, (keys, values) in ours.items():
        assert torch.equal(theirs[key][0], keys) and torch.equal(theirs[key][1], values), key
