"""Cross-attention with subject tokens: query-dependent nested values, per-subject query masks and token weights.

Inputs are a UNet cross-attention layer's projected q (B, N, H*d), k and v (B, T, H*d).
Per head, for subjects i bound to key positions s_i (docs/methods.md §2.1 and §3):

    a_qj  = softmax_j(q.k_j / sqrt(d) + b_qj)         b_q,s_i = log(query_mask_i[q]) + log(w_i), 0 elsewhere
    v*_iq = softmax_m(q.K~_im / sqrt(d)) V~_im         nested attention over subject i's M tokens
    out_q = sum_j a_qj v_j + sum_i lambda_i a_q,s_i (v*_iq - v_s_i)

w_i is subject i's token weight, the pack's own reading of the authors' `special_token_weight` (docs/methods.md
§2.5): exp(b) multiplies s_i's unnormalised attention, so w_i scales s_i's attention before the row is renormalised;
w_i = 1 and no mask build no bias at all.

Evaluation, in one of two exact ways, each with one attention call over all T keys and no N x T matrix outside it:
- log-sum-exp (inference where torch's kernel returns it, attention/logsumexp.py): the call is plain attention and
  also gives l_q = log sum_j exp(q.k_j / sqrt(d) + b_qj), so a_q,s_i = exp(q.k_s_i / sqrt(d) + b_q,s_i - l_q). Since
  a softmax sums to 1, v*_iq - v_s_i = sum_m softmax_m(q.K~_im / sqrt(d)) (V~_im - v_s_i). Per batch row, one GEMM
  gives every subject logit, one GEMM over keys [K~_1 | .. | K~_S] every nested logit, one softmax runs over each
  subject's M tokens, times lambda_i a_q,s_i, and one GEMM adds the sum over i and m to the kernel's output in place.
  The extra work is the nested products and S dot products per query.
- indicator channels (autograd, other devices): sum_j a_qj v_j - lambda_i a_q,s_i v_s_i is plain attention with v_s_i
  scaled by (1 - lambda_i), so the call runs over values [(scaled) v | indicator of s_1..s_S | zero pad], whose extra
  output channels are the a_q,s_i (q and k get zero channels to match); one SDPA call per subject over its M tokens,
  on the batch rows that carry subjects, gives v*_i.

Subjects that change nothing (strength 0 or recording only, no mask, token weight 1) give plain attention bit for
bit: the scale is SDPA's default for d, and when probabilities are asked for, the output is plain attention's own
call (the indicator channels change the sizes of the kernel's GEMMs, and with them the order in which they sum).
Rows that carry no subject are plain attention of the whole batch bit for bit where the log-sum-exp formulation runs
(their bias is zero, and nothing is added to them): keeps_rows_without_subjects_plain tells a caller when it may hand
over a whole batch.

token_index is read on the host once, when the binding is made (token_positions): keep it on the CPU, where that
costs no device sync. A call reads nothing back from q's device, and its subject path traces into one graph under
torch.compile (both shown by tests/core/test_subject_attention_compile.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .logsumexp import attention_with_logsumexp, returns_logsumexp

_HEAD_DIM_ALIGN = 8  # fused SDPA kernels need head dims that are multiples of 8


@dataclass(frozen=True)
class SubjectBinding:
    """One subject: which key token carries it in each batch row, and what it adds there.

    token_index: (B,) integer tensor, or a tuple of B ints; key position of the subject token s* per batch row, -1
        where the row does not carry the subject (uncond, other prompt). Read on the host once (token_positions).
    nested_keys, nested_values: (M, H*d) shared by all rows or (B, M, H*d) per row, already
        projected (K~ = E A_k, V~ = E A_v); None = no value replacement (masks/recording only).
    strength: lambda in v_s* <- v_s* + lambda (v*_q - v_s*); 0 reproduces the plain layer.
    query_mask: (B or 1, N) in [0, 1] (clipped); where s* may be attended. Added as log(mask) to the
        logit of s* only (0 -> -inf, soft values down-weight), in rows that carry the subject.
    token_weight: w > 0, added as log(w) to the logit of s* in rows that carry the subject: multiplies s*'s attention
        before renormalisation; 1 changes nothing.
    """

    token_index: Tensor | tuple[int, ...]
    nested_keys: Tensor | None = None
    nested_values: Tensor | None = None
    strength: float = 1.0
    query_mask: Tensor | None = None
    token_weight: float = 1.0
    token_positions: tuple[int, ...] = field(init=False, repr=False)  # token_index read once, on the host

    def __post_init__(self) -> None:
        index = self.token_index
        if isinstance(index, tuple) and all(isinstance(position, int) for position in index):
            positions = index  # known on the host already: nothing is read back from a tensor (torch.compile-friendly)
        elif isinstance(index, Tensor) and index.ndim == 1 and not (
                index.is_floating_point() or index.is_complex() or index.dtype == torch.bool):
            positions = tuple(index.tolist())
        else:
            raise ValueError(
                f"token_index must be a 1-D integer tensor or a tuple of ints (one key position per batch row, -1 for "
                f"rows without the subject), got {_describe(index)}")
        object.__setattr__(self, "token_positions", positions)
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


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"dtype {value.dtype} shape {tuple(value.shape)}"
    return repr(value)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(..., L, H*d) -> (..., H, L, d), a view."""
    return x.view(*x.shape[:-1], heads, -1).transpose(-3, -2)  # view, not unflatten: a hot path, and the same view


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
        if len(subject.token_positions) != batch:
            raise ValueError(
                f"subject {i}: token_index has {len(subject.token_positions)} entries for a batch of {batch}; "
                f"give one per batch row (-1 where the row does not carry the subject)")
        for row, token in enumerate(subject.token_positions):
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
            for row, token in enumerate(subject.token_positions) if token >= 0]
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

    queries_h, keys_h, values_h = (_split_heads(x, heads) for x in (q, k, v))  # (B, H, L, d), views
    is_subject = None  # (B, T, S): subject i's token; built only where a vectorised form needs it
    columns = [_logit_bias(subject, q) for subject in subjects]
    bias = None  # the columns placed on the subject tokens, 0 elsewhere; None keeps the plain fast path
    for i, column in enumerate(columns):
        if column is not None:
            is_subject = _token_indicator(subjects, context, q.device) if is_subject is None else is_subject
            bias = torch.where(is_subject[:, None, :, i], column, 0.0 if bias is None else bias)
    if bias is not None:
        bias = bias.unsqueeze(1).expand(batch, 1, queries, context)  # (B, 1, N or 1, T) -> (B, 1, N, T)

    # SDPA's default scale for the unpadded d, computed as torch does (1.0 / sqrt(d) in double; d ** -0.5 may differ)
    default_scale = 1.0 / math.sqrt(head_dim)
    replacing = any(subject.replaces_value for subject in subjects)
    if not (return_subject_probs or replacing):  # masks and weights only: one call
        return _merge_heads(F.scaled_dot_product_attention(queries_h, keys_h, values_h, attn_mask=bias,
                                                           scale=default_scale))
    with_lse = attention_with_logsumexp(queries_h, keys_h, values_h, bias, default_scale,
                                        _needs_gradients(q, k, v, subjects))
    if with_lse is not None:
        out, lse = with_lse
        probs = _add_nested_values(out, lse, queries_h, keys_h, values_h, columns, default_scale, subjects,
                                   return_subject_probs)
        out = _merge_heads(out)
    else:
        is_subject = _token_indicator(subjects, context, q.device) if is_subject is None else is_subject
        # v_s_i scaled by (1 - lambda_i), so that sum_j a_qj v_j already holds -lambda_i a_q,s_i v_s_i
        scaled_values_h = _split_heads(_scaled_values(v, subjects), heads) if replacing else values_h
        out, probs = _indicator_attention(q, queries_h, keys_h, scaled_values_h, bias, default_scale, is_subject,
                                          subjects)
    if not replacing and bias is None:  # recording only: plain attention's own call, every bit of it
        out = plain_attention(q, k, v, heads)
    return (out, probs) if return_subject_probs else out


def keeps_rows_without_subjects_plain(q: Tensor, k: Tensor, v: Tensor, subjects: Sequence[SubjectBinding]) -> bool:
    """Whether subject_attention(q, k, v, ..., subjects) gives every batch row that carries no subject the output
    F.scaled_dot_product_attention gives it in the same batch, bit for bit: true where the log-sum-exp formulation runs
    (its one kernel call is plain attention, and a zero bias changes no bit, tests/core/test_logsumexp.py), so a caller
    may hand over the whole batch instead of attending those rows apart."""
    return returns_logsumexp(q, _needs_gradients(q, k, v, subjects))


def _needs_gradients(q: Tensor, k: Tensor, v: Tensor, subjects: Sequence[SubjectBinding]) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (
        q, k, v, *(t for s in subjects for t in (s.nested_keys, s.nested_values, s.query_mask))))


def _logit_bias(subject: SubjectBinding, like: Tensor) -> Tensor | None:
    """log(query_mask) + log(token_weight) as (B or 1, N or 1, 1), to add to the logit of the subject's token."""
    column = None
    if subject.query_mask is not None:
        column = subject.query_mask.to(like).clamp(0, 1).log().unsqueeze(-1)
    if subject.token_weight != 1:
        log_weight = math.log(subject.token_weight)
        column = like.new_full((1, 1, 1), log_weight) if column is None else column + log_weight
    return column


def _token_indicator(subjects: Sequence[SubjectBinding], context: int, device: torch.device) -> Tensor:
    """(B, T, S) bool: True at subject i's token in each row that carries it."""
    tokens = torch.tensor([s.token_positions for s in subjects]).T.to(device, non_blocking=True)
    return tokens.unsqueeze(1) == torch.arange(context, device=device).unsqueeze(-1)


def _scaled_values(v: Tensor, subjects: Sequence[SubjectBinding]) -> Tensor:
    """v (B, T, H*d) with v_s_i times (1 - lambda_i) where subject i replaces its value."""
    scaled = v.clone()
    for subject in subjects:
        if subject.replaces_value:
            for row, position in enumerate(subject.token_positions):
                if position >= 0:
                    scaled[row, position].mul_(1 - subject.strength)
    return scaled


def _add_nested_values(out: Tensor, lse: Tensor, queries_h: Tensor, keys_h: Tensor, values_h: Tensor,
                       columns: list[Tensor | None], scale: float, subjects: Sequence[SubjectBinding],
                       return_probs: bool) -> Tensor | None:
    """Adds sum_i lambda_i a_q,s_i (v*_iq - v_s_i) to plain attention's out (B, H, N, d) in place; returns a_q,s_i
    averaged over heads, (B, S, N), when asked. a_q,s_i = exp(scale q.k_s_i + b_q,s_i - lse_q), with lse (B, H, N)
    from the call that gave out; v*_iq - v_s_i = sum_m softmax_m(scale q.K~_im) (V~_im - v_s_i), since the
    softmax sums to 1."""
    heads = out.shape[1]
    probs = out.new_zeros(out.shape[0], len(subjects), out.shape[2]) if return_probs else None
    for row in range(out.shape[0]):  # rows differ in which subjects they carry, and where; an empty row costs nothing
        present = [(i, subjects[i].token_positions[row]) for i in range(len(subjects))
                   if subjects[i].token_positions[row] >= 0]
        if not present:
            continue
        queries = queries_h[row]  # (H, N, d)
        subject_keys = _tokens(keys_h[row], [position for _, position in present])  # (H, P, d)
        # scale k_s.q - lse in one GEMM, as (H, P, N): the N queries on the long side (several times faster on the CPU
        # than (H, N, P), and than appending k_s to the nested GEMM below, whose odd width slows it more)
        attention = torch.baddbmm(_like(lse[row].unsqueeze(1), out), subject_keys, queries.transpose(1, 2), beta=-1,
                                  alpha=scale)
        for column, (i, _) in enumerate(present):
            if columns[i] is not None:
                attention[:, column] += columns[i][row if columns[i].shape[0] > 1 else 0, :, 0]
        attention = attention.exp_()  # (H, P, N): a_q,s_i per head
        if probs is not None:
            for column, (i, _) in enumerate(present):
                probs[row, i] = attention[:, column].mean(0)
        replaced = [(column, subjects[i], position) for column, (i, position) in enumerate(present)
                    if subjects[i].replaces_value]
        if not replaced:
            continue
        weights = attention if len(replaced) == len(present) and all(s.strength == 1 for _, s, _ in replaced) else \
            torch.stack([attention[:, column] * s.strength for column, s, _ in replaced], dim=1)  # (H, R, N)
        nested_keys = [_heads_first(_like(_row_of(s.nested_keys, row), out), heads) for _, s, _ in replaced]
        value_parts = [_heads_first(_like(_row_of(s.nested_values, row), out), heads) for _, s, _ in replaced]
        subject_values = _tokens(values_h[row], [position for _, _, position in replaced])  # (H, R, d)
        sizes = [keys.shape[1] for keys in nested_keys]
        nested_logits = torch.bmm(queries, (_concat(nested_keys) * scale).transpose(1, 2))  # (H, N, sum M)
        weights = weights.transpose(1, 2).contiguous().unsqueeze(-1)  # (H, N, R, 1): contiguous, a faster mul_
        if len(set(sizes)) == 1:  # every subject at once: one softmax over each one's M tokens, one subtraction
            nested = nested_logits.view(*nested_logits.shape[:-1], len(sizes), -1)
            nested = torch.softmax(nested, -1, out=nested).mul_(weights)  # in place: one (H, N, sum M) buffer, not two
            nested_values = _concat(value_parts).view(heads, len(sizes), sizes[0], -1) - subject_values.unsqueeze(2)
            nested, nested_values = nested.flatten(-2), nested_values.flatten(1, 2)
        else:
            nested = torch.cat([part.softmax(-1) * weight for part, weight in
                                zip(nested_logits.split(sizes, dim=-1), weights.unbind(2))], dim=-1)
            nested_values = torch.cat([part - subject_values[:, column:column + 1]
                                       for column, part in enumerate(value_parts)], dim=1)
        out[row].baddbmm_(nested, nested_values)
    return probs


def _tokens(x: Tensor, positions: list[int]) -> Tensor:
    """x[:, positions] of an (H, T, d) tensor: a view where the positions are consecutive, else one stack of views (no
    index tensor to build on the host)."""
    first = positions[0]
    if positions == list(range(first, first + len(positions))):
        return x[:, first:first + len(positions)]
    return torch.stack([x[:, position] for position in positions], dim=1)


def _like(x: Tensor, reference: Tensor) -> Tensor:
    """x on reference's device and in its dtype; x itself when it already is (no operator call)."""
    return x if x.dtype == reference.dtype and x.device == reference.device else x.to(reference)


def _indicator_attention(q: Tensor, queries_h: Tensor, keys_h: Tensor, values_h: Tensor, bias: Tensor | None,
                         scale: float, is_subject: Tensor, subjects: Sequence[SubjectBinding]) -> tuple[Tensor, Tensor]:
    """The output (B, N, H*d) and a_q,s_i averaged over heads (B, S, N), through indicator channels (any device,
    differentiable). queries_h, keys_h, values_h are (B, H, L, d), values already scaled at the replaced tokens;
    is_subject (B, T, S) marks each subject's token."""
    batch, heads, queries, head_dim = queries_h.shape
    extra = -(-(head_dim + len(subjects)) // _HEAD_DIM_ALIGN) * _HEAD_DIM_ALIGN - head_dim
    indicator = F.pad(is_subject.to(values_h.dtype), (0, extra - len(subjects))).unsqueeze(1)  # (B, 1, T, e)
    values_h = torch.cat([values_h, indicator.expand(-1, heads, -1, -1)], dim=-1)
    queries_h, keys_h = _with_zero_channels(queries_h, extra), _with_zero_channels(keys_h, extra)
    out = F.scaled_dot_product_attention(queries_h, keys_h, values_h, attn_mask=bias, scale=scale).transpose(1, 2)
    probs, out = out[..., head_dim:head_dim + len(subjects)], out[..., :head_dim]  # (B, N, H, S), (B, N, H, d)
    span = _replaced_rows(subjects)  # nested values only where some a_q,s_i can be nonzero (not uncond rows)
    blended = out[span]
    for i, subject in enumerate(subjects):
        if subject.replaces_value and span.start < span.stop:
            keys, values = (x if x.ndim == 2 else x[span] for x in (subject.nested_keys, subject.nested_values))
            blended = torch.addcmul(blended, probs[span, ..., i:i + 1], _nested_values(q[span], keys, values, heads),
                                    value=subject.strength)
    out = blended if blended.shape[0] == batch else torch.cat([out[:span.start], blended, out[span.stop:]])
    return out.flatten(2), probs.mean(dim=2).transpose(1, 2)


def _concat(parts: list[Tensor]) -> Tensor:
    """torch.cat along dim 1, without a copy for a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _row_of(x: Tensor, row: int) -> Tensor:
    """Row `row` of a (B, M, H*d) tensor; a shared (M, H*d) one as it is."""
    return x[row] if x.ndim == 3 else x


def _heads_first(x: Tensor, heads: int) -> Tensor:
    """(M, H*d) -> (H, M, d), a view."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)
