"""IP-Adapter Plus files as nested adapters, checked against diffusers 0.42.1's own IP-Adapter loader and layers.

What is verified against what (tests/ipadapter_files.py states the published layouts and where they come from):
- the index mapping `ip_adapter.<i>` -> attn2 layer (encoders/unet_layers.py `ip_adapter_layers`): a diffusers
  UNet2DConditionModel of the SD1.5 and of the SDXL block layout (narrow channels; cross_attention_dim 768 / 2048)
  loads a random Plus file with `_load_ip_adapter_weights`; every processor's to_k_ip / to_v_ip, read back by its
  processor name, is bit for bit the map the pack puts on that layer;
- the resampler: the pack's output equals diffusers' `IPAdapterPlusImageProjection` (built by diffusers'
  `_convert_ip_adapter_image_proj_to_diffusers`) on the same CLIP hidden states, for the published SD1.5 and SDXL
  Plus shapes and for a resampler whose attention is wider than its queries;
- the per-layer nested value v*_q = softmax(q K~^T / sqrt(d)) V~ (encoders/nested_projections.py, then
  attention/subject_attention.py as the patch calls it) equals the image branch of diffusers'
  IPAdapterAttnProcessor2_0 for the same queries, in several layers of both families at the published shapes.
  The branch alone: the processor on an Attention whose to_out is the identity, run with IP-Adapter scale 1 minus
  the same run with scale 0. The nested value alone: with a context of one token, a_q,s* = 1 and the token's own
  value is scaled by 1 - strength = 0, so subject_attention returns v*_q itself.
The published shapes themselves are checked too: diffusers' converter builds IPAdapterPlusImageProjection with its
default depth 4 and ffn_ratio 4 and loads strictly, and the pack reads back IP-Adapter's constructor arguments.
Tolerances (float32 on both sides, the files fp16 as released, compared after the exact cast to float32; measured
with torch 2.14.1 on CPU, printed by each test):
  resampler:     max abs error <= 1e-5 (measured 0: both run the same float32 operations in the same order)
  nested value:  max abs error <= 1e-5 (measured 2.4e-7 in every layer, on values up to 3.4: one rounding of the
                 float32 sum out + branch that the branch is recovered from)
"""
import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
pytest.importorskip("diffusers", reason="the IP-Adapter checks compare against diffusers' own loader and layers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from ipadapter_files import ip_adapter_plus, write_ip_adapter  # noqa: E402
from subject_personalization.attention.subject_attention import SubjectBinding, subject_attention  # noqa: E402
from subject_personalization.encoders.ipadapter_plus import load_ip_adapter_plus  # noqa: E402
from subject_personalization.encoders.unet_layers import (CONTEXT_WIDTH, cross_attention_layers,  # noqa: E402
                                                           from_diffusers_name, layer_key, to_diffusers_name)

TOLERANCE = 1e-5
EMBEDDINGS = {"sd15": {"l": torch.zeros(768)}, "sdxl": {"l": torch.zeros(768), "g": torch.zeros(1280)}}
# Diffusers configs of the two block layouts (as the released sd15 / sdxl unet config.json give them).
LAYOUT = {
    "sd15": dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, cross_attention_dim=768),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True),
}
FULL_WIDTHS = {"sd15": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8),
               "sdxl": dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20))}
NARROW_WIDTHS = {"sd15": dict(block_out_channels=(32, 64, 96, 128), attention_head_dim=8),
                 "sdxl": dict(block_out_channels=(64, 128, 192), attention_head_dim=(1, 2, 3))}
# Narrow, but what diffusers' converter can build: depth 4, ff_mult 4, heads of 64; attention 128 wide over 96.
NARROW_RESAMPLER = dict(dim=96, depth=4, dim_head=64, heads=2, num_queries=4, embedding_dim=1024, ff_mult=4)
CHECKED_LAYERS = {  # several layers of every width and block kind
    "sd15": ["input_1_0", "input_5_0", "input_8_0", "middle_0_0", "output_3_0", "output_7_0", "output_11_0"],
    "sdxl": ["input_4_0", "input_5_1", "input_7_0", "input_8_9", "middle_0_4", "output_0_9", "output_2_3", "output_5_1"],
}


def processor_names(unet) -> list[str]:
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_index_mapping_matches_diffusers_loader(tmp_path, family):
    unet = UNet2DConditionModel(**LAYOUT[family], **NARROW_WIDTHS[family], sample_size=8)
    # Each layer's map as wide as the layer is; sizing by diffusers' own processor order, values random per index.
    widths = {2 * k + 1: unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
              for k, name in enumerate(processor_names(unet))}
    grouped = ip_adapter_plus(family, seed=3, widths=widths, **NARROW_RESAMPLER, output_dim=CONTEXT_WIDTH[family])
    unet._load_ip_adapter_weights([grouped], low_cpu_mem_usage=False)
    adapter = load_ip_adapter_plus(write_ip_adapter(tmp_path / "plus.safetensors", grouped), "person", EMBEDDINGS[family])

    covered = set()
    for name in processor_names(unet):
        processor = unet.attn_processors[name]
        key = layer_key(from_diffusers_name(name.removesuffix(".processor")))
        maps = adapter.projections.maps[key]
        assert torch.equal(maps.to_k.weight.float(), processor.to_k_ip[0].weight), name
        assert torch.equal(maps.to_v.weight.float(), processor.to_v_ip[0].weight), name
        covered.add(key)
    assert covered == {layer.key for layer in cross_attention_layers(family)}
    assert [layer.inner_dim for layer in adapter.layers] == [
        unet.get_submodule(to_diffusers_name(layer.block)).to_k.out_features for layer in adapter.layers]


def meta_unet(family: str) -> UNet2DConditionModel:
    """A UNet of the family's real widths without weights: diffusers' converters read only its config and processor
    names, and build the IP-Adapter modules with real weights outside the meta device."""
    with torch.device("meta"):
        return UNet2DConditionModel(**LAYOUT[family], **FULL_WIDTHS[family])


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def published(request, tmp_path_factory):
    """(family, the pack's adapter of a random Plus file in the published layout, cast to float32, and diffusers'
    image projection and attn2 processors from the same weights)."""
    family = request.param
    grouped = ip_adapter_plus(family, seed=1)
    path = write_ip_adapter(tmp_path_factory.mktemp(family) / f"plus_{family}.safetensors", grouped)
    unet = meta_unet(family)
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(grouped["image_proj"], low_cpu_mem_usage=False)
    processors = unet._convert_ip_adapter_attn_to_diffusers([grouped], low_cpu_mem_usage=False)
    del grouped
    adapter = load_ip_adapter_plus(path, "person", EMBEDDINGS[family]).float()
    yield family, adapter, projection.float(), processors
    del adapter, projection, processors


@torch.no_grad()
def test_published_resampler_equals_diffusers_image_projection(published):
    family, adapter, projection, _ = published
    config = adapter.resampler.config
    assert (config.width, config.heads, config.inner_width, config.depth, config.num_queries, config.ff_mult,
            config.vision_width, config.output_width) == {"sd15": (768, 12, 768, 4, 16, 4, 1280, 768),
                                                          "sdxl": (1280, 20, 1280, 4, 16, 4, 1280, 2048)}[family]
    hidden = torch.randn(2, 257, 1280, generator=torch.Generator().manual_seed(5))
    error = (adapter.subject_tokens(hidden) - projection(hidden)).abs().max().item()
    print(f"{family} resampler: max abs error {error:.2e} (tolerance {TOLERANCE:.0e})")
    assert error <= TOLERANCE


@torch.no_grad()
def test_resampler_with_wider_attention_equals_diffusers(tmp_path):
    grouped = ip_adapter_plus("sd15", seed=2, **NARROW_RESAMPLER, output_dim=768)
    adapter = load_ip_adapter_plus(write_ip_adapter(tmp_path / "narrow.bin", grouped), "person", EMBEDDINGS["sd15"]).float()
    assert (adapter.resampler.config.width, adapter.resampler.config.inner_width, adapter.resampler.config.heads) == \
        (96, 128, 2)
    projection = meta_unet("sd15")._convert_ip_adapter_image_proj_to_diffusers(grouped["image_proj"],
                                                                                low_cpu_mem_usage=False).float()
    hidden = torch.randn(3, 257, 1024, generator=torch.Generator().manual_seed(6))
    error = (adapter.subject_tokens(hidden) - projection(hidden)).abs().max().item()
    print(f"narrow resampler (attention 128 over width 96): max abs error {error:.2e}")
    assert error <= TOLERANCE


@torch.no_grad()
def test_nested_value_equals_ip_adapter_image_branch(published):
    family, adapter, _, processors = published
    generator = torch.Generator().manual_seed(7)
    tokens = adapter.subject_tokens(torch.randn(2, 257, 1280, generator=generator))  # E, (2, 16, D)
    context = torch.randn(2, 77, CONTEXT_WIDTH[family], generator=generator)
    layers = {layer.key: layer for layer in adapter.layers}
    projected = adapter.projections.project(tokens)  # K~, V~ of every layer, as the patch gets them
    worst = 0.0
    for key in CHECKED_LAYERS[family]:
        layer = layers[key]
        attention = Attention(query_dim=layer.inner_dim, cross_attention_dim=CONTEXT_WIDTH[family], heads=layer.heads,
                              dim_head=layer.inner_dim // layer.heads, out_bias=True)
        attention.to_out[0].weight.copy_(torch.eye(layer.inner_dim))
        attention.to_out[0].bias.zero_()
        processor = processors[f"{to_diffusers_name(layer.block)}.processor"]
        attention.set_processor(processor)
        image = torch.randn(2, 64, layer.inner_dim, generator=generator)
        outputs = []
        for scale in (1.0, 0.0):
            processor.scale = [scale]
            outputs.append(attention(image, encoder_hidden_states=(context, [tokens])))
        branch = outputs[0] - outputs[1]

        nested_keys, nested_values = projected[key]
        q = attention.to_q(image)
        one_token = torch.randn(2, 1, layer.inner_dim, generator=generator)
        binding = SubjectBinding(torch.zeros(2, dtype=torch.long), nested_keys, nested_values, strength=1.0)
        nested = subject_attention(q, one_token, one_token, layer.heads, [binding])
        error = (nested - branch).abs().max().item()
        print(f"{family} {key}: nested value vs ip branch, max abs error {error:.2e} "
              f"(values up to {branch.abs().max().item():.2f})")
        worst = max(worst, error)
    assert worst <= TOLERANCE
