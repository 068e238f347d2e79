"""The official Nested Attention checkpoint import (encoders/official_nested_import.py): every accepted layout of the
same tensors gives the same adapter; keys outside them are refused, listed. Narrow layers (64 wide) and a small
resampler whose attention (3 heads of 64) is wider than its queries (96), with IP-Adapter's optional learned positions
and mean-pooled queries."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ipadapter_files import Weights, plus_resampler
from subject_personalization.encoders.checkpoint_io import UnreadableFile
from subject_personalization.encoders.nested_adapter import (check_compatible, is_adapter_file, load_nested_adapter,
                                                             save_nested_adapter)
from subject_personalization.encoders.official_nested_import import import_official_nested, import_official_nested_file
from subject_personalization.encoders.unet_layers import ip_adapter_layers, to_diffusers_name

EMBEDDINGS = {"l": torch.randn(768), "g": torch.randn(1280)}
IMPORT_FIX = "the official demo checkpoint"
LAYOUT_FIX = (r"the layouts this import accepts are assumed .*: the authors' file has not been checked against them; "
              r"if this file is their demo checkpoint, it is not damaged, its layout is new to the pack")


@pytest.fixture(scope="module")
def parts() -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """(resampler tensors in IP-Adapter's names, {IP-Adapter number: {"k": A_k, "v": A_v}}) shared by every layout."""
    weights = Weights(seed=9, dtype=torch.float16)
    resampler = plus_resampler(weights, dim=96, depth=2, dim_head=64, heads=3, num_queries=4, embedding_dim=1280,
                               output_dim=2048, ff_mult=2, max_seq_len=257, num_latents_mean_pooled=2)
    maps = {index: {kv: weights.normal(64, 2048, std=2048 ** -0.5) for kv in "kv"} for index in ip_adapter_layers("sdxl")}
    return resampler, maps


def diffusers_name(index: int) -> str:
    return to_diffusers_name(ip_adapter_layers("sdxl")[index].block)


LAYOUTS = {  # name -> (resampler prefix, key of A_k / A_v by IP-Adapter number and "k" | "v", grouped as a .bin)
    "diffusers names": ("image_proj.", lambda i, kv: f"unet.{diffusers_name(i)}.processor.to_{kv}_nest.weight", False),
    "diffusers processor lists": ("encoder.resampler.", lambda i, kv: f"{diffusers_name(i)}.processor.to_{kv}_ip.0.weight",
                                  False),
    "IP-Adapter numbers": ("image_proj.", lambda i, kv: f"ip_adapter.{i}.to_{kv}_ip.weight", False),
    "numbers, nest names, top-level resampler": ("", lambda i, kv: f"nested_layers.{i}.to_{kv}_nested.weight", False),
    "dict of dicts": ("image_proj.", lambda i, kv: f"ip_adapter.{i}.to_{kv}_nest.weight", True),
}


def in_layout(parts, layout: str) -> dict:
    resampler, maps = parts
    prefix, map_key, grouped = LAYOUTS[layout]
    flat = {prefix + key: tensor for key, tensor in resampler.items()}
    flat |= {map_key(index, kv): tensor for index, pair in maps.items() for kv, tensor in pair.items()}
    if not grouped:
        return flat
    nested: dict[str, dict] = {}
    for key, tensor in flat.items():
        group, _, name = key.partition(".")
        nested.setdefault(group, {})[name] = tensor
    return nested


def write(tmp_path, state: dict, grouped: bool):
    if grouped:
        path = tmp_path / "official.bin"
        torch.save(state, path)
    else:
        path = tmp_path / "official.safetensors"
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def reference(parts):
    return import_official_nested(in_layout(parts, "IP-Adapter numbers"), "person", EMBEDDINGS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_imports_to_the_same_adapter(tmp_path, parts, reference, layout):
    adapter = import_official_nested_file(write(tmp_path, in_layout(parts, layout), LAYOUTS[layout][2]), "person",
                                          EMBEDDINGS)
    assert adapter.state_dict().keys() == reference.state_dict().keys()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(adapter.state_dict()[key], tensor), key
    config = adapter.resampler.config
    assert (config.width, config.inner_width, config.heads, config.depth, config.num_queries, config.pooled_queries,
            config.position_embeddings, config.tokens, config.vision_width) == (96, 192, 3, 2, 4, 2, 257, 6, 1280)
    assert all(layer.inner_dim == 64 and layer.heads == 1 for layer in adapter.layers)
    assert adapter.name == "official" and adapter.provenance["source_file"].startswith("official.")
    check_compatible(adapter, "sdxl", 2048, 1280)
    image = torch.randn(2, 257, 1280)
    with torch.no_grad():
        tokens = adapter.float().subject_tokens(image)
        assert tokens.shape == (2, 6, 2048) and torch.equal(tokens, reference.float().subject_tokens(image))
        expected = reference.projections.project(tokens)
        for key, (keys, values) in adapter.projections.project(tokens).items():
            assert torch.equal(keys, expected[key][0]) and torch.equal(values, expected[key][1]), key


def test_an_import_saves_and_loads_as_an_adapter(tmp_path, parts):
    adapter = import_official_nested_file(write(tmp_path, in_layout(parts, "IP-Adapter numbers"), False), "person",
                                          EMBEDDINGS)
    save_nested_adapter(tmp_path / "nested.safetensors", adapter)
    loaded = load_nested_adapter(tmp_path / "nested.safetensors")
    assert loaded.resampler.config == adapter.resampler.config
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


@pytest.mark.parametrize("extra,problem", [
    ({"optimizer.state.0": torch.zeros(1), "image_proj.layers.0.0.to_qkv.weight": torch.zeros(1)},
     r"2 keys fit no layout the official import accepts \(see encoders/official_nested_import\.py\): "
     r"image_proj\.layers\.0\.0\.to_qkv\.weight, optimizer\.state\.0"),
    ({"ip_adapter.2.to_k_ip.weight": torch.zeros(64, 2048), "ip_adapter.141.to_v_ip.weight": torch.zeros(64, 2048)},
     r"2 keys fit no layout .*: ip_adapter\.141\.to_v_ip\.weight, ip_adapter\.2\.to_k_ip\.weight"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k_nest.weight": torch.zeros(64, 2048)},
     r"keys ip_adapter\.1\.to_k_ip\.weight and unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2"
     r"\.to_k_nest\.weight both give projections\.maps\.input_4_0\.to_k\.weight"),
    ({"image_proj.to_latents_from_mean_pooled_seq.1.weight": torch.zeros(100, 96)},
     r"resampler\.pooled_queries\.1\.weight has shape \(100, 96\), expected \(96, 96\)"),
])
def test_what_the_import_does_not_know_is_refused(tmp_path, parts, extra, problem):
    path = write(tmp_path, in_layout(parts, "IP-Adapter numbers") | extra, False)
    with pytest.raises(UnreadableFile, match=problem) as caught:
        import_official_nested_file(path, "person", EMBEDDINGS)
    assert str(path) in str(caught.value) and re.search(LAYOUT_FIX, str(caught.value))
    assert "damaged" not in str(caught.value).split("; the layouts")[0]


def test_keys_of_no_known_layout_are_refused_with_what_was_expected(tmp_path, parts):
    path = write(tmp_path, in_layout(parts, "IP-Adapter numbers") | {"encoder.blocks.0.attn.qkv.weight": torch.zeros(1)},
                 False)
    with pytest.raises(UnreadableFile, match=r"1 keys fit no layout .*: encoder\.blocks\.0\.attn\.qkv\.weight; expected a "
                                             r"resampler in IP-Adapter's naming .* to_k_nest and to_v_nest weights"):
        import_official_nested_file(path, "person", EMBEDDINGS)


@pytest.mark.parametrize("layout,name", [("dict of dicts", "official.safetensors"), ("dict of dicts", "official.ckpt"),
                                         ("IP-Adapter numbers", "official.bin"), ("IP-Adapter numbers", "official")])
def test_the_files_content_decides_its_format_not_its_name(tmp_path, parts, reference, layout, name):
    """A pickle renamed .safetensors is read as the pickle it is, safetensors renamed .bin as safetensors."""
    path = write(tmp_path, in_layout(parts, layout), LAYOUTS[layout][2]).rename(tmp_path / name)
    adapter = import_official_nested_file(path, "person", EMBEDDINGS)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(adapter.state_dict()[key], tensor), key
    assert not is_adapter_file(path, IMPORT_FIX)
    save_nested_adapter(tmp_path / "pack_adapter.bin", adapter)
    assert is_adapter_file(tmp_path / "pack_adapter.bin", IMPORT_FIX)


def test_a_file_that_is_neither_safetensors_nor_a_pickle_is_refused_naming_it(tmp_path):
    path = tmp_path / "official.safetensors"
    path.write_bytes(b"<!DOCTYPE html><html>a download page saved by mistake</html>")
    for call in (lambda: import_official_nested_file(path, "person", EMBEDDINGS),
                 lambda: is_adapter_file(path, IMPORT_FIX)):
        with pytest.raises(UnreadableFile, match="it is neither safetensors .* nor a PyTorch pickle") as caught:
            call()
        assert str(path) in str(caught.value) and IMPORT_FIX in str(caught.value)


def test_a_pickle_holding_objects_is_refused(tmp_path):
    path = tmp_path / "official.bin"
    torch.save({"image_proj": {"latents": torch.zeros(1)}, "config": {"name": object.__new__(Weights)}}, path)
    with pytest.raises(UnreadableFile, match="never unpickles arbitrary objects"):
        import_official_nested_file(path, "person", EMBEDDINGS)


def test_the_tokenizer_default_is_the_comfyui_the_pack_is_linked_into(tmp_path):
    """tools/setup_comfyui.sh links the pack into custom_nodes: from the link, as a user's shell reaches it, the
    command's default tokenizer folder is that ComfyUI's, not one above the clone the link points to."""
    pack_root = Path(__file__).resolve().parents[2]
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "comfy" / "sd1_tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (comfyui / "comfy" / "sd1_tokenizer" / name).write_text("{}")
    (comfyui / "custom_nodes").mkdir()
    (comfyui / "custom_nodes" / "subject-personalization").symlink_to(pack_root)
    shown = subprocess.run(["bash", "-c", f"cd {comfyui}/custom_nodes/subject-personalization && "
                                          f"{sys.executable} -m encoders.official_nested_import --help"],
                           capture_output=True, text=True, timeout=300, check=True,
                           env={**os.environ, "COLUMNS": "1000"}).stdout  # help on one line: paths are not broken
    assert f"(default: the one of the ComfyUI this pack is in, {comfyui / 'comfy' / 'sd1_tokenizer'})" in shown


@pytest.mark.parametrize("state", [{"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)},
                                   {"image_proj.proj.weight": torch.zeros(2, 2), "ip_adapter.1.to_k_lora.down.weight":
                                    torch.zeros(2, 2)}], ids=["a base model's", "IP-Adapter FaceID-like"])
def test_a_file_that_is_no_nested_attention_checkpoint_is_refused_naming_it(tmp_path, state):
    path = write(tmp_path, state, False)
    with pytest.raises(UnreadableFile, match=rf"^cannot use {re.escape(str(path))}: it is not a Nested Attention "
                                             rf"checkpoint: none of its {len(state)} keys \(.*\) is a resampler's or a "
                                             rf"nested attention map's; expected a resampler in IP-Adapter's naming .*; "
                                             rf"give the official demo checkpoint"):
        import_official_nested_file(path, "person", EMBEDDINGS)
