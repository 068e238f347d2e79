"""Nested Attention on an SDXL-architecture UNet and CLIP built from ComfyUI's own SDXL config, random weights."""
import pytest
import torch

from hostenv import require_comfyui
from sdxl_models import random_sdxl

require_comfyui()

DTYPE = torch.bfloat16  # halves memory; the CPU runs bf16 matmuls


@pytest.fixture(scope="module")
def sdxl(comfy):
    import comfy.model_patcher
    unet, clip = random_sdxl(DTYPE, seed=0)
    model = comfy.model_patcher.ModelPatcher(unet, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return model, clip


def test_patch_covers_all_70_layers_and_samples(sdxl, fastcomposer_models, node):
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    model, clip = sdxl
    adapter = fresh_adapter(model, clip, "person", "ViT-L/14", "person", seed=3)
    assert adapter.base_family == "sdxl" and len(adapter.layers) == 70
    with torch.no_grad():
        adapter.resampler.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(1))
    (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, fastcomposer_models[3], image, "person", 1.0, 0.0, 1.0)
    (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, subjects, "a photo of a person reading")
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry")
    assert positive[0][0].shape == (1, 77, 2048)
    (patched,) = node("SubjectPersonalization_ApplyNestedAttention").apply(model, positive, 1.0, 0.0, 1.0)
    assert len(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == 70
    assert not model.model_options.get("transformer_options", {}).get("patches_replace")

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (plain,) = node("KSampler").sample(model, 0, 1, 5.0, "euler", "normal", positive, negative, latent)
    (nested,) = node("KSampler").sample(patched, 0, 1, 5.0, "euler", "normal", positive, negative, latent)
    assert torch.isfinite(nested["samples"]).all()
    assert not torch.equal(nested["samples"], plain["samples"])


def test_an_sd15_adapter_is_refused_by_an_sdxl_model(sdxl, fastcomposer_models, node):
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    sd15_model, sd15_clip, _, clip_vision, _ = fastcomposer_models
    adapter = fresh_adapter(sd15_model, sd15_clip, "person", "ViT-L/14", "person")
    image = torch.rand(1, 64, 64, 3)
    (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, clip_vision, image, "person", 1.0, 0.0, 1.0)
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
