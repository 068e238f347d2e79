"""Nested Attention encoder side: layer tables, subject resampler, nested projections, adapter format and import."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ipadapter_files import Weights, plus_resampler
from subject_personalization.encoders.ipadapter_plus import ip_resampler_config, resampler_key
from subject_personalization.encoders.nested_adapter import (NestedAdapter, check_compatible, load_nested_adapter,
                                                              new_nested_adapter, save_nested_adapter)
from subject_personalization.encoders.nested_projections import NestedProjections
from subject_personalization.encoders.official_nested_import import import_official_nested
from subject_personalization.encoders.subject_resampler import ResamplerConfig, SubjectResampler
from subject_personalization.encoders.unet_layers import (cross_attention_layers, from_diffusers_name,
                                                           to_diffusers_name)


def tiny_config(**overrides) -> ResamplerConfig:
    return ResamplerConfig(**{"vision_width": 1024, "num_queries": 4, "depth": 2, "width": 64, "heads": 4,
                              "output_width": 768, "ff_mult": 2, **overrides})


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (LayerNorm affine included), so that no parameter is checked only at its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


# --- layer tables -------------------------------------------------------------------------------------------

def test_layer_tables():
    sd15, sdxl = cross_attention_layers("sd15"), cross_attention_layers("sdxl")
    assert len(sd15) == 16 and len(sdxl) == 70
    assert len({l.key for l in sd15}) == 16 and len({l.key for l in sdxl}) == 70
    sd15_dims = {l.block[:2]: l.inner_dim for l in sd15}
    assert sd15_dims == {("input", 1): 320, ("input", 2): 320, ("input", 4): 640, ("input", 5): 640,
                         ("input", 7): 1280, ("input", 8): 1280, ("middle", 0): 1280,
                         **{("output", i): 1280 for i in (3, 4, 5)}, **{("output", i): 640 for i in (6, 7, 8)},
                         **{("output", i): 320 for i in (9, 10, 11)}}
    assert all(l.heads == 8 and l.block[2] == 0 for l in sd15)
    assert all(l.heads * 64 == l.inner_dim for l in sdxl)
    per_block = {}
    for l in sdxl:
        per_block.setdefault(l.block[:2], []).append(l.block[2])
    assert per_block[("input", 4)] == [0, 1] and per_block[("output", 5)] == [0, 1]
    assert per_block[("middle", 0)] == list(range(10)) and per_block[("output", 0)] == list(range(10))
    assert {l.block[:2]: l.inner_dim for l in sdxl}[("input", 7)] == 1280
    assert next(l for l in sdxl if l.block == ("input", 4, 1)).key == "input_4_1"


def test_diffusers_names_round_trip():
    assert to_diffusers_name(("output", 0, 5)) == "up_blocks.0.attentions.0.transformer_blocks.5.attn2"
    assert from_diffusers_name("up_blocks.0.attentions.0.transformer_blocks.5.attn2") == ("output", 0, 5)
    assert to_diffusers_name(("input", 1, 0)) == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert to_diffusers_name(("input", 8, 0)) == "down_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert to_diffusers_name(("output", 11, 0)) == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    assert to_diffusers_name(("middle", 0, 9)) == "mid_block.attentions.0.transformer_blocks.9.attn2"
    assert to_diffusers_name(("input", 4, 1)) == "down_blocks.1.attentions.0.transformer_blocks.1.attn2"
    for family in ("sd15", "sdxl"):
        names = [to_diffusers_name(l.block) for l in cross_attention_layers(family)]
        assert len(set(names)) == len(names)
        assert [from_diffusers_name(n) for n in names] == [l.block for l in cross_attention_layers(family)]
    with pytest.raises(ValueError, match="not a diffusers attn2 name"):
        from_diffusers_name("up_blocks.0.attentions.0.transformer_blocks.5.attn1")


# --- resampler ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vision_width,num_queries,depth,width,heads,output_width", [
    (1024, 16, 1, 64, 4, 768), (1280, 4, 2, 128, 8, 2048), (1024, 256, 1, 32, 2, 768), (1280, 1, 3, 64, 1, 768)])
def test_resampler_shapes(vision_width, num_queries, depth, width, heads, output_width):
    config = tiny_config(vision_width=vision_width, num_queries=num_queries, depth=depth, width=width, heads=heads,
                         output_width=output_width)
    resampler = SubjectResampler(config)
    assert resampler(torch.randn(2, 257, vision_width)).shape == (2, num_queries, output_width)
    assert resampler(torch.randn(2, 3, 257, vision_width)).shape == (2, num_queries, output_width)
    with pytest.raises(ValueError, match=f"expects {vision_width}-wide"):
        resampler(torch.randn(1, 257, 1024 + 1280 - vision_width))


def test_config_round_trip_and_validation():
    config = tiny_config(identity_width=512, identity_tokens=2, norm_after_projection=True)
    assert ResamplerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="num_queries"):
        tiny_config(num_queries=257)
    with pytest.raises(ValueError, match="set together"):
        tiny_config(identity_width=512)
    with pytest.raises(ValueError, match="unknown resampler config fields: colour"):
        ResamplerConfig.from_dict({"colour": 1})


def test_identity_tokens_are_appended():
    resampler = randomised(SubjectResampler(tiny_config(identity_width=512, identity_tokens=3)))
    image, identity = torch.randn(2, 257, 1024), torch.randn(2, 512)
    out = resampler(image, identity)
    assert out.shape == (2, 4 + 3, 768)
    base = resampler.base_token
    expected = base + resampler.identity(identity).view(2, 3, 768)
    torch.testing.assert_close(out[:, 4:], expected)
    with pytest.raises(ValueError, match="needs an ArcFace identity embedding"):
        resampler(image)
    with pytest.raises(ValueError, match="has no identity branch"):
        SubjectResampler(tiny_config())(image, identity)


def test_several_images_average_the_output_tokens():
    resampler = randomised(SubjectResampler(tiny_config(identity_width=512, identity_tokens=2))).double()
    images, identities = torch.randn(2, 3, 257, 1024, dtype=torch.float64), torch.randn(2, 3, 512, dtype=torch.float64)
    together = resampler(images, identities)
    separately = torch.stack([resampler(images[:, i], identities[:, i]) for i in range(3)]).mean(0)
    torch.testing.assert_close(together, separately, rtol=1e-12, atol=1e-12)


def _layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + 1e-5) * weight + bias


@pytest.mark.parametrize("norm_after_projection", [False, True])
def test_resampler_matches_an_explicit_float64_computation(norm_after_projection):
    config = tiny_config(depth=1, width=32, heads=4, num_queries=5, output_width=48,
                         norm_after_projection=norm_after_projection)
    resampler = randomised(SubjectResampler(config), seed=1).double()
    p = {name: t.detach() for name, t in resampler.named_parameters()}
    image = torch.randn(2, 257, 1024, dtype=torch.float64)

    x = image @ p["proj_in.weight"].T + p["proj_in.bias"]
    q0 = p["queries"].expand(2, -1, -1)
    xn = _layer_norm(x, p["blocks.0.0.norm_image.weight"], p["blocks.0.0.norm_image.bias"])
    qn = _layer_norm(q0, p["blocks.0.0.norm_queries.weight"], p["blocks.0.0.norm_queries.bias"])
    context = torch.cat([xn, qn], dim=1)
    heads, d = 4, 8
    q = (qn @ p["blocks.0.0.to_q.weight"].T).view(2, 5, heads, d)
    kv = context @ p["blocks.0.0.to_kv.weight"].T
    k, v = kv[..., :32].reshape(2, -1, heads, d), kv[..., 32:].reshape(2, -1, heads, d)
    weights = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", q, k) / math.sqrt(d), dim=-1)
    attended = torch.einsum("bhmn,bnhd->bmhd", weights, v).reshape(2, 5, 32) @ p["blocks.0.0.to_out.weight"].T
    h = q0 + attended
    hidden = _layer_norm(h, p["blocks.0.1.0.weight"], p["blocks.0.1.0.bias"]) @ p["blocks.0.1.1.weight"].T
    h = h + (0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))) @ p["blocks.0.1.3.weight"].T
    if norm_after_projection:
        out = _layer_norm(h @ p["proj_out.weight"].T + p["proj_out.bias"], p["norm_out.weight"], p["norm_out.bias"])
    else:
        out = _layer_norm(h, p["norm_out.weight"], p["norm_out.bias"]) @ p["proj_out.weight"].T + p["proj_out.bias"]
    torch.testing.assert_close(resampler(image), out + p["base_token"], rtol=1e-10, atol=1e-10)


def ip_adapter_resampler_reference(s: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """IP-Adapter's resampler.py `Resampler.forward` (newest: pos_emb, to_latents_from_mean_pooled_seq), restated from
    its code in float64 on its own state-dict names; PerceiverAttention's inner width is heads * dim_head."""
    batch = x.shape[0]
    if "pos_emb.weight" in s:
        x = x + s["pos_emb.weight"][:x.shape[1]]  # self.pos_emb(torch.arange(n))
    latents = s["latents"].repeat(batch, 1, 1)
    x = x @ s["proj_in.weight"].T + s["proj_in.bias"]
    if "to_latents_from_mean_pooled_seq.1.weight" in s:
        mean = x.sum(dim=1) / x.shape[1]  # masked_mean with an all-ones mask
        pooled = _layer_norm(mean, s["to_latents_from_mean_pooled_seq.0.weight"], s["to_latents_from_mean_pooled_seq.0.bias"])
        pooled = pooled @ s["to_latents_from_mean_pooled_seq.1.weight"].T + s["to_latents_from_mean_pooled_seq.1.bias"]
        latents = torch.cat([pooled.reshape(batch, -1, latents.shape[-1]), latents], dim=-2)  # Rearrange b (n d) -> b n d
    for n in range(len({key.split(".")[1] for key in s if key.startswith("layers.")})):
        p = {key[len(f"layers.{n}."):]: value for key, value in s.items() if key.startswith(f"layers.{n}.")}
        image = _layer_norm(x, p["0.norm1.weight"], p["0.norm1.bias"])
        normed = _layer_norm(latents, p["0.norm2.weight"], p["0.norm2.bias"])
        q = normed @ p["0.to_q.weight"].T
        k, v = (torch.cat([image, normed], dim=-2) @ p["0.to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weight = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(batch, latents.shape[1], -1) @ p["0.to_out.weight"].T
        latents = out + latents
        hidden = _layer_norm(latents, p["1.0.weight"], p["1.0.bias"]) @ p["1.1.weight"].T
        latents = (0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))) @ p["1.3.weight"].T + latents
    out = latents @ s["proj_out.weight"].T + s["proj_out.bias"]
    return _layer_norm(out, s["norm_out.weight"], s["norm_out.bias"])


@pytest.mark.parametrize("max_seq_len,pooled", [(0, 0), (300, 0), (0, 3), (257, 2)])
def test_ip_adapter_resampler_options_compute_as_ip_adapter(max_seq_len, pooled):
    """Attention wider than the queries (3 heads of 64 over width 96), learned positions, mean-pooled queries."""
    weights = Weights(seed=4, dtype=torch.float64)
    state = plus_resampler(weights, dim=96, depth=2, dim_head=64, heads=3, num_queries=5, embedding_dim=1024,
                           output_dim=768, ff_mult=2, max_seq_len=max_seq_len, num_latents_mean_pooled=pooled)
    renamed = {resampler_key(key): tensor for key, tensor in state.items()}
    config = ip_resampler_config(renamed)
    assert (config.inner_width, config.heads, config.position_embeddings, config.pooled_queries, config.tokens) == \
        (192, 3, max_seq_len, pooled, 5 + pooled)
    resampler = SubjectResampler(config).double()
    resampler.load_state_dict({key[len("resampler."):]: value for key, value in renamed.items()}
                              | {"base_token": torch.zeros(768, dtype=torch.float64)})
    image = torch.randn(2, 257, 1024, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(resampler(image), ip_adapter_resampler_reference(state, image, heads=3),
                                   rtol=1e-10, atol=1e-10)
    if max_seq_len:
        with pytest.raises(ValueError, match=f"learned positions for {max_seq_len} image tokens, got {max_seq_len + 1}"):
            resampler(torch.randn(1, max_seq_len + 1, 1024, dtype=torch.float64))


def test_optional_parts_are_absent_by_default_and_configs_are_checked():
    keys = set(SubjectResampler(tiny_config()).state_dict())
    assert not any(key.startswith(("position_embedding", "pooled_queries")) for key in keys)
    assert tiny_config(attention_width=64).attention_width is None  # the same as width: one spelling
    assert tiny_config(attention_width=128) != tiny_config()
    with pytest.raises(ValueError, match="attention width 102 is not divisible by heads 4"):
        tiny_config(attention_width=102)
    with pytest.raises(ValueError, match="pooled_queries must be an integer >= 0"):
        tiny_config(pooled_queries=-1)
    with pytest.raises(ValueError, match="num_queries \\+ pooled_queries must be at most 256"):
        tiny_config(num_queries=250, pooled_queries=7)


# --- projections --------------------------------------------------------------------------------------------

def test_projections_are_plain_matmuls_and_init_from_base():
    layers = cross_attention_layers("sd15")
    projections = NestedProjections(layers, 768)
    tokens = torch.randn(2, 6, 768)
    out = projections.project(tokens)
    assert list(out) == [l.key for l in layers]
    for key, kv in projections.maps.items():
        torch.testing.assert_close(out[key][0], tokens @ kv.to_k.weight.T)
        torch.testing.assert_close(out[key][1], tokens @ kv.to_v.weight.T)

    to_k = {l.key: torch.randn(l.inner_dim, 768) for l in layers}
    to_v = {l.key: torch.randn(l.inner_dim, 768) for l in layers}
    projections.init_from_base(to_k, to_v)
    c = torch.randn(768)
    out = projections.project(c.expand(1, 6, 768))
    for l in layers:
        # V~ == base to_v(c), K~ == base to_k(c), up to float32 summation order over 768 terms
        torch.testing.assert_close(out[l.key][1], (to_v[l.key] @ c).expand(1, 6, -1), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out[l.key][0], (to_k[l.key] @ c).expand(1, 6, -1), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="missing \\['input_1_0'"):
        projections.init_from_base({k: v for k, v in to_k.items() if k != "input_1_0"}, to_v)


# --- adapter ------------------------------------------------------------------------------------------------

def base_weights(family="sd15", seed=0):
    generator = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(family)
    width = 768 if family == "sd15" else 2048
    return tuple({l.key: torch.randn(l.inner_dim, width, generator=generator) for l in layers} for _ in range(2))


def tiny_adapter(**overrides) -> NestedAdapter:
    to_k, to_v = base_weights()
    arguments = {"base_family": "sd15", "vision_width": 1024, "subject_domain": "pet", "initializer_word": "dog",
                 "initializer_embeddings": {"l": torch.randn(768)}, "initializer_context": torch.randn(768),
                 "base_to_k": to_k, "base_to_v": to_v, "num_queries": 4, "depth": 1, "width": 64, "heads": 4, **overrides}
    return new_nested_adapter(**arguments)


def test_new_adapter_starts_at_the_initializer_word():
    context, embedding = torch.randn(768), torch.randn(768)
    adapter = tiny_adapter(initializer_context=context, initializer_embeddings={"l": embedding},
                           identity_width=512, identity_tokens=2)
    tokens = adapter.resampler(torch.randn(3, 2, 257, 1024), torch.randn(3, 512))
    assert tokens.shape == (3, 6, 768)
    assert torch.equal(tokens, context.expand(3, 6, 768))
    assert torch.equal(adapter.placeholder_embeddings["l"].detach(), embedding)
    _, to_v = base_weights()
    for layer in adapter.layers:
        torch.testing.assert_close(adapter.projections.project(tokens)[layer.key][1][0, 0], to_v[layer.key] @ context,
                                   rtol=1e-5, atol=1e-4)
    same_seed = tiny_adapter(initializer_context=context)
    assert torch.equal(same_seed.resampler.queries, tiny_adapter().resampler.queries)
    with pytest.raises(ValueError, match="needs initializer embeddings for text encoders \\['g', 'l'\\]"):
        new_nested_adapter("sdxl", 1280, "person", "man", {"l": torch.randn(768)}, torch.randn(2048), {}, {})


def test_adapters_written_before_the_optional_resampler_parts_load_the_same(tmp_path):
    """Files whose encoder metadata predates attention_width / pooled_queries / position_embeddings."""
    adapter = randomised(tiny_adapter())
    path = tmp_path / "old.safetensors"
    save_nested_adapter(path, adapter)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    encoder = json.loads(metadata["encoder"])
    for name in ("attention_width", "pooled_queries", "position_embeddings"):
        del encoder[name]
    save_file(tensors, path, metadata=metadata | {"encoder": json.dumps(encoder)})
    loaded = load_nested_adapter(path)
    assert loaded.resampler.config == adapter.resampler.config
    image = torch.randn(1, 257, 1024)
    assert torch.equal(loaded.resampler(image), adapter.resampler(image))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    adapter = randomised(tiny_adapter())
    adapter.special_token_weight = 0.7
    adapter.provenance = {"dataset": "oxford-pets", "steps": 1000, "base_checkpoint_sha256": "ab12"}
    save_nested_adapter(tmp_path / "dog.safetensors", adapter)
    loaded = load_nested_adapter(tmp_path / "dog.safetensors")
    assert loaded.state_dict().keys() == adapter.state_dict().keys()
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.metadata() == adapter.metadata()
    assert (loaded.name, loaded.special_token_weight, loaded.provenance["steps"]) == ("dog", 0.7, 1000)
    assert loaded.resampler.config == adapter.resampler.config
    with safe_open(str(tmp_path / "dog.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "nested_attention_adapter" and metadata["base_family"] == "sd15"
    assert json.loads(metadata["clip_vision"]) == {"name": "ViT-L/14", "hidden_width": 1024,
                                                   "hidden_state": "penultimate", "trained_layers": 0}
    assert json.loads(metadata["layers"])[0] == {"key": "input_1_0", "inner_dim": 320, "heads": 8}
    image = torch.randn(1, 257, 1024)
    assert torch.equal(loaded.resampler(image), adapter.resampler(image))

    half = tiny_adapter().half()
    save_nested_adapter(tmp_path / "half.safetensors", half)
    assert load_nested_adapter(tmp_path / "half.safetensors").resampler.queries.dtype == torch.float16


def test_wrong_files_are_refused_with_what_was_found(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="is a PyTorch pickle.*'nested_attention_adapter' metadata"):
        load_nested_adapter(tmp_path / "adapter.safetensors")
    save_file({"latents": torch.zeros(1, 4, 8)}, tmp_path / "plain.safetensors", metadata={"author": "x"})
    with pytest.raises(ValueError, match=r"found metadata keys \['author'\] and 1 tensors, expected format"):
        load_nested_adapter(tmp_path / "plain.safetensors")
    save_file({"a": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "ip_adapter"})
    with pytest.raises(ValueError, match="found format 'ip_adapter'"):
        load_nested_adapter(tmp_path / "other.safetensors")


def test_check_compatible_names_both_sides():
    adapter = tiny_adapter()
    adapter.name = "dog_v1"
    check_compatible(adapter, "sd15", 768, 1024)
    with pytest.raises(ValueError, match=r"adapter dog_v1 was trained for sd15 \(context 768\) but the MODEL is "
                                         r"sdxl \(context 2048\)"):
        check_compatible(adapter, "sdxl", 2048, 1024)
    with pytest.raises(ValueError, match=r"expects ViT-L/14 \(1024-wide tokens\), got 1280-wide tokens \(ViT-H/14\): "
                                         r"load the matching CLIP vision model"):
        check_compatible(adapter, "sd15", 768, 1280)


# --- official import ----------------------------------------------------------------------------------------

def official_like(width=64, depth=2, queries=4, vision=1280):
    """A checkpoint in the layout official_nested_import.py assumes; stride-0 zeros keep the 70 SDXL maps cheap."""
    state = {"image_proj.latents": torch.randn(1, queries, width), "image_proj.proj_in.weight": torch.randn(width, vision),
             "image_proj.proj_in.bias": torch.randn(width), "image_proj.proj_out.weight": torch.randn(2048, width),
             "image_proj.proj_out.bias": torch.randn(2048), "image_proj.norm_out.weight": torch.randn(2048),
             "image_proj.norm_out.bias": torch.randn(2048)}
    for i in range(depth):
        for name in ("norm1", "norm2"):
            state.update({f"image_proj.layers.{i}.0.{name}.weight": torch.randn(width),
                          f"image_proj.layers.{i}.0.{name}.bias": torch.randn(width)})
        state.update({f"image_proj.layers.{i}.0.to_q.weight": torch.randn(width, width),
                      f"image_proj.layers.{i}.0.to_kv.weight": torch.randn(2 * width, width),
                      f"image_proj.layers.{i}.0.to_out.weight": torch.randn(width, width),
                      f"image_proj.layers.{i}.1.0.weight": torch.randn(width),
                      f"image_proj.layers.{i}.1.0.bias": torch.randn(width),
                      f"image_proj.layers.{i}.1.1.weight": torch.randn(4 * width, width),
                      f"image_proj.layers.{i}.1.3.weight": torch.randn(width, 4 * width)})
    for layer in cross_attention_layers("sdxl"):
        for kv in "kv":
            name = f"unet.{to_diffusers_name(layer.block)}.processor.to_{kv}_nest.weight"
            state[name] = torch.zeros(1).expand(layer.inner_dim, 2048)
    return state


def test_official_import_under_the_assumed_layout():
    state = official_like()
    embeddings = {"l": torch.randn(768), "g": torch.randn(1280)}
    adapter = import_official_nested(state, "person", embeddings)
    config = adapter.resampler.config
    assert (config.vision_width, config.num_queries, config.width, config.depth, config.ff_mult) == (1280, 4, 64, 2, 4)
    assert config.norm_after_projection and adapter.base_family == "sdxl"
    assert torch.equal(adapter.resampler.blocks[1][0].norm_queries.weight, state["image_proj.layers.1.0.norm2.weight"])
    assert torch.equal(adapter.placeholder_embeddings["g"], embeddings["g"])
    check_compatible(adapter, "sdxl", 2048, 1280)
    assert adapter.resampler(torch.randn(1, 257, 1280)).shape == (1, 4, 2048)

    with pytest.raises(ValueError, match="2 keys fit no layout the official import accepts.*: image_proj.pos_emb, "
                                         "optimizer; expected a resampler"):
        import_official_nested(state | {"image_proj.pos_emb": torch.zeros(1), "optimizer": torch.zeros(1)},
                               "person", embeddings)
    missing = {k: v for k, v in state.items() if "mid_block" not in k}
    with pytest.raises(ValueError, match="missing projections.maps.middle_0_0"):
        import_official_nested(missing, "person", embeddings)
