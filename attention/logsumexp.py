"""Attention that also returns each query's log-sum-exp, where torch has a kernel for it.

    out_q = sum_j softmax_j(s_qj) v_j,    lse_q = log sum_j exp(s_qj),    s_qj = scale * q.k_j + mask_qj

The subject token's attention is then a_q,s = exp(s_q,s - lse_q): one dot product per query, no second pass over the
keys (attention/subject_attention.py). torch computes lse in its fused CPU kernel but only returns it through
`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`, outside its public API; the contract the pack relies on
is pinned by tests/core/test_logsumexp.py: out is what F.scaled_dot_product_attention returns for the same call, bit for
bit, and lse is (B, H, N), float32 for half and bfloat16 inputs. That operator has no derivative for lse, so where
autograd needs one, on other devices, or in a torch without it, `attention_with_logsumexp` returns None (and
`returns_logsumexp` says so beforehand) and the caller uses its public formulation.
"""
from __future__ import annotations

import torch
from torch import Tensor

_CPU_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def returns_logsumexp(q: Tensor, differentiable: bool) -> bool:
    """Whether attention_with_logsumexp has a kernel for q's device, and none of the gradients it lacks is asked for."""
    return _CPU_KERNEL is not None and q.device.type == "cpu" and not differentiable


def attention_with_logsumexp(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                             differentiable: bool) -> tuple[Tensor, Tensor] | None:
    """(out (B, H, N, d), lse (B, H, N)) for q (B, H, N, d), k, v (B, H, T, d); None where no kernel returns lse.

    differentiable: the caller's result needs gradients (then lse must have one, which this kernel does not give).
    """
    if not returns_logsumexp(q, differentiable):
        return None
    return _CPU_KERNEL(q, k, v, attn_mask=attn_mask, scale=scale)
