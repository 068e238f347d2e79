"""FastComposer's balanced localisation loss on subject-token attention maps (docs/methods.md §1.5).

Per subject i with segmentation mask m_i over a layer's N image tokens and attention map a_i (the
probability of the subject token, averaged over heads):

    loss_i = mean_{outside m_i}(a_i) - mean_{inside m_i}(a_i)

means over the pixels of each region (soft masks weigh each pixel), averaged over the subjects present.
It pushes each subject's attention inside its own region; it is bounded in [-1, 1].
"""
import torch
from torch import Tensor


def balanced_localization_loss(subject_probs: Tensor, masks: Tensor, present: Tensor | None = None,
                               eps: float = 1e-6) -> Tensor:
    """subject_probs, masks: (B, S, N) (masks in [0, 1], resized to the layer); present: (B, S) bool, or all."""
    if subject_probs.shape != masks.shape or subject_probs.ndim != 3:
        raise ValueError(f"subject_probs and masks must both be (B, S, N); got {tuple(subject_probs.shape)} and "
                         f"{tuple(masks.shape)}: resize each mask to the layer's h*w")
    masks = masks.to(subject_probs).clamp(0, 1)
    inside = (subject_probs * masks).sum(-1) / masks.sum(-1).clamp_min(eps)
    outside = (subject_probs * (1 - masks)).sum(-1) / (1 - masks).sum(-1).clamp_min(eps)
    per_subject = outside - inside
    if present is None:
        return per_subject.mean()
    present = present.to(per_subject.device, torch.bool)
    if not bool(present.any()):
        return per_subject.sum() * 0  # keeps the graph (and DDP's gradient sync) with no subject in the batch
    return per_subject[present].mean()
