"""The balanced localisation loss against a float64 loop over pixels."""
import pytest
import torch

from subject_personalization.attention.localization_loss import balanced_localization_loss


def reference(probs, masks, present):
    losses = []
    for b in range(probs.shape[0]):
        for s in range(probs.shape[1]):
            if not present[b, s]:
                continue
            inside = [(float(p), float(m)) for p, m in zip(probs[b, s], masks[b, s])]
            weight_in = sum(m for _, m in inside)
            weight_out = sum(1 - m for _, m in inside)
            mean_in = sum(p * m for p, m in inside) / weight_in
            mean_out = sum(p * (1 - m) for p, m in inside) / weight_out
            losses.append(mean_out - mean_in)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("batch, subjects, tokens, soft", [(1, 1, 16, False), (2, 3, 64, True), (3, 2, 256, False)])
def test_matches_the_pixel_loop(batch, subjects, tokens, soft):
    generator = torch.Generator().manual_seed(tokens)
    probs = torch.rand(batch, subjects, tokens, generator=generator, dtype=torch.float64)
    masks = torch.rand(batch, subjects, tokens, generator=generator, dtype=torch.float64)
    masks = masks if soft else (masks > 0.5).double()
    present = torch.rand(batch, subjects, generator=generator) > 0.3
    present[0, 0] = True
    loss = balanced_localization_loss(probs, masks, present)
    assert abs(float(loss) - reference(probs, masks, present)) < 1e-12


def test_attention_inside_the_mask_lowers_the_loss_and_gradients_flow():
    masks = torch.zeros(1, 1, 8)
    masks[..., :4] = 1
    inside = torch.tensor([[[0.2] * 4 + [0.0] * 4]])
    outside = torch.tensor([[[0.0] * 4 + [0.2] * 4]])
    assert balanced_localization_loss(inside, masks) == pytest.approx(-0.2)
    assert balanced_localization_loss(outside, masks) == pytest.approx(0.2)
    probs = torch.full((1, 1, 8), 0.1, requires_grad=True)
    balanced_localization_loss(probs, masks).backward()
    assert torch.all(probs.grad[..., :4] < 0) and torch.all(probs.grad[..., 4:] > 0)


def test_no_subject_present_gives_zero_with_a_graph_and_shapes_are_checked():
    probs = torch.rand(2, 1, 8, requires_grad=True)
    loss = balanced_localization_loss(probs, torch.ones(2, 1, 8), torch.zeros(2, 1, dtype=torch.bool))
    assert float(loss) == 0 and loss.requires_grad
    with pytest.raises(ValueError, match=r"both be \(B, S, N\)"):
        balanced_localization_loss(torch.rand(2, 1, 8), torch.rand(2, 1, 4))
