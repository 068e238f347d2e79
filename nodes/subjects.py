"""SUBJECTS: the list of personal subjects a graph composes, whichever method renders them.

Each subject carries its reference images, the word of the prompt it binds to, an optional region mask,
its weight and the part of the schedule it acts on. A method adds what it computed from the images
(Nested Attention: the adapter and its encoder tokens).
"""
from dataclasses import dataclass, replace

import torch

CATEGORY = "subject personalization"


@dataclass(frozen=True)
class Subject:
    word: str                              # the prompt word that carries the subject (its last token)
    images: torch.Tensor                   # ComfyUI IMAGE batch: one subject, one or more photos
    mask: torch.Tensor | None = None       # (H, W) in [0, 1]: where the subject may appear; None = anywhere
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    adapter: object | None = None          # NestedAdapter, for Nested Attention
    tokens: torch.Tensor | None = None     # the adapter's encoder output for these images, (1, M, D)


def append_subject(subjects: tuple[Subject, ...] | None, subject: Subject) -> tuple[Subject, ...]:
    """Subjects bind in list order; the same word twice binds its first and second occurrence."""
    return tuple(subjects or ()) + (subject,)


def with_mask(subject: Subject, mask: torch.Tensor | None) -> Subject:
    if mask is None:
        return subject
    if mask.ndim == 3:
        if mask.shape[0] != 1:
            raise ValueError(f"a subject takes one mask, got a batch of {mask.shape[0]}; pick one with a mask-batch node")
        mask = mask[0]
    if mask.ndim != 2 or mask.numel() == 0:
        raise ValueError(f"expected a MASK of shape (H, W) or (1, H, W), got {tuple(mask.shape)}")
    return replace(subject, mask=mask.float().clamp(0, 1))
