"""The contract of the one operator outside torch's public API that the pack relies on (attention/logsumexp.py):
its output is F.scaled_dot_product_attention's, bit for bit, and its second output is each query's log-sum-exp,
checked against a float64 evaluation; where it cannot serve (autograd, another device), the wrapper says so."""
import math

import pytest
import torch
import torch.nn.functional as F

from subject_personalization.attention.logsumexp import attention_with_logsumexp, returns_logsumexp

SHAPES = [(1, 8, 4096, 77, 40), (2, 5, 300, 154, 64), (3, 1, 1, 1, 8), (2, 20, 64, 77, 3), (1, 8, 64, 77, 160)]
LSE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}  # relative


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch, heads, queries, keys, head_dim", SHAPES)
@pytest.mark.parametrize("mask", ["none", "soft", "hard"])
def test_output_is_sdpas_bit_for_bit_and_lse_is_the_log_sum_exp(dtype, batch, heads, queries, keys, head_dim, mask):
    generator = torch.Generator().manual_seed(queries * keys + head_dim)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
               for length in (queries, keys, keys))
    bias = None
    if mask != "none":
        bias = torch.randn(batch, 1, queries, keys, generator=generator).to(dtype)
        if mask == "hard" and keys > 1:  # -inf on some columns, never a whole row
            bias[..., 1::3] = -math.inf
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = attention_with_logsumexp(q, k, v, bias, scale, differentiable=False)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale))
    logits = q.double() @ k.double().transpose(-1, -2) * scale + (0 if bias is None else bias.double())
    expected = torch.logsumexp(logits, dim=-1)
    assert lse.shape == (batch, heads, queries)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tolerance = LSE_TOLERANCE[dtype] * expected.abs().clamp(min=1)
    assert torch.all((lse.double() - expected).abs() <= tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch, heads, queries, keys, head_dim", [shape for shape in SHAPES if shape[2] > 1] +
                         [(2, 8, 2, 77, 160), (3, 3, 1, 77, 24)])
@pytest.mark.parametrize("bias_queries", ["per query", "broadcast"])
def test_a_row_whose_bias_is_zero_gets_the_bits_of_the_batch_without_a_bias(dtype, batch, heads, queries, keys,
                                                                             head_dim, bias_queries):
    """subject_attention hands rows without subjects to the same call as the rows with them, their bias zero: those
    rows must come out as plain attention over the whole batch gives them, bit for bit."""
    batch = max(batch, 2)
    generator = torch.Generator().manual_seed(queries + keys + head_dim)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
               for length in (queries, keys, keys))
    bias = torch.zeros(batch, 1, queries if bias_queries == "per query" else 1, keys, dtype=dtype)
    bias[0, ..., :keys // 2 + 1] = torch.randn(bias.shape[2], keys // 2 + 1, generator=generator).to(dtype)
    out, _ = attention_with_logsumexp(q, k, v, bias.expand(batch, 1, queries, keys), 1.0 / math.sqrt(head_dim),
                                      differentiable=False)
    assert torch.equal(out[1:], F.scaled_dot_product_attention(q, k, v)[1:])
    assert not torch.equal(out[0], F.scaled_dot_product_attention(q, k, v)[0])  # the bias does act on its row


def test_no_kernel_where_autograd_needs_lse_or_on_another_device():
    q = torch.randn(1, 2, 8, 16)
    assert attention_with_logsumexp(q, q, q, None, 0.25, differentiable=True) is None
    meta = q.to("meta")
    assert attention_with_logsumexp(meta, meta, meta, None, 0.25, differentiable=False) is None
    assert attention_with_logsumexp(q, q, q, None, 0.25, differentiable=False) is not None
    assert [returns_logsumexp(x, differentiable) for x, differentiable in ((q, True), (meta, False), (q, False))] == \
        [False, False, True]
