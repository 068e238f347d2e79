"""IP-Adapter files through encoders/ipadapter_plus.py: Plus files of both families and both published forms become the
same nested adapter; every other variant, unknown keys, hostile pickles and damaged files are refused with the file,
the problem and the fix; a nested adapter in IP-Adapter's layout is written as a Plus file that loads back exactly, and
one that is not is refused. Narrow widths (the claims here do not depend on size; tests/host/test_ipadapter_plus.py
checks the published shapes against diffusers)."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

from ipadapter_files import assert_same_adapter, flattened, ip_adapter_plus, other_variant, write_ip_adapter
from subject_personalization.encoders.checkpoint_io import UnreadableFile, read_safetensors
from subject_personalization.encoders.ipadapter_plus import (WrongTextEncoders, ip_adapter_plus_state_dict,
                                                            load_ip_adapter_plus, save_ip_adapter_plus)
from subject_personalization.encoders.nested_adapter import (NestedAdapter, check_compatible, load_nested_adapter,
                                                            save_nested_adapter)
from subject_personalization.encoders.subject_resampler import ResamplerConfig
from subject_personalization.encoders.unet_layers import (CONTEXT_WIDTH, cross_attention_layers, ip_adapter_layers,
                                                         layers_with_widths)

FIX = "use an IP-Adapter Plus file"
EMBEDDINGS = {"sd15": {"l": torch.randn(768)}, "sdxl": {"l": torch.randn(768), "g": torch.randn(1280)}}
NARROW_RESAMPLER = dict(dim=96, depth=2, dim_head=64, heads=2, num_queries=4, ff_mult=2)


def narrow_plus(family: str, seed: int = 0, **resampler) -> dict:
    """A Plus file's tensors, every attn2 layer 64 wide, a small resampler over ViT-H/14 tokens."""
    widths = {index: 64 for index in ip_adapter_layers(family)}
    return ip_adapter_plus(family, seed, widths=widths, **(NARROW_RESAMPLER | {"embedding_dim": 1280,
                                                                               "output_dim": CONTEXT_WIDTH[family]}
                                                          | resampler))


def load(path, family="sd15"):
    return load_ip_adapter_plus(path, "person", EMBEDDINGS[family])


def refused(path, problem: str, family="sd15") -> str:
    with pytest.raises(UnreadableFile) as caught:
        load(path, family)
    message = str(caught.value)
    assert str(path) in message and FIX in message, message
    assert re.search(problem, message), message
    return message


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_both_published_forms_give_the_same_adapter(tmp_path, family):
    grouped = narrow_plus(family)
    from_bin = load(write_ip_adapter(tmp_path / f"plus_{family}.bin", grouped), family)
    from_safetensors = load(write_ip_adapter(tmp_path / f"plus_{family}.safetensors", grouped), family)
    assert from_bin.state_dict().keys() == from_safetensors.state_dict().keys()
    for key, tensor in from_safetensors.state_dict().items():
        assert torch.equal(from_bin.state_dict()[key], tensor), key
    adapter = from_safetensors
    assert adapter.base_family == family and adapter.name == f"plus_{family}"
    config = adapter.resampler.config
    assert (config.vision_width, config.width, config.inner_width, config.heads, config.depth, config.num_queries,
            config.ff_mult, config.output_width, config.norm_after_projection) == \
        (1280, 96, 128, 2, 2, 4, 2, CONTEXT_WIDTH[family], True)
    assert [layer.key for layer in adapter.layers] == [layer.key for layer in cross_attention_layers(family)]
    assert all(layer.inner_dim == 64 for layer in adapter.layers)
    assert [layer.heads for layer in adapter.layers] == [8 if family == "sd15" else 1] * len(adapter.layers)
    assert not adapter.resampler.base_token.any()
    assert torch.equal(adapter.placeholder_embeddings["l"], EMBEDDINGS[family]["l"])
    assert adapter.resampler.queries.dtype == torch.float16  # kept as stored
    for index, layer in ip_adapter_layers(family).items():
        assert torch.equal(adapter.projections.maps[layer.key].to_k.weight, grouped["ip_adapter"][f"{index}.to_k_ip.weight"])
        assert torch.equal(adapter.projections.maps[layer.key].to_v.weight, grouped["ip_adapter"][f"{index}.to_v_ip.weight"])
    assert (adapter.vision_hidden_state, adapter.special_token_weight, adapter.initializer_word) == \
        ("penultimate", 1.0, "person")
    assert adapter.metadata()["clip_vision"] == \
        '{"name": "ViT-H/14", "hidden_width": 1280, "hidden_state": "penultimate", "trained_layers": 0}'
    assert from_bin.provenance["source"] == f"plus_{family}.bin" and from_bin.provenance["form"] == ".bin"
    assert adapter.provenance["variant"] == "IP-Adapter Plus"
    check_compatible(adapter, family, CONTEXT_WIDTH[family], 1280)
    with pytest.raises(ValueError, match=r"expects ViT-H/14 \(1280-wide tokens\), got 1024-wide tokens \(ViT-L/14\)"):
        check_compatible(adapter, family, CONTEXT_WIDTH[family], 1024)


def test_an_imported_adapter_saves_and_loads_bit_exact(tmp_path):
    adapter = load(write_ip_adapter(tmp_path / "plus.safetensors", narrow_plus("sd15")))
    save_nested_adapter(tmp_path / "nested.safetensors", adapter)
    loaded = load_nested_adapter(tmp_path / "nested.safetensors")
    assert loaded.metadata() | {"provenance": ""} == adapter.metadata() | {"provenance": ""}
    assert loaded.provenance == adapter.provenance
    image = torch.randn(1, 257, 1280)
    loaded, adapter = loaded.float(), adapter.float()
    assert torch.equal(loaded.subject_tokens(image), adapter.subject_tokens(image))


@pytest.mark.parametrize("width,name", [(1024, "ViT-L/14"), (1664, "ViT-bigG/14")])
def test_the_clip_vision_model_comes_from_the_resampler_input(tmp_path, width, name):
    adapter = load(write_ip_adapter(tmp_path / "plus.bin", narrow_plus("sd15", embedding_dim=width)))
    assert adapter.vision_width == width and f'"name": "{name}"' in adapter.metadata()["clip_vision"]


@pytest.mark.parametrize("variant,family,problem", [
    ("plain", "sd15", r"plain IP-Adapter \(image_proj\.proj \+ image_proj\.norm.*pooled image embedding"),
    ("plain", "sdxl", r"plain IP-Adapter"),
    ("full_face", "sd15", r"IP-Adapter Full Face \(image_proj\.proj\.0/2/3.*257 hidden states"),
    ("faceid", "sd15", r"IP-Adapter FaceID \(image_proj\.proj\.0/2 \+ image_proj\.norm\).*ArcFace"),
    ("faceid_plus", "sd15", r"IP-Adapter FaceID Plus \(image_proj\.perceiver_resampler.*ArcFace.*LoRA"),
])
def test_other_variants_are_refused_by_name(tmp_path, variant, family, problem):
    for suffix in (".bin", ".safetensors"):
        refused(write_ip_adapter(tmp_path / f"{variant}{suffix}", other_variant(variant, family)), problem, family)


def test_lora_weights_are_refused(tmp_path):
    grouped = narrow_plus("sd15")
    grouped["ip_adapter"]["0.to_q_lora.down.weight"] = torch.zeros(4, 8)
    refused(write_ip_adapter(tmp_path / "lora.safetensors", grouped), r"LoRA layers \(ip_adapter\.<i>\.to_\*_lora")


def test_unknown_keys_are_listed(tmp_path):
    grouped = narrow_plus("sd15")
    grouped["image_proj"]["extra_norm.weight"] = torch.zeros(3)
    grouped["ip_adapter"]["1.to_q_ip.weight"] = torch.zeros(3)
    grouped["optimizer"] = {"step": torch.zeros(1)}
    refused(write_ip_adapter(tmp_path / "odd.bin", grouped),
            r"3 keys are not IP-Adapter Plus weights: image_proj\.extra_norm\.weight, ip_adapter\.1\.to_q_ip\.weight, "
            r"optimizer\.step")


def test_files_without_ip_adapter_weights_are_named(tmp_path):
    path = write_ip_adapter(tmp_path / "model.safetensors", {"unet": {"conv_in.weight": torch.zeros(2, 2)}})
    refused(path, r"no IP-Adapter Plus file: it has no image_proj\.latents .*found 1 tensors: unet\.conv_in\.weight")


@pytest.mark.parametrize("change,problem", [
    (lambda g: [g["ip_adapter"].pop(f"31.to_{kv}_ip.weight") for kv in "kv"],
     r"number 15 layers, not the 16 attn2 layers of SD1\.5 \(1, 3, \.\.\., 31\) or the 70 of SDXL \(1, 3, \.\.\., "
     r"139\): as sd15, it lacks layers \[31\] and has extra layers none"),
    (lambda g: g["ip_adapter"].pop("31.to_v_ip.weight"), r"ip_adapter\.31\.to_v_ip\.weight is missing"),
    (lambda g: g["ip_adapter"].update({"5.to_k_ip.weight": torch.zeros(64, 2048)}),
     r"projections\.maps\.input_4_0\.to_k\.weight has shape \(64, 2048\), expected \(64, 768\)"),
    (lambda g: g["ip_adapter"].update({"5.to_k_ip.weight": torch.zeros(60, 768)}),
     r"an attn2 layer 60 wide does not split into sd15 heads"),
    (lambda g: g["image_proj"].update({"proj_out.weight": torch.zeros(2048, 96), "proj_out.bias": torch.zeros(2048),
                                       "norm_out.weight": torch.zeros(2048), "norm_out.bias": torch.zeros(2048)}),
     r"its resampler makes 2048-wide tokens, but its 16 layers are those of sd15, whose context is 768 wide"),
    (lambda g: g["image_proj"].update({"proj_in.weight": torch.zeros(96, 512)}),
     r"reads 512-wide CLIP vision tokens, no CLIP vision model known here"),
    (lambda g: g["image_proj"].update({f"layers.{n}.0.to_q.weight": torch.zeros(100, 96) for n in range(2)}),
     r"attention is 100 wide, not a multiple of IP-Adapter's head size 64"),
    (lambda g: g["image_proj"].pop("layers.1.0.to_kv.weight"), r"resampler\.blocks\.1 does not fit: missing"),
])
def test_inconsistent_plus_files_are_refused(tmp_path, change, problem):
    grouped = narrow_plus("sd15")
    change(grouped)
    refused(write_ip_adapter(tmp_path / "plus.safetensors", grouped), problem)


@pytest.mark.parametrize("family, other", [("sdxl", "sd15"), ("sd15", "sdxl")])
def test_embeddings_for_the_wrong_text_encoders_are_named(tmp_path, family, other):
    """The caller's CLIP is at fault, not the file: the refusal names the file and asks for the right CLIP."""
    path = write_ip_adapter(tmp_path / "plus.safetensors", narrow_plus(family))
    encoders = {"sd15": r"\['l'\]", "sdxl": r"\['g', 'l'\]"}
    with pytest.raises(WrongTextEncoders, match=rf"^plus.safetensors: it is an IP-Adapter for {family}, whose text "
                                                rf"encoders are {encoders[family]}, but the subject word's embeddings "
                                                rf"come from text encoders {encoders[other]}: connect the CLIP of the "
                                                rf"{family} checkpoint the adapter is used with$"):
        load_ip_adapter_plus(path, "person", EMBEDDINGS[other])


@pytest.mark.parametrize("content,problem", [
    ({"image_proj": {"latents": torch.zeros(1)}, "ip_adapter": SimpleNamespace(a=1)}, "never unpickles arbitrary objects"),
    ({"image_proj": {"latents": torch.zeros(1)}, "ip_adapter": {"1.to_k_ip.weight": "text"}},
     r"its entry 'ip_adapter' / '1.to_k_ip.weight' is a str, not a tensor: it is not a flat dict of tensors or a dict "
     r"of such dicts"),
    ([torch.zeros(1)], r"holds a list, not a flat dict of tensors or a dict of such dicts"),
    ({"image_proj.latents": torch.zeros(1), "image_proj": {"latents": torch.zeros(1)}},
     "names the tensor image_proj.latents twice, flat and grouped"),
])
def test_pickles_that_are_not_tensor_dicts_are_refused(tmp_path, content, problem):
    path = tmp_path / "plus.bin"
    torch.save(content, path)
    refused(path, problem)


def test_a_damaged_file_is_refused(tmp_path):
    path = write_ip_adapter(tmp_path / "plus.safetensors", narrow_plus("sd15"))
    path.write_bytes(path.read_bytes()[:-100])
    refused(path, "truncated")
    path = write_ip_adapter(tmp_path / "plus.bin", narrow_plus("sd15"))
    path.write_bytes(path.read_bytes()[:1000])
    refused(path, "damaged or not a PyTorch file")


def test_the_safetensors_form_is_the_flattened_bin():
    grouped = narrow_plus("sd15")
    flat = flattened(grouped)
    assert "image_proj.latents" in flat and "ip_adapter.31.to_v_ip.weight" in flat and len(flat) == \
        len(grouped["image_proj"]) + len(grouped["ip_adapter"])


# NARROW_RESAMPLER's sizes as a ResamplerConfig, in IP-Adapter's layout: norm_out after proj_out, heads of 64.
NARROW_CONFIG = dict(vision_width=1280, num_queries=4, depth=2, width=96, heads=2, attention_width=128, ff_mult=2,
                     norm_after_projection=True)


def adapter_in_plus_layout(family: str, seed: int = 0, vision_layers: int = 0, **encoder) -> NestedAdapter:
    """A NestedAdapter with every tensor its own seeded draw but the base token (zero), every attn2 layer 64 wide."""
    config = ResamplerConfig(**(NARROW_CONFIG | {"output_width": CONTEXT_WIDTH[family]} | encoder))
    layers = layers_with_widths(family, {layer.key: 64 for layer in cross_attention_layers(family)})
    adapter = NestedAdapter(family, config, "other", "person", layers=layers, vision_layers=vision_layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if name != "resampler.base_token":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5)
    return adapter


@pytest.mark.parametrize("family, optional", [("sd15", {}), ("sdxl", {}),
                                              ("sd15", {"pooled_queries": 2, "position_embeddings": 257})])
def test_an_adapter_written_as_ip_adapter_plus_loads_back_exactly(tmp_path, family, optional):
    """Written in the published layout (the keys and shapes tests/ipadapter_files.py makes for the same sizes), read
    back by the pack's loader: the same resampler, layers, subject tokens and K~, V~, bit for bit."""
    adapter = adapter_in_plus_layout(family, **optional)
    adapter.provenance = {"step": 7}
    state = ip_adapter_plus_state_dict(adapter)
    published = flattened(narrow_plus(family, max_seq_len=optional.get("position_embeddings", 0),
                                      num_latents_mean_pooled=optional.get("pooled_queries", 0)))
    assert {key: tuple(tensor.shape) for key, tensor in state.items()} == \
        {key: tuple(tensor.shape) for key, tensor in published.items()}

    path = tmp_path / f"written_{family}.safetensors"
    save_ip_adapter_plus(path, adapter)
    assert sorted(tmp_path.iterdir()) == [path], "nothing but the file is left beside it"
    metadata, tensors = read_safetensors(path)
    assert json.loads(metadata["provenance"]) == {"step": 7}
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[key], state[key]) for key in state)
    loaded = load(path, family)
    assert loaded.resampler.config == adapter.resampler.config
    assert [(layer.key, layer.inner_dim, layer.heads) for layer in loaded.layers] == \
        [(layer.key, layer.inner_dim, layer.heads) for layer in adapter.layers]
    assert_same_adapter(loaded, adapter, torch.randn(2, 257, 1280, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("encoder, change, problem", [
    (dict(heads=4), None, r"its resampler's attention is 128 wide in 4 heads of 32, but IP-Adapter's layout fixes the "
                          r"head size at 64 \(a file gives only the width\): set encoder\.heads = 2$"),
    (dict(attention_width=None), None, r"attention is 96 wide in 2 heads of 48, .*: make encoder\.width a multiple of "
                                       r"64 and encoder\.heads that width / 64$"),
    (dict(norm_after_projection=False), None, r"applies norm_out before proj_out; IP-Adapter's applies it after: train "
                                              r"with encoder\.norm_after_projection = true$"),
    ({}, lambda adapter: adapter.resampler.base_token.data.fill_(0.5),
     r"adds a base token to every subject token, which IP-Adapter's resampler has not: train it with attention = "
     r"'decoupled' from a fresh start or an IP-Adapter Plus file, which keep the base token at zero$"),
    ({}, lambda adapter: setattr(adapter, "vision_hidden_state", "last"),
     r"reads CLIP vision's last hidden state, IP-Adapter Plus the penultimate one"),
    (dict(identity_width=512, identity_tokens=2), None,
     r"its resampler has parts IP-Adapter's has not: identity\.0\.bias, identity\.0\.weight, identity\.1\.bias, "
     r"identity\.1\.weight, identity\.3\.bias, identity\.3\.weight; train without them"),
])
def test_an_adapter_ip_adapter_plus_cannot_hold_is_refused(tmp_path, encoder, change, problem):
    adapter = adapter_in_plus_layout("sd15", **encoder)
    if change is not None:
        change(adapter)
    with pytest.raises(ValueError, match=problem):
        save_ip_adapter_plus(tmp_path / "refused.safetensors", adapter)
    assert not any(tmp_path.iterdir()), "a refused adapter leaves no file"


def test_fine_tuned_vision_layers_are_refused():
    with pytest.raises(ValueError, match=r"^it carries 1 fine-tuned CLIP vision layers, which an IP-Adapter Plus file "
                                         r"cannot hold .*: train with train_vision_layers = 0$"):
        ip_adapter_plus_state_dict(adapter_in_plus_layout("sd15", vision_layers=1))
