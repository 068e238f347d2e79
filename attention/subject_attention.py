"""Cross-attention with subject tokens: query-dependent nested values, per-subject query masks and token weights.

Inputs are a UNet cross-attention layer's projected q (B, N, H*d), k and v (B, T, H*d).
Per head, for subjects i bound to key positions s_i (docs/methods.md §2.1 and §3):

    a_qj  = softmax_j(q.k_j / sqrt(d) + b_qj)         b_q,s_i = log(query_mask_i[q]) + log(w_i), 0 elsewhere
    v*_iq = softmax_m(q.K~_im / sqrt(d)) V~_im         nested attention over subject i's M tokens
    out_q = sum_j a_qj v_j + sum_i lambda_i a_q,s_i (v*_iq - v_s_i)

w_i is subject i's token weight, the pack's own reading of the authors' `special_token_weight` (docs/methods.md
§2.5): exp(b) multiplies s_i's unnormalised attention, so w_i scales s_i's attention before the row is renormalised;
w_i = 1 and no mask build no bias at all.

Evaluation: sum_j a_qj v_j - lambda_i a_q,s_i v_s_i is plain attention with v_s_i scaled by
(1 - lambda_i), so one SDPA call over values [(scaled) v | indicator of s_1..s_S | zero pad]
gives both that sum and every a_q,s_i (the indicator channels; q and k get zero channels to
match). One SDPA call per subject over its M tokens, on the batch rows that carry subjects,
gives v*_i. No N x T matrix is built outside the attention kernel.

Subjects that change nothing (strength 0 or recording only, no mask, token weight 1) give plain attention bit for
bit: the scale is SDPA's default for d, and when probabilities are asked for, the output is plain attention's own
call, since the zero channels change the sizes of the kernel's GEMMs and with them the order in which they sum.

token_index values are read on the host (validation, row selection): keep it on the CPU, where
that costs no device sync; it is moved to q's device without blocking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_HEAD_DIM_ALIGN = 8  # fused SDPA kernels need head dims that are multiples of 8


@dataclass(frozen=True)
class SubjectBinding:
    """One subject: which key token carries it in each batch row, and what it adds there.

    token_index: (B,) integer; key position of the subject token s* per batch row, -1 where the
        row does not carry the subject (uncond, other prompt).
    nested_keys, nested_values: (M, H*d) shared by all rows or (B, M, H*d) per row, already
        projected (K~ = E A_k, V~ = E A_v); None = no value replacement (masks/recording only).
    strength: lambda in v_s* <- v_s* + lambda (v*_q - v_s*); 0 reproduces the plain layer.
    query_mask: (B or 1, N) in [0, 1] (clipped); where s* may be attended. Added as log(mask) to the
        logit of s* only (0 -> -inf, soft values down-weight), in rows that carry the subject.
    token_weight: w > 0, added as log(w) to the logit of s* in rows that carry the subject: multiplies s*'s attention
        before renormalisation; 1 changes nothing.
    """

    token_index: Tensor
    nested_keys: Tensor | None = None
    nested_values: Tensor | None = None
    strength: float = 1.0
    query_mask: Tensor | None = None
    token_weight: float = 1.0

    def __post_init__(self) -> None:
        index = self.token_index
        if index.ndim != 1 or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(
                f"token_index must be a 1-D integer tensor (one key position per batch row, -1 for rows "
                f"without the subject), got dtype {index.dtype} shape {tuple(index.shape)}")
        if (self.nested_keys is None) != (self.nested_values is None):
            raise ValueError("give nested_keys and nested_values together, or neither (masks/recording only)")
        if self.nested_keys is not None:
            keys, values = self.nested_keys, self.nested_values
            if keys.ndim not in (2, 3) or keys.shape != values.shape or keys.shape[-2] == 0:
                raise ValueError(
                    f"nested_keys and nested_values must have the same shape, (M, H*d) or (B, M, H*d) with "
                    f"M >= 1, got {tuple(keys.shape)} and {tuple(values.shape)}")
        if not self.strength >= 0:  # also rejects NaN
            raise ValueError(f"strength must be >= 0 (0 = plain layer, 1 = full nested value), got {self.strength}")
        if not 0 < self.token_weight < math.inf:  # also rejects NaN
            raise ValueError(f"token_weight must be a finite number > 0 (1 = the subject token's attention unchanged), "
                             f"got {self.token_weight}; to take the subject out, set its strength to 0 instead")
        if self.query_mask is not None and self.query_mask.ndim != 2:
            raise ValueError(
                f"query_mask must be (B or 1, N): one weight per image token of this layer, got shape "
                f"{tuple(self.query_mask.shape)}; resize the mask to the layer's h*w and flatten it")

    @property
    def replaces_value(self) -> bool:
        return self.nested_keys is not None and self.strength != 0


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(..., L, H*d) -> (..., H, L, d), a view."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    return x.transpose(1, 2).flatten(2)


def _with_zero_channels(x: Tensor, extra: int) -> Tensor:
    """(..., c) -> (..., c + extra), the new channels 0."""
    return torch.cat([x, x.new_zeros(()).expand(*x.shape[:-1], extra)], dim=-1)


def plain_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Standard multi-head attention, (B, N, H*d) x (B, T, H*d) -> (B, N, H*d)."""
    return _merge_heads(F.scaled_dot_product_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)))


def _check_layer(q: Tensor, k: Tensor, v: Tensor, heads: int) -> None:
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"expected q (B, N, H*d) and k, v (B, T, H*d) with the same B and H*d, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if heads < 1 or q.shape[2] % heads:
        raise ValueError(f"heads={heads} does not divide the projected width {q.shape[2]}; pass the layer's n_heads")


def _check_subjects(subjects: Sequence[SubjectBinding], batch: int, queries: int, context: int, width: int) -> None:
    taken: list[dict[int, int]] = [{} for _ in range(batch)]  # per row: token -> subject using it
    for i, subject in enumerate(subjects):
        if subject.token_index.shape[0] != batch:
            raise ValueError(
                f"subject {i}: token_index has {subject.token_index.shape[0]} entries for a batch of {batch}; "
                f"give one per batch row (-1 where the row does not carry the subject)")
        for row, token in enumerate(subject.token_index.tolist()):
            if not -1 <= token < context:
                raise ValueError(
                    f"subject {i}: token_index {token} in row {row} is outside the {context} key tokens; "
                    f"use a position in [0, {context - 1}] or -1 for rows without the subject")
            if token >= 0 and token in taken[row]:
                raise ValueError(
                    f"subjects {taken[row][token]} and {i} are both bound to token {token} in row {row}; "
                    f"give each subject its own word")
            taken[row][token] = i
        if subject.nested_keys is not None:
            keys = subject.nested_keys
            if keys.shape[-1] != width or (keys.ndim == 3 and keys.shape[0] != batch):
                raise ValueError(
                    f"subject {i}: nested_keys/values of shape {tuple(keys.shape)} do not fit this layer; "
                    f"expected (M, {width}) or ({batch}, M, {width}) — use the nested projections of this layer")
        mask = subject.query_mask
        if mask is not None and (mask.shape[0] not in (1, batch) or mask.shape[1] != queries):
            raise ValueError(
                f"subject {i}: query_mask of shape {tuple(mask.shape)} does not fit {batch} rows x {queries} "
                f"image tokens; resize it to this layer's h*w (and give 1 or {batch} rows)")


def _replaced_rows(subjects: Sequence[SubjectBinding]) -> slice:
    """Smallest slice of batch rows holding every row where some subject's value is replaced (a view, no gather)."""
    rows = [row for subject in subjects if subject.replaces_value
            for row, token in enumerate(subject.token_index.tolist()) if token >= 0]
    return slice(min(rows), max(rows) + 1) if rows else slice(0, 0)


def _nested_values(q: Tensor, keys: Tensor, values: Tensor, heads: int) -> Tensor:
    """v*_q = softmax(q.K~^T / sqrt(d)) V~ per head, returned as (B, N, H, d)."""
    keys, values = keys.to(q), values.to(q)
    if keys.ndim == 3:
        out = F.scaled_dot_product_attention(*(_split_heads(x, heads) for x in (q, keys, values)))
        return out.transpose(1, 2)
    # shared keys: fold the batch into the query axis so SDPA sees equal batch sizes (no broadcasting fallback)
    batch, queries, width = q.shape
    out = F.scaled_dot_product_attention(
        _split_heads(q.reshape(1, batch * queries, width), heads), _split_heads(keys[None], heads),
        _split_heads(values[None], heads))
    return out.transpose(1, 2).reshape(batch, queries, heads, -1)


def subject_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, subjects: Sequence[SubjectBinding],
                      return_subject_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-attention output (B, N, H*d) before to_out, with every subject applied.

    With return_subject_probs, also returns a_q,s_i averaged over heads, (B, S, N): the attention
    probability of each subject token per image token (0 in rows without that subject); differentiable.
    """
    _check_layer(q, k, v, heads)
    batch, queries, width = q.shape
    context, head_dim = k.shape[1], width // heads
    if not subjects:
        out = plain_attention(q, k, v, heads)
        return (out, q.new_zeros(batch, 0, queries)) if return_subject_probs else out
    _check_subjects(subjects, batch, queries, context, width)

    tokens = torch.stack([s.token_index for s in subjects], dim=-1).to(q.device, non_blocking=True)
    is_subject = tokens.unsqueeze(1) == torch.arange(context, device=q.device).unsqueeze(-1)  # (B, T, S)
    queries_h, keys_h, values_h = (x.unflatten(-1, (heads, head_dim)) for x in (q, k, v))  # (B, L, H, d)

    scale = None  # per key token: 1 - lambda_i at s_i, so sum_j a_qj v_j already has -lambda_i a_q,s_i v_s_i
    for i, subject in enumerate(subjects):
        if subject.replaces_value:
            term = is_subject[..., i].to(v.dtype) * subject.strength
            scale = 1 - term if scale is None else scale - term
    if scale is not None:
        values_h = values_h * scale[..., None, None]

    need_probs = return_subject_probs or scale is not None
    if need_probs:  # indicator channels: the kernel's output there is a_q,s_i; q and k get zeros there (q.k unchanged)
        extra = -(-(head_dim + len(subjects)) // _HEAD_DIM_ALIGN) * _HEAD_DIM_ALIGN - head_dim
        indicator = F.pad(is_subject.to(v.dtype), (0, extra - len(subjects))).unsqueeze(2)
        values_h = torch.cat([values_h, indicator.expand(-1, -1, heads, -1)], dim=-1)
        queries_h, keys_h = _with_zero_channels(queries_h, extra), _with_zero_channels(keys_h, extra)

    bias = None  # additive log-mask + log-weight on the subject columns only; None keeps the plain fast path
    for i, subject in enumerate(subjects):
        column = None  # (B or 1, N or 1, 1): this subject's logit bias per query
        if subject.query_mask is not None:
            column = subject.query_mask.to(q).clamp(0, 1).log().unsqueeze(-1)
        if subject.token_weight != 1:
            log_weight = math.log(subject.token_weight)
            column = q.new_full((1, 1, 1), log_weight) if column is None else column + log_weight
        if column is not None:
            bias = torch.where(is_subject[:, None, :, i], column, 0.0 if bias is None else bias)
    if bias is not None:
        bias = bias.unsqueeze(1).expand(batch, 1, queries, context)  # (B, 1, N or 1, T) -> (B, 1, N, T)

    # SDPA's default scale for the unpadded d, computed as torch does (1.0 / sqrt(d) in double; d ** -0.5 may differ)
    default_scale = 1.0 / math.sqrt(head_dim)
    out = F.scaled_dot_product_attention(queries_h.transpose(1, 2), keys_h.transpose(1, 2), values_h.transpose(1, 2),
                                         attn_mask=bias, scale=default_scale).transpose(1, 2)  # (B, N, H, .)
    if not need_probs:
        return out.flatten(2)
    probs, out = out[..., head_dim:head_dim + len(subjects)], out[..., :head_dim]  # (B, N, H, S), (B, N, H, d)
    if scale is None and bias is None:  # recording only: plain attention's own call; the padded one may differ in a bit
        return plain_attention(q, k, v, heads), probs.mean(dim=2).transpose(1, 2)
    span = _replaced_rows(subjects)  # nested values only where some a_q,s_i can be nonzero (not uncond rows)
    blended = out[span]
    for i, subject in enumerate(subjects):
        if subject.replaces_value and span.start < span.stop:
            keys, values = (x if x.ndim == 2 else x[span] for x in (subject.nested_keys, subject.nested_values))
            blended = torch.addcmul(blended, probs[span, ..., i:i + 1], _nested_values(q[span], keys, values, heads),
                                    value=subject.strength)
    out = blended if blended.shape[0] == batch else torch.cat([out[:span.start], blended, out[span.stop:]])
    out = out.flatten(2)
    return (out, probs.mean(dim=2).transpose(1, 2)) if return_subject_probs else out
