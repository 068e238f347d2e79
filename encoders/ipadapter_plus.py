"""IP-Adapter Plus files as Nested Attention adapters (docs/methods.md §2.5).

IP-Adapter Plus (Ye et al., 2023; tencent-ailab/IP-Adapter, files ip-adapter-plus_sd15, ip-adapter-plus-face_sd15,
ip-adapter-plus_sdxl_vit-h, ip-adapter-plus-face_sdxl_vit-h) is built from a nested adapter's parts: a resampler of
learned queries over CLIP vision penultimate hidden states gives tokens E (M = 16), and every attn2 layer has
bias-free maps to_k_ip, to_v_ip. IP-Adapter adds w * softmax(q K_ip^T / sqrt(d)) V_ip to every query; with
K~ = E A_k = K_ip and V~ = E A_v = V_ip that is the nested value v*_q, which this pack adds only where the subject
word is attended (gated). The weights were trained ungated: how well they serve gated is unmeasured.

Published forms (both read through checkpoint_io; the .bin only with the weights-only unpickler):
  .bin          {"image_proj": {<resampler keys>}, "ip_adapter": {"<i>.to_k_ip.weight": ..., "<i>.to_v_ip.weight": ...}}
  .safetensors  the same tensors, keys flattened: image_proj.<key>, ip_adapter.<i>.to_{k,v}_ip.weight
`<i>` numbers diffusers' attn_processors, attn2 layers on odd numbers (unet_layers.ip_adapter_layers):
SD1.5 1..31, SDXL 1..139; to_{k,v}_ip.weight is (layer inner width, context width 768 | 2048).

Resampler keys (IP-Adapter's resampler.py `Resampler`) -> SubjectResampler (`resampler.` + ...):
  latents (1, M, width)                          queries
  proj_in.{weight,bias} (width, W_vision)        proj_in       W_vision: 1024 ViT-L/14, 1280 ViT-H/14, 1664 ViT-bigG/14
  layers.<n>.0.norm1 / .norm2                    blocks.<n>.0.norm_image / norm_queries (LayerNorms, with biases)
  layers.<n>.0.to_q (inner, width), to_kv (2 inner, width), to_out (width, inner)   no biases; heads = inner / 64
  layers.<n>.1.0 / 1.1 (width*ff_mult, width) / 1.3 (width, width*ff_mult)          LayerNorm, Linear, (GELU), Linear
  proj_out.{weight,bias} (D, width), norm_out (D)                                   tokens = norm_out(proj_out(queries))
  pos_emb.weight (max_seq_len, W_vision)         position_embedding.weight   (newer resampler.py, optional)
  to_latents_from_mean_pooled_seq.{0,1}.*        pooled_queries.{0,1}.*      (newer resampler.py, optional)
This is diffusers' IPAdapterPlusImageProjection and IP-Adapter's Resampler: pre-LayerNorms on image and queries,
one softmax over [image; queries] with scale 1/sqrt(head size) (IP-Adapter scales q and k by head size^-1/4 each),
a bias-free GELU feed-forward after a LayerNorm, residuals around both, then proj_out and norm_out
(`norm_after_projection`). The published Plus resamplers are SD1.5 dim 768, heads 12; SDXL dim 1280, heads 20; both
depth 4, dim_head 64, 16 queries, ViT-H/14 input, ff_mult 4 (IPAdapterPlus / IPAdapterPlusXL in ip_adapter.py).

Choices for what an IP-Adapter file lacks: the resampler's `base_token` is zero (IP-Adapter's image tokens are the
resampler output as it is, not offsets from a word's vector); the subject token s* keeps the bound word's own input
embedding (the caller's `initializer_embeddings`), so the prompt encodes exactly as without the adapter; the hidden
state is the penultimate one (IP-Adapter Plus reads hidden_states[-2]); special_token_weight 1.0; provenance records
the file's name and form. Nothing is inferred from the file name.

Variants, told apart by their keys in the order diffusers' `_convert_ip_adapter_image_proj_to_diffusers` tests them:
  image_proj.proj.weight, norm.*             IP-Adapter (ip-adapter_sd15, _sd15_light, _sd15_vit-G, ip-adapter_sdxl,
                                             _sdxl_vit-h; ImageProjection): refused, see VARIANT_REFUSALS
  image_proj.proj.{0,2,3}.*                  IP-Adapter Full Face (ip-adapter-full-face_sd15): refused
  image_proj.perceiver_resampler.*           IP-Adapter FaceID Plus (ArcFace + CLIP, with LoRA): refused
  image_proj.norm.* with proj.{0,2}.*        IP-Adapter FaceID (ArcFace MLP, with LoRA): refused
  ip_adapter.<i>.to_{q,k,v,out}_lora.*       the FaceID family's LoRA on the UNet's attention: refused
  image_proj.latents, proj_in, layers.*...   IP-Adapter Plus: imported
Any other key is refused, listed.

The inverse, `ip_adapter_plus_state_dict` / `save_ip_adapter_plus`, writes a nested adapter as an IP-Adapter Plus
.safetensors file (what `train` writes with attention = "decoupled"). It holds what IP-Adapter's layout can: the
resampler without a base token, norm_out after proj_out, heads of 64 (a file gives only widths), and the per-layer maps;
no fine-tuned CLIP vision layers, no identity branch. The subject token, domain and word are the loader's caller's.
"""
import json
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from .checkpoint_io import UnreadableFile, listed_keys, read_state_dict
from .kill_safe import written_beside
from .nested_adapter import CLIP_VISION, TEXT_ENCODER_WIDTHS, NestedAdapter, assembled_adapter, placeholder_state
from .subject_resampler import ResamplerConfig
from .unet_layers import CONTEXT_WIDTH, ip_adapter_layers, layers_with_widths

IP_HEAD_SIZE = 64  # IP-Adapter's dim_head in every published resampler; diffusers' loader assumes it too
IP_ADAPTER_FIX = ("use an IP-Adapter Plus file (ip-adapter-plus_sd15, ip-adapter-plus-face_sd15, "
                  "ip-adapter-plus_sdxl_vit-h or ip-adapter-plus-face_sdxl_vit-h from h94/IP-Adapter, .safetensors or "
                  ".bin)")
READ_FIX = f"{IP_ADAPTER_FIX}, downloaded again if it is damaged"  # the file could not be read at all
VARIANT_REFUSALS = {  # an image_proj key that identifies a variant -> why it is not a nested adapter
    "proj.weight": "it is a plain IP-Adapter (image_proj.proj + image_proj.norm, as ip-adapter_sd15, ip-adapter_sdxl): "
                   "its 4 tokens are one linear map of CLIP's pooled image embedding, not of CLIP's hidden states, so "
                   "it has no resampler of per-query tokens to nest, and this pack feeds its adapters hidden states",
    "proj.3.weight": "it is IP-Adapter Full Face (image_proj.proj.0/2/3, as ip-adapter-full-face_sd15): an MLP maps "
                     "each of CLIP's 257 hidden states to a token of its own, with no learned queries, so there is no "
                     "resampler to carry over (and 257 tokens exceed this pack's 256)",
    "perceiver_resampler.proj_in.weight": "it is IP-Adapter FaceID Plus (image_proj.perceiver_resampler.*): it needs an "
                                          "ArcFace face embedding besides CLIP, and LoRA weights in the UNet, which a "
                                          "nested adapter does not carry",
    "norm.weight": "it is IP-Adapter FaceID (image_proj.proj.0/2 + image_proj.norm): its tokens come from an ArcFace "
                   "face embedding, not from CLIP, and it comes with LoRA weights for the UNet",
}
LORA_REFUSAL = ("its ip_adapter weights include LoRA layers (ip_adapter.<i>.to_*_lora.*, the IP-Adapter FaceID "
                "family), which change the UNet's own attention; a nested adapter leaves the UNet as it is")

_RESAMPLER = {  # IP-Adapter resampler name -> SubjectResampler name
    "latents": "queries", "proj_in.weight": "proj_in.weight", "proj_in.bias": "proj_in.bias",
    "proj_out.weight": "proj_out.weight", "proj_out.bias": "proj_out.bias",
    "norm_out.weight": "norm_out.weight", "norm_out.bias": "norm_out.bias",
    "pos_emb.weight": "position_embedding.weight",
    **{f"to_latents_from_mean_pooled_seq.{i}.{p}": f"pooled_queries.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")},
}
_BLOCK = {  # inside layers.<n>.
    "0.norm1.weight": "0.norm_image.weight", "0.norm1.bias": "0.norm_image.bias",
    "0.norm2.weight": "0.norm_queries.weight", "0.norm2.bias": "0.norm_queries.bias",
    "0.to_q.weight": "0.to_q.weight", "0.to_kv.weight": "0.to_kv.weight", "0.to_out.weight": "0.to_out.weight",
    "1.0.weight": "1.0.weight", "1.0.bias": "1.0.bias", "1.1.weight": "1.1.weight", "1.3.weight": "1.3.weight",
}
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_MAP = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
_RESAMPLER_NAME = {ours: theirs for theirs, ours in _RESAMPLER.items()}  # the export's direction
_BLOCK_NAME = {ours: theirs for theirs, ours in _BLOCK.items()}
_ADAPTER_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


class WrongTextEncoders(ValueError):
    """The subject word's embeddings come from the text encoders of another base family than the file's: the caller's
    CLIP is at fault, not the file."""


def resampler_key(name: str) -> str | None:
    """An IP-Adapter resampler tensor name (as under image_proj.) -> the adapter's key, or None if it is not one."""
    if name in _RESAMPLER:
        return f"resampler.{_RESAMPLER[name]}"
    block = _BLOCK_KEY.match(name)
    if block is not None and block.group(2) in _BLOCK:
        return f"resampler.blocks.{block.group(1)}.{_BLOCK[block.group(2)]}"
    return None


def ip_resampler_name(key: str) -> str | None:
    """A SubjectResampler state-dict key (without `resampler.`) -> IP-Adapter's name for it, or None if it has none;
    the inverse of `resampler_key`."""
    if key in _RESAMPLER_NAME:
        return _RESAMPLER_NAME[key]
    block = _ADAPTER_BLOCK_KEY.match(key)
    if block is not None and block.group(2) in _BLOCK_NAME:
        return f"layers.{block.group(1)}.{_BLOCK_NAME[block.group(2)]}"
    return None


def ip_resampler_config(state: Mapping[str, torch.Tensor]) -> ResamplerConfig:
    """The resampler config of adapter tensors renamed from an IP-Adapter resampler (`resampler.*`): sizes from the
    tensors, heads = attention width / 64, IP-Adapter's order proj_out then norm_out. ValueError naming what is off."""
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    inner = shapes.get("resampler.blocks.0.0.to_q.weight", (IP_HEAD_SIZE,))[0]
    if inner % IP_HEAD_SIZE:
        raise ValueError(f"its resampler's attention is {inner} wide, not a multiple of IP-Adapter's head size "
                         f"{IP_HEAD_SIZE}")
    config = ResamplerConfig.from_shapes(shapes, heads=max(inner // IP_HEAD_SIZE, 1), norm_after_projection=True,
                                         prefix="resampler.")
    if config.vision_width not in CLIP_VISION:
        raise ValueError(f"its resampler reads {config.vision_width}-wide CLIP vision tokens, no CLIP vision model "
                         f"known here ({', '.join(f'{width} {name}' for width, name in CLIP_VISION.items())})")
    return config


def _refused_variant(keys: list[str]) -> str | None:
    """Why a non-Plus IP-Adapter cannot be a nested adapter, from its keys; None for anything else."""
    image_proj = {key[len("image_proj."):] for key in keys if key.startswith("image_proj.")}
    for marker, why in VARIANT_REFUSALS.items():
        if marker in image_proj:
            return why
    if any(re.match(r"^ip_adapter\.\d+\.to_\w+_lora\.", key) for key in keys):
        return LORA_REFUSAL
    return None


def nested_adapter_from_ip_adapter(state_dict: Mapping[str, torch.Tensor], initializer_word: str,
                                   initializer_embeddings: dict[str, torch.Tensor], subject_domain: str = "other",
                                   placeholder_word: str = "<subject>", provenance: dict | None = None) -> NestedAdapter:
    """A NestedAdapter computing exactly the IP-Adapter Plus whose flat tensors (published .safetensors keys) these are;
    the family, layer widths and every resampler size come from the tensors, dtypes are kept. `initializer_word`,
    `initializer_embeddings`: the word the subject will be bound to and its input embedding per text encoder ("l"; and
    "g" for SDXL), kept as s*'s embedding; `provenance` adds to {"variant", "note"}. ValueError saying what does not
    fit (variant, unknown keys, sizes)."""
    keys = list(state_dict)
    refusal = _refused_variant(keys)
    if refusal is not None:
        raise ValueError(refusal)
    if "image_proj.latents" not in state_dict:
        raise ValueError(f"it is no IP-Adapter Plus file: it has no image_proj.latents (the resampler's queries); "
                         f"found {len(keys)} tensors: {listed_keys(keys)}")
    renamed, maps, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        group, _, name = key.partition(".")
        target = resampler_key(name) if group == "image_proj" else None
        layer_map = _LAYER_MAP.match(name) if group == "ip_adapter" else None
        if target is not None:
            renamed[target] = tensor
        elif layer_map is not None:
            maps[(int(layer_map.group(1)), layer_map.group(2))] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not IP-Adapter Plus weights: {listed_keys(unknown)}")
    numbers = sorted({number for number, _ in maps})
    family = next((family for family in CONTEXT_WIDTH if sorted(ip_adapter_layers(family)) == numbers), None)
    if family is None:
        nearest = max(CONTEXT_WIDTH, key=lambda name: len(set(ip_adapter_layers(name)) & set(numbers)))
        expected = set(ip_adapter_layers(nearest))
        missing, extra = sorted(expected - set(numbers)), sorted(set(numbers) - expected)
        raise ValueError(f"its ip_adapter weights number {len(numbers)} layers, not the 16 attn2 layers of SD1.5 "
                         f"(1, 3, ..., 31) or the 70 of SDXL (1, 3, ..., 139): as {nearest}, it lacks layers "
                         f"{missing[:8] or 'none'} and has extra layers {extra[:8] or 'none'}")
    config = ip_resampler_config(renamed)
    if config.output_width != CONTEXT_WIDTH[family]:
        raise ValueError(f"its resampler makes {config.output_width}-wide tokens, but its {len(numbers)} layers are "
                         f"those of {family}, whose context is {CONTEXT_WIDTH[family]} wide")
    encoders = sorted(TEXT_ENCODER_WIDTHS[family])
    if sorted(initializer_embeddings) != encoders:
        raise WrongTextEncoders(f"it is an IP-Adapter for {family}, whose text encoders are {encoders}, but the subject "
                                f"word's embeddings come from text encoders {sorted(initializer_embeddings)}: connect "
                                f"the CLIP of the {family} checkpoint the adapter is used with")
    widths = {}
    for number, layer in ip_adapter_layers(family).items():
        for kv in "kv":
            tensor = maps.get((number, kv))
            if tensor is None or tensor.ndim != 2:
                raise ValueError(f"ip_adapter.{number}.to_{kv}_ip.weight is "
                                 f"{'missing' if tensor is None else f'of shape {tuple(tensor.shape)}'}: expected "
                                 f"(inner width, {CONTEXT_WIDTH[family]})")
            renamed[f"projections.maps.{layer.key}.to_{kv}.weight"] = tensor
        widths[layer.key] = maps[(number, "k")].shape[0]
    renamed["resampler.base_token"] = torch.zeros(config.output_width, dtype=renamed["resampler.queries"].dtype)
    renamed.update(placeholder_state(family, initializer_embeddings))
    provenance = {"variant": "IP-Adapter Plus", "note": "trained for IP-Adapter's ungated form; its use gated by the "
                  "subject word is unmeasured", **(provenance or {})}
    return assembled_adapter(family, config, renamed, layers_with_widths(family, widths), subject_domain=subject_domain,
                             initializer_word=initializer_word, placeholder_word=placeholder_word,
                             special_token_weight=1.0, provenance=provenance, vision_hidden_state="penultimate")


def load_ip_adapter_plus(path: str | Path, initializer_word: str, initializer_embeddings: dict[str, torch.Tensor],
                         subject_domain: str = "other", placeholder_word: str = "<subject>") -> NestedAdapter:
    """An IP-Adapter Plus file (.safetensors or .bin) as a NestedAdapter (see `nested_adapter_from_ip_adapter`), named
    after the file; every refusal of the file is an UnreadableFile naming the file, the problem and the fix, and
    embeddings for another family's text encoders a WrongTextEncoders naming the file."""
    path = Path(path)
    state_dict = read_state_dict(path, READ_FIX, grouped=True)
    try:
        adapter = nested_adapter_from_ip_adapter(state_dict, initializer_word, initializer_embeddings, subject_domain,
                                                 placeholder_word, {"source": path.name, "form": path.suffix})
    except WrongTextEncoders as error:  # the file is fine: the fix is the caller's CLIP
        raise WrongTextEncoders(f"{path.name}: {error}") from None
    except ValueError as error:  # the one place the file's structural problems get its name and the fix
        raise UnreadableFile(path, str(error), IP_ADAPTER_FIX) from None
    adapter.name = path.stem
    return adapter


def check_ip_adapter_layout(adapter: NestedAdapter) -> None:
    """ValueError naming what of the adapter an IP-Adapter Plus file cannot hold, and the training option that avoids
    it; None when `ip_adapter_plus_state_dict` loads back as exactly this adapter's tokens and maps."""
    config, resampler = adapter.resampler.config, adapter.resampler
    if len(adapter.vision_layers):
        raise ValueError(f"it carries {len(adapter.vision_layers)} fine-tuned CLIP vision layers, which an IP-Adapter "
                         f"Plus file cannot hold (IP-Adapter reads the CLIP vision model's hidden state as it is): "
                         f"train with train_vision_layers = 0")
    if adapter.vision_hidden_state != "penultimate":
        raise ValueError(f"it reads CLIP vision's {adapter.vision_hidden_state} hidden state, IP-Adapter Plus the "
                         f"penultimate one: train it on the penultimate hidden state")
    inner = config.inner_width
    if inner != config.heads * IP_HEAD_SIZE:
        fix = f"set encoder.heads = {inner // IP_HEAD_SIZE}" if inner % IP_HEAD_SIZE == 0 else \
            f"make encoder.width a multiple of {IP_HEAD_SIZE} and encoder.heads that width / {IP_HEAD_SIZE}"
        raise ValueError(f"its resampler's attention is {inner} wide in {config.heads} heads of "
                         f"{inner // config.heads}, but IP-Adapter's layout fixes the head size at {IP_HEAD_SIZE} (a "
                         f"file gives only the width): {fix}")
    if not config.norm_after_projection:
        raise ValueError("its resampler applies norm_out before proj_out; IP-Adapter's applies it after: train with "
                         "encoder.norm_after_projection = true")
    if resampler.base_token.any():
        raise ValueError("its resampler adds a base token to every subject token, which IP-Adapter's resampler has "
                         "not: train it with attention = 'decoupled' from a fresh start or an IP-Adapter Plus file, "
                         "which keep the base token at zero")
    unnamed = [key for key in resampler.state_dict() if key != "base_token" and ip_resampler_name(key) is None]
    if unnamed:
        raise ValueError(f"its resampler has parts IP-Adapter's has not: {listed_keys(unnamed)}; train without them "
                         f"(no encoder.identity_width)")


def ip_adapter_plus_state_dict(adapter: NestedAdapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors (detached, dtypes kept) in the flat .safetensors layout `nested_adapter_from_ip_adapter`
    reads: image_proj.<IP-Adapter resampler key>, ip_adapter.<i>.to_{k,v}_ip.weight with diffusers' numbering
    (unet_layers.ip_adapter_layers). Loaded back, it gives exactly this adapter's subject tokens and K~, V~; ValueError
    from `check_ip_adapter_layout` where it could not."""
    check_ip_adapter_layout(adapter)
    state = {f"image_proj.{ip_resampler_name(key)}": tensor.detach()
             for key, tensor in adapter.resampler.state_dict().items() if key != "base_token"}
    for number, layer in ip_adapter_layers(adapter.base_family).items():
        maps = adapter.projections.maps[layer.key]
        state[f"ip_adapter.{number}.to_k_ip.weight"] = maps.to_k.weight.detach()
        state[f"ip_adapter.{number}.to_v_ip.weight"] = maps.to_v.weight.detach()
    return state


def save_ip_adapter_plus(path: str | Path, adapter: NestedAdapter) -> None:
    """The adapter as an IP-Adapter Plus .safetensors file (`ip_adapter_plus_state_dict`), its provenance as JSON in the
    metadata; written beside `path` and renamed into place, so no reader ever sees a part of it."""
    tensors = {key: tensor.contiguous() for key, tensor in ip_adapter_plus_state_dict(adapter).items()}
    with written_beside(path) as partial:
        save_file(tensors, str(partial), metadata={"provenance": json.dumps(adapter.provenance)})
