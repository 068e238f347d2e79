"""Nested Attention on an SDXL-architecture UNet and CLIP built from ComfyUI's own SDXL config, random weights; beside
IPAdapter_plus, InstantID and PuLID on the same model."""
import gc
import re
import sys

import pytest
import torch

from hostenv import require_comfyui
from peers import require_peer
from sdxl_models import random_sdxl
from unet_calls import subject_replacements

require_comfyui()

DTYPE = torch.bfloat16  # halves memory; the CPU runs bf16 matmuls


@pytest.fixture(scope="module")
def sdxl(comfy):
    import comfy.model_patcher
    unet, clip = random_sdxl(DTYPE, seed=0)
    model = comfy.model_patcher.ModelPatcher(unet, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return model, clip


@pytest.fixture(scope="module")
def vit_l(clip_vision_file, node):
    """The session's CLIP ViT-L/14 file through ComfyUI's loader: the one image encoder this module needs, without the
    session's 5.5 GB of FastComposer models beside SDXL."""
    return node("CLIPVisionLoader").load_clip(clip_vision_file.name)[0]


@pytest.fixture(scope="module")
def person(sdxl, vit_l, node):
    """(adapter, positive, negative): a person from a freshly initialised SDXL adapter, made visible."""
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    model, clip = sdxl
    adapter = fresh_adapter(model, clip, "person", "ViT-L/14", "person", seed=3)
    with torch.no_grad():
        adapter.resampler.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(1))
    (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, vit_l, image, "person", 1.0, 0.0, 1.0)
    (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, subjects, "a photo of a person reading")
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry")
    return adapter, positive, negative


@pytest.fixture(scope="module")
def sample(sdxl, person, node):
    """sample(*patches): one sampler step of an 8x8 latent on the SDXL model through the patches, in order: 'pack', or
    (name, another pack's patch function MODEL -> MODEL); each combination sampled once, remembered by its names."""
    _, positive, negative = person
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    samples = {}

    def sample(*patches) -> torch.Tensor:
        names = tuple(patch if patch == "pack" else patch[0] for patch in patches)  # no reference to another pack's model
        if names not in samples:
            patched = sdxl[0]
            for patch in patches:
                patched = (node("SubjectPersonalization_ApplyNestedAttention").apply(patched, positive, 1.0, 0.0, 1.0)[0]
                           if patch == "pack" else patch[1](patched))
            samples[names] = node("KSampler").sample(patched, 0, 1, 5.0, "euler", "normal", positive, negative,
                                                     latent)[0]["samples"]
            del patched
            gc.collect()  # the other pack's models and patch objects go now, not with the module: SDXL leaves little room
        return samples[names]

    return sample


def test_patch_covers_all_70_layers_and_samples(sdxl, person, sample, node):
    model = sdxl[0]
    adapter, positive, _ = person
    assert adapter.base_family == "sdxl" and len(adapter.layers) == 70
    assert positive[0][0].shape == (1, 77, 2048)
    (patched,) = node("SubjectPersonalization_ApplyNestedAttention").apply(model, positive, 1.0, 0.0, 1.0)
    assert len(subject_replacements(patched)) == 70
    assert not model.model_options.get("transformer_options", {}).get("patches_replace")
    assert torch.isfinite(sample("pack")).all()
    assert not torch.equal(sample("pack"), sample())


def test_an_sd15_adapter_is_refused_by_an_sdxl_model(sdxl, vit_l, nested_adapter_files, sd15_checkpoint_file, node):
    import comfy.sd
    (adapter,) = node("SubjectPersonalization_NestedAttentionLoader").load(nested_adapter_files["nested_person_sd15"].name)
    sd15_clip = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint_file), output_vae=False, output_model=False)[1]
    image = torch.rand(1, 64, 64, 3)
    (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, vit_l, image, "person", 1.0, 0.0, 1.0)
    (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(sd15_clip, subjects, "a person")
    with pytest.raises(ValueError, match=r"trained for sd15 \(context 768\) but the MODEL is sdxl \(context 2048\)"):
        node("SubjectPersonalization_ApplyNestedAttention").apply(sdxl[0], positive, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="is for sd15"):
        node("SubjectPersonalization_NestedAttentionEncode").encode(sdxl[1], subjects, "a person")


def test_the_official_checkpoint_imports_through_its_node(sdxl, comfy, node):
    """One step from models/nested_attention: the file's maps, and the subject token is this SDXL CLIP's embedding of
    the initializer word; an adapter file of the pack given to it is sent to its own loader."""
    from ipadapter_files import Weights, flattened, layer_maps, plus_resampler
    from safetensors.torch import save_file
    from subject_personalization.encoders.nested_adapter import save_nested_adapter
    from subject_personalization.encoders.unet_layers import ip_adapter_layers
    from subject_personalization.nodes.nested_adapter_nodes import initializer_vectors
    clip = sdxl[1]
    weights = Weights(seed=11, dtype=torch.float16)
    official = flattened({"image_proj": plus_resampler(weights, dim=64, depth=1, dim_head=64, heads=1, num_queries=4,
                                                       embedding_dim=1280, output_dim=2048, ff_mult=2),
                          "ip_adapter": layer_maps(weights, "sdxl", dict.fromkeys(range(1, 140, 2), 64))})
    folder = comfy.model_dir("nested_attention")
    source, converted = folder / "nested_official_demo.safetensors", folder / "nested_official_converted.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in official.items()}, source)
    try:
        (adapter,) = node("SubjectPersonalization_NestedAttentionOfficialLoader").load(source.name, clip, "person")
        assert (adapter.base_family, len(adapter.layers), adapter.initializer_word) == ("sdxl", 70, "person")
        for key, embedding in initializer_vectors(clip, "person")[0].items():
            assert torch.equal(adapter.placeholder_embeddings[key], embedding), key
        for number, layer in ip_adapter_layers("sdxl").items():
            assert torch.equal(adapter.projections.maps[layer.key].to_v.weight,
                               official[f"ip_adapter.{number}.to_v_ip.weight"].float()), layer.key
        save_nested_adapter(converted, adapter)
        with pytest.raises(ValueError, match="is already a Nested Attention adapter of this pack: load it with 'Load "
                                             "Nested Attention Adapter'"):
            node("SubjectPersonalization_NestedAttentionOfficialLoader").load(converted.name, clip, "person")
    finally:
        source.unlink()
        converted.unlink(missing_ok=True)


def test_the_official_import_lists_every_form_and_reads_each_by_its_content(sdxl, comfy, node):
    """models/nested_attention as the import node lists it: safetensors and pickles under every suffix the importer
    reads, each read by what it holds (a pickle renamed .safetensors as a pickle, safetensors renamed .bin as
    safetensors), the subject word the loader's; the adapter loader lists no pickle suffix; a file that is neither is
    refused naming the file, the problem and the fix."""
    from ipadapter_files import Weights, flattened, layer_maps, plus_resampler
    from safetensors.torch import save_file
    from subject_personalization.encoders.unet_layers import ip_adapter_layers
    weights = Weights(seed=12, dtype=torch.float16)
    grouped = {"image_proj": plus_resampler(weights, dim=64, depth=1, dim_head=64, heads=1, num_queries=4,
                                            embedding_dim=1280, output_dim=2048, ff_mult=2),
               "ip_adapter": layer_maps(weights, "sdxl", dict.fromkeys(range(1, 140, 2), 64))}
    folder = comfy.model_dir("nested_attention")
    pickle_renamed, safetensors_renamed = folder / "official_pickle.safetensors", folder / "official_safetensors.bin"
    pickle_pt, junk = folder / "official.pt", folder / "official_download_page.ckpt"
    torch.save(grouped, pickle_renamed)
    torch.save(grouped, pickle_pt)
    save_file({key: tensor.contiguous() for key, tensor in flattened(grouped).items()}, safetensors_renamed)
    junk.write_bytes(b"<!DOCTYPE html><html>the Space's file page, saved instead of the file</html>")
    official_loader = node("SubjectPersonalization_NestedAttentionOfficialLoader")
    try:
        listed = official_loader.INPUT_TYPES()["required"]["checkpoint"][0]
        assert {path.name for path in (pickle_renamed, safetensors_renamed, pickle_pt, junk)} <= set(listed)
        adapters = node("SubjectPersonalization_NestedAttentionLoader").INPUT_TYPES()["required"]["adapter"][0]
        assert not {safetensors_renamed.name, pickle_pt.name, junk.name} & set(adapters)
        for path in (pickle_renamed, safetensors_renamed):
            (adapter,) = official_loader.load(path.name, sdxl[1], "person")
            assert adapter.prompt_word == "person" and adapter.provenance["source_file"] == path.name
            for number, layer in ip_adapter_layers("sdxl").items():
                assert torch.equal(adapter.projections.maps[layer.key].to_k.weight,
                                   grouped["ip_adapter"][f"{number}.to_k_ip.weight"].float()), (path.name, layer.key)
        with pytest.raises(ValueError, match=rf"^cannot use {re.escape(str(junk))}: it is neither safetensors .* nor a "
                                             rf"PyTorch pickle .*; give the official demo checkpoint"):
            official_loader.load(junk.name, sdxl[1], "person")
    finally:
        for path in (pickle_renamed, safetensors_renamed, pickle_pt, junk):
            path.unlink()


# Beside the packs users already run (their real code, installed by tests/peers.py; SD1.5: test_other_packs.py):
# IPAdapter_plus through its own nodes, InstantID and PuLID through their own attn2 patch functions, in either order.
# Their entries are keyed (block, number, index) as the pack's layers, at every layer ComfyUI calls (their nodes name
# the middle block ("middle", 1, index), which ComfyUI never looks up). Each model samples one step of an 8x8 latent.

def peer_module(comfy, node_class: str):
    """The module of another pack's node class, as ComfyUI loaded it from custom_nodes."""
    require_peer(comfy.nodes.NODE_CLASS_MAPPINGS, node_class)
    return sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS[node_class].__module__]


def check_both_act_in_either_order(sample, peer) -> None:
    pack_first, peer_first = sample("pack", peer), sample(peer, "pack")
    assert torch.equal(pack_first, peer_first), "both orders compute the same operations"
    assert not torch.allclose(pack_first, sample("pack"), atol=1e-3), "the other pack's effect is missing"
    assert not torch.allclose(pack_first, sample(peer), atol=1e-3), "the pack's effect is missing"


def peer_patch_kwargs(model) -> dict:
    """The sigma range every peer's node puts in its kwargs: the whole schedule (start 0, end 1)."""
    sampling = model.get_model_object("model_sampling")
    return {"sigma_start": sampling.percent_to_sigma(0.0), "sigma_end": sampling.percent_to_sigma(1.0)}


def patched_at_every_layer(model, set_model_patch_replace, patch_kwargs: dict):
    """A clone of model with another pack's entry at each attn2 layer, set by its own function as its nodes set it."""
    from subject_personalization.encoders.unet_layers import ip_adapter_layers
    patched = model.clone()
    for number, layer in ip_adapter_layers("sdxl").items():
        set_model_patch_replace(patched, {**patch_kwargs, "module_key": str(number)}, layer.block)
    return patched


def test_ipadapter_plus_and_the_pack_act_in_either_order(sample, comfy, vit_l, node, monkeypatch):
    from comfy.cli_args import args
    from ipadapter_files import ip_adapter_plus, write_ip_adapter
    peer_module(comfy, "IPAdapterAdvanced")
    monkeypatch.setattr(args, "bf16_unet", True)  # it casts to ComfyUI's UNet dtype: this one's, as under --bf16-unet
    # IP-Adapter Plus SDXL's layout over the session's ViT-L/14 (1024-wide tokens) instead of ViT-H/14: one image
    # encoder fewer in memory beside SDXL; IPAdapter_plus sizes the resampler's input from the file
    path = write_ip_adapter(comfy.model_dir("ipadapter") / "ip-adapter-plus_sdxl_vit-l.safetensors",
                            ip_adapter_plus("sdxl", seed=22, embedding_dim=1024))
    try:
        (ipadapter,) = node("IPAdapterModelLoader").load_ipadapter_model(path.name)
    finally:
        path.unlink()
    reference = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(2))

    def ipadapter_advanced(model):
        return node("IPAdapterAdvanced").apply_ipadapter(model, ipadapter, weight=1.0, image=reference,
                                                         clip_vision=vit_l)[0]

    check_both_act_in_either_order(sample, ("IPAdapter Advanced", ipadapter_advanced))


def test_instantids_attention_patch_and_the_pack_act_in_either_order(sample, comfy, sdxl, node):
    from ipadapter_files import PLUS_RESAMPLER, Weights, flattened, layer_maps, plus_resampler
    from safetensors.torch import save_file
    instantid = peer_module(comfy, "InstantIDModelLoader")
    weights = Weights(seed=23, dtype=torch.float16)
    # InstantID's ip-adapter.bin: IP-Adapter Plus SDXL's resampler over 512-wide face embeddings, and its layer maps
    state = flattened({"image_proj": plus_resampler(weights, **{**PLUS_RESAMPLER["sdxl"], "embedding_dim": 512}),
                       "ip_adapter": layer_maps(weights, "sdxl")})
    path = comfy.model_dir("instantid") / "ip-adapter.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, path)
    try:
        (model,) = node("InstantIDModelLoader").load_model(path.name)
    finally:
        path.unlink()
    face = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(4))  # one face's embedding, as its node stacks it
    model.to(dtype=DTYPE)  # as its node casts it to the UNet's (half-precision) dtype on a GPU
    cond, uncond = model.get_image_embeds(face.to(DTYPE), torch.zeros_like(face, dtype=DTYPE))
    kwargs = {"ipadapter": model, "weight": 1.0, "cond": cond, "uncond": uncond, "mask": None,
              **peer_patch_kwargs(sdxl[0])}
    check_both_act_in_either_order(
        sample, ("InstantID", lambda unet: patched_at_every_layer(unet, instantid._set_model_patch_replace, kwargs)))


def test_pulids_attention_patch_and_the_pack_act_in_either_order(sample, comfy, sdxl, node):
    from ipadapter_files import Weights, flattened, layer_maps
    from safetensors.torch import save_file
    pulid = peer_module(comfy, "PulidModelLoader")
    encoder = sys.modules[pulid.__name__.rsplit(".", 1)[0] + ".encoders"].IDEncoder()  # its own module, seeded
    generator = torch.Generator().manual_seed(24)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0, parameter.shape[-1] ** -0.5, generator=generator)
    state = flattened({"image_proj": encoder.state_dict(), "ip_adapter": layer_maps(Weights(seed=25, dtype=torch.float16),
                                                                                     "sdxl")})
    path = comfy.model_dir("pulid") / "ip-adapter_pulid_sdxl_fp16.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, path)
    try:
        (model,) = node("PulidModelLoader").load_model(path.name)
    finally:
        path.unlink()
    # What its node feeds the encoder: the face embedding beside EVA-CLIP's, and five EVA-CLIP hidden states
    identity = torch.randn(1, 1280, generator=generator)
    hidden = [torch.randn(1, 577, 1024, generator=generator) for _ in range(5)]
    model.to(dtype=DTYPE)  # as its node casts it to the UNet's dtype
    with torch.no_grad():
        cond = model.get_image_embeds(identity.to(DTYPE), [state.to(DTYPE) for state in hidden])
        uncond = model.get_image_embeds(torch.zeros_like(identity, dtype=DTYPE),
                                        [torch.zeros_like(state, dtype=DTYPE) for state in hidden])
    kwargs = {"pulid": model, "weight": 1.0, "cond": cond, "uncond": uncond, "ortho": False, "ortho_v2": False,
              "mask": None, **peer_patch_kwargs(sdxl[0])}
    check_both_act_in_either_order(
        sample, ("PuLID", lambda unet: patched_at_every_layer(unet, pulid.set_model_patch_replace, kwargs)))
