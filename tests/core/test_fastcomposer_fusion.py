"""FastComposer fusion against a float64 re-computation written from docs/methods.md §1.3."""
import math

import pytest
import torch

from reference.fusion import fuse as reference_fuse
from subject_personalization.encoders.fastcomposer_fusion import FastComposerFusion

FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=2e-5)  # float32 vs float64 through two MLPs and three LayerNorms


def randomised_fusion(embed_dim, seed):
    fusion = FastComposerFusion(embed_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in fusion.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter.shape[-1]) + (parameter.ndim == 1))
    return fusion


def test_parameter_names_match_the_official_checkpoint():
    names = set(FastComposerFusion().state_dict())
    expected = {f"{mlp}.{layer}.{kind}" for mlp in ("mlp1", "mlp2") for layer in ("layernorm", "fc1", "fc2") for kind in ("weight", "bias")}
    assert names == expected | {"layer_norm.weight", "layer_norm.bias"}
    assert FastComposerFusion().state_dict()["mlp1.fc1.weight"].shape == (768, 1536)


@pytest.mark.parametrize("embed_dim, batch, tokens, positions", [
    (768, 1, 77, [2, 5]),
    (768, 2, 154, [1, 80, 120, 153]),
    (64, 3, 77, [40]),
    (32, 1, 10, [0, 3, 9]),
])
def test_fusion_matches_float64_reference(embed_dim, batch, tokens, positions):
    fusion = randomised_fusion(embed_dim, seed=embed_dim + len(positions))
    generator = torch.Generator().manual_seed(7)
    text = torch.randn(batch, tokens, embed_dim, generator=generator)
    embeds = torch.randn(len(positions), embed_dim, generator=generator)
    fused = fusion(text, torch.tensor(positions), embeds)

    params = {name: tensor.double() for name, tensor in fusion.state_dict().items()}
    expected = text.double().clone()
    for subject, position in enumerate(positions):
        expected[:, position] = reference_fuse(text.double()[:, position], embeds.double()[subject].expand(batch, -1), params)
    torch.testing.assert_close(fused.double(), expected, **FLOAT32_TOLERANCE)
    unmarked = [index for index in range(tokens) if index not in positions]
    assert torch.equal(fused[:, unmarked], text[:, unmarked])


def test_fusion_rejects_mismatched_counts_and_shared_tokens():
    fusion = FastComposerFusion(16)
    text = torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match="2 marked tokens but 1 subject"):
        fusion(text, torch.tensor([1, 2]), torch.randn(1, 16))
    with pytest.raises(ValueError, match="same token"):
        fusion(text, torch.tensor([3, 3]), torch.randn(2, 16))
