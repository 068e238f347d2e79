"""The adapter's own copies of the last CLIP vision layers against an explicit float64 computation."""
import math

import pytest
import torch

from subject_personalization.encoders.nested_adapter import load_nested_adapter, new_nested_adapter, save_nested_adapter
from subject_personalization.encoders.unet_layers import cross_attention_layers
from subject_personalization.encoders.vision_layers import VisionLayer, run_vision_layers

HEADS = 16


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded values for every parameter at a CLIP-like scale (LayerNorm affine included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim == 2:
                parameter.copy_(noise / math.sqrt(parameter.shape[1]))
            else:
                parameter.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
    return module


def tiny_adapter(**overrides):
    generator = torch.Generator().manual_seed(0)
    to_k, to_v = ({layer.key: torch.randn(layer.inner_dim, 768, generator=generator) for layer in cross_attention_layers("sd15")}
                  for _ in range(2))
    return new_nested_adapter("sd15", 1024, "pet", "dog", {"l": torch.randn(768)}, torch.randn(768), to_k, to_v,
                              num_queries=4, depth=1, width=64, heads=4, **overrides)


def reference_layer(x: torch.Tensor, weights: dict[str, torch.Tensor], activation) -> torch.Tensor:
    """A CLIP encoder layer written out in float64: x + attn(LN1(x)), then + fc2(act(fc1(LN2(x))))."""
    w = {key: value.double() for key, value in weights.items()}
    x = x.double()

    def layer_norm(values, name):
        centred = values - values.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def linear(values, name):
        return values @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    normed = layer_norm(x, "layer_norm1")
    batch, tokens, width = x.shape
    q, k, v = (linear(normed, f"self_attn.{p}_proj").reshape(batch, tokens, HEADS, -1).transpose(1, 2) for p in "qkv")
    probabilities = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // HEADS), dim=-1)
    attended = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + linear(attended, "self_attn.out_proj")
    return x + linear(activation(linear(layer_norm(x, "layer_norm2"), "mlp.fc1")), "mlp.fc2")


@pytest.mark.parametrize("width, activation, shape", [
    (1024, lambda a: a * torch.sigmoid(1.702 * a), (2, 257)),   # ViT-L/14: quick_gelu
    (1280, torch.nn.functional.gelu, (1, 33)),                  # ViT-H/14: gelu
    (1024, lambda a: a * torch.sigmoid(1.702 * a), (3, 5)),
])
def test_vision_layer_matches_an_explicit_float64_layer(width, activation, shape):
    layer = randomised(VisionLayer(width), seed=width)
    x = torch.randn(*shape, width, generator=torch.Generator().manual_seed(1))
    expected = reference_layer(x, layer.state_dict(), activation)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)


def test_several_photos_run_through_the_layers_one_by_one():
    layers = torch.nn.ModuleList([randomised(VisionLayer(1024), seed=s) for s in (1, 2)])
    photos = torch.randn(2, 3, 9, 1024)
    one_by_one = torch.stack([torch.stack([layers[1](layers[0](p[None]))[0] for p in subject]) for subject in photos])
    torch.testing.assert_close(run_vision_layers(layers, photos), one_by_one, rtol=1e-5, atol=1e-5)
    assert run_vision_layers(torch.nn.ModuleList(), photos) is photos


def test_adapter_carries_copied_vision_layers_through_save_and_load(tmp_path):
    base_layers = [randomised(VisionLayer(1024), seed=s).state_dict() for s in (3, 4)]
    adapter = randomised(tiny_adapter(base_vision_layers=base_layers), seed=6)
    assert len(adapter.vision_layers) == 2
    hidden = torch.randn(2, 1, 17, 1024)
    expected = adapter.resampler(run_vision_layers(adapter.vision_layers, hidden))
    torch.testing.assert_close(adapter.subject_tokens(hidden), expected)
    save_nested_adapter(tmp_path / "tuned.safetensors", adapter)
    loaded = load_nested_adapter(tmp_path / "tuned.safetensors")
    assert len(loaded.vision_layers) == 2 and loaded.metadata() == adapter.metadata()
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert torch.equal(loaded.subject_tokens(hidden), adapter.subject_tokens(hidden))


def test_copied_layers_start_as_the_base_layers():
    base_layers = [randomised(VisionLayer(1024), seed=5).state_dict()]
    adapter = tiny_adapter(base_vision_layers=base_layers)
    for key, tensor in base_layers[0].items():
        assert torch.equal(adapter.vision_layers[0].state_dict()[key], tensor), key
