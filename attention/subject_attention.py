"""Cross-attention with subject tokens: the nested value of Nested Attention, and per-subject region masks.

For one UNet cross-attention layer, per head, with ordinary weights a_qj = softmax_j(q.k_j / sqrt(d) + b_qj):
    out_q = sum_j a_qj v_j + sum_subjects lambda * a_q,s* (v*_q - v_s*)
    v*_q  = softmax_m(q.K~_m / sqrt(d)) V~_m                 (the nested attention, METHODS.md §2)
The key of s* is unchanged; a subject's query mask m_q adds b_q,s* = log(m_q) (-inf where m_q = 0, §3).
lambda = 0 and no mask give the plain layer.

How it stays one fused kernel: every subject gets an extra value channel that is 1 at its token and 0
elsewhere, so the same softmax that mixes the values also returns a_q,s* for each subject. q and k get
zero channels to match (they do not change q.k), so SDPA's fast kernels still apply.
"""
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

CHANNEL_ALIGNMENT = 8  # fast SDPA kernels want head sizes that are multiples of 8


@dataclass(frozen=True)
class SubjectBinding:
    token_index: torch.Tensor                    # (B,) int64: s* position in the keys per row, -1 = row without it
    nested_keys: torch.Tensor | None = None      # (M, H*d) or (B, M, H*d): K~ = E A_k; None = no value replacement
    nested_values: torch.Tensor | None = None    # like nested_keys: V~ = E A_v
    strength: float = 1.0                        # lambda
    query_mask: torch.Tensor | None = None       # (B or 1, N) in [0, 1]: where s* may be attended


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)  # (..., L, H*d) -> (..., H, L, d)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-3, -2).flatten(-2)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Ordinary multi-head attention on (B, L, H*d) tensors."""
    return _merge(F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads)))


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, subjects: Sequence[SubjectBinding]) -> None:
    batch, queries, inner = q.shape
    if k.shape[0] != batch or v.shape[:2] != k.shape[:2] or k.shape[-1] != inner or v.shape[-1] != inner:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit together")
    if inner % heads:
        raise ValueError(f"width {inner} is not divisible by {heads} heads")
    claimed = torch.zeros(batch, k.shape[1], dtype=torch.bool, device=q.device)
    for number, subject in enumerate(subjects, 1):
        index = subject.token_index
        if index.shape != (batch,):
            raise ValueError(f"subject {number}: token_index must have shape ({batch},), got {tuple(index.shape)}")
        if (index >= k.shape[1]).any() or (index < -1).any():
            raise ValueError(f"subject {number}: token_index must be -1 or below {k.shape[1]}, got {index.tolist()}")
        rows = (index >= 0).nonzero().flatten()
        if claimed[rows, index[rows]].any():
            raise ValueError(f"subject {number} shares a token with another subject; give each subject its own word")
        claimed[rows, index[rows]] = True
        if subject.strength < 0:
            raise ValueError(f"subject {number}: strength must be >= 0, got {subject.strength}")
        if (subject.nested_keys is None) != (subject.nested_values is None):
            raise ValueError(f"subject {number}: give nested keys and values together, or neither")
        if subject.nested_keys is not None:
            if subject.nested_keys.shape != subject.nested_values.shape or subject.nested_keys.shape[-1] != inner \
                    or subject.nested_keys.ndim not in (2, 3) or (subject.nested_keys.ndim == 3 and subject.nested_keys.shape[0] != batch):
                raise ValueError(f"subject {number}: nested keys/values must be (M, {inner}) or ({batch}, M, {inner}), "
                                 f"got {tuple(subject.nested_keys.shape)} and {tuple(subject.nested_values.shape)}")
        mask = subject.query_mask
        if mask is not None and (mask.ndim != 2 or mask.shape[-1] != queries or mask.shape[0] not in (1, batch)):
            raise ValueError(f"subject {number}: query_mask must be (1 or {batch}, {queries}) for this layer's "
                             f"{queries} queries, got {tuple(mask.shape)}; resize the mask to the layer's resolution")


def subject_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, subjects: Sequence[SubjectBinding],
                      return_subject_probs: bool = False,
                      plain: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] = plain_attention):
    """Attention output (B, N, H*d) before to_out; with return_subject_probs also a_q,s* averaged over heads (B, S, N).

    Rows that carry no subject go through `plain` (the caller's kernel), so they are exactly the plain layer.
    """
    _validate(q, k, v, heads, subjects)
    batch, queries, inner = q.shape
    carried = torch.stack([s.token_index >= 0 for s in subjects]).any(0) if subjects else torch.zeros(batch, dtype=torch.bool)
    out = torch.empty_like(q)
    probs = q.new_zeros(batch, len(subjects), queries)
    plain_rows, subject_rows = (~carried).nonzero().flatten(), carried.nonzero().flatten()
    if len(plain_rows):
        out[plain_rows] = plain(q[plain_rows], k[plain_rows], v[plain_rows], heads)
    if len(subject_rows):
        rows_out, rows_probs = _subject_rows(q[subject_rows], k[subject_rows], v[subject_rows], heads,
                                             [_select_rows(s, subject_rows) for s in subjects])
        out[subject_rows] = rows_out
        probs[subject_rows] = rows_probs
    return (out, probs) if return_subject_probs else out


def _select_rows(subject: SubjectBinding, rows: torch.Tensor) -> SubjectBinding:
    pick = lambda x, full: x[rows] if x is not None and x.shape[0] == full and x.ndim == 3 else x
    mask = subject.query_mask
    return SubjectBinding(subject.token_index[rows], pick(subject.nested_keys, subject.token_index.shape[0]),
                          pick(subject.nested_values, subject.token_index.shape[0]), subject.strength,
                          mask[rows] if mask is not None and mask.shape[0] > 1 else mask)


def _subject_rows(q, k, v, heads, subjects):
    batch, queries, inner = q.shape
    keys, head_size, count = k.shape[1], inner // heads, len(subjects)
    extra = math.ceil(count / CHANNEL_ALIGNMENT) * CHANNEL_ALIGNMENT
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)

    indicator = q.new_zeros(batch, keys, extra)
    bias = None
    for number, subject in enumerate(subjects):
        rows = (subject.token_index >= 0).nonzero().flatten()
        indicator[rows, subject.token_index[rows], number] = 1
        if subject.query_mask is not None:
            bias = q.new_zeros(batch, 1, queries, keys) if bias is None else bias
            log_mask = subject.query_mask.to(q.dtype).clamp(0, 1).log().expand(batch, queries)
            bias[rows, 0, :, subject.token_index[rows]] += log_mask[rows]
    pad = q.new_zeros(batch, heads, 1, extra)
    value_ext = torch.cat([vh, indicator[:, None].expand(-1, heads, -1, -1)], dim=-1)
    query_ext = torch.cat([qh, pad.expand(-1, -1, queries, -1)], dim=-1)
    key_ext = torch.cat([kh, pad.expand(-1, -1, keys, -1)], dim=-1)
    mixed = F.scaled_dot_product_attention(query_ext, key_ext, value_ext, attn_mask=bias, scale=head_size ** -0.5)
    out, subject_probs = mixed[..., :head_size], mixed[..., head_size:head_size + count]  # (B,H,N,d), (B,H,N,S)

    for number, subject in enumerate(subjects):
        if subject.nested_keys is None or subject.strength == 0:
            continue
        nested_keys, nested_values = (_heads(t.to(q.dtype), heads) for t in (subject.nested_keys, subject.nested_values))
        nested_keys = nested_keys.expand(batch, -1, -1, -1) if nested_keys.ndim == 3 else nested_keys
        nested_values = nested_values.expand(batch, -1, -1, -1) if nested_values.ndim == 3 else nested_values
        nested = F.scaled_dot_product_attention(qh, nested_keys, nested_values)
        token = subject.token_index.clamp(min=0)
        word_value = vh[torch.arange(batch), :, token].unsqueeze(2)  # (B, H, 1, d); rows without s* have a = 0
        out = out + subject.strength * subject_probs[..., number:number + 1] * (nested - word_value)
    return _merge(out), subject_probs.mean(dim=1).transpose(1, 2)
