"""subject_attention against a float64 reference written straight from the equations (docs/methods.md §2.1, §3).

Per head: a_qj = e_qj / sum_j' e_qj' with e_qj = exp(q.k_j / sqrt(d)), times mask_q * w on the subject's column only
(w: its token weight); v*_q = softmax_m(q.K~_m / sqrt(d)) V~_m; out_q = sum_j a_qj v_j + sum_i lambda_i a_q,s_i (v*_iq -
v_s_i). The reference multiplies the exponentials; the code adds log(mask) + log(w) to the logits.

Every test runs on both formulations of attention/subject_attention.py: log-sum-exp (what CPU inference uses) and
indicator channels (autograd, other devices), with the same tolerances.
"""
import dataclasses
import importlib
import math

import pytest
import torch

from subject_personalization.attention.subject_attention import (SubjectBinding, keeps_rows_without_subjects_plain,
                                                                  plain_attention, subject_attention)

subject_attention_module = importlib.import_module("subject_personalization.attention.subject_attention")

OUT_ATOL = 2e-5    # float32 attention of O(1) values over <= 4096 queries: rounding stays near 1e-6
OUT_RTOL = 1e-4
PROB_ATOL = 2e-6   # probabilities are in [0, 1]; float32 softmax error is a few ulps of 1
SAME_ATOL = 1e-6   # the same float32 math through differently shaped SDPA calls (extended vs plain values)


@pytest.fixture(autouse=True, params=["logsumexp", "indicator"])
def formulation(request, monkeypatch):
    """Which evaluation subject_attention takes: the indicator channels wherever no kernel returns lse."""
    if request.param == "indicator":
        monkeypatch.setattr(subject_attention_module, "attention_with_logsumexp", lambda *args: None)
        monkeypatch.setattr(subject_attention_module, "returns_logsumexp", lambda *args: False)
    return request.param


def reference(q, k, v, heads, subjects):
    """Float64 output (B, N, H*d) and head-averaged subject probabilities (B, S, N), looped the obvious way."""
    q, k, v = q.double(), k.double(), v.double()
    batch, queries, width = q.shape
    head_dim = width // heads
    qh, kh, vh = (x.reshape(x.shape[0], x.shape[1], heads, head_dim) for x in (q, k, v))
    logits = torch.einsum("bnhd,bthd->bhnt", qh, kh) / math.sqrt(head_dim)
    exponentials = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    for subject in subjects:
        for row, token in enumerate(subject.token_index.tolist()):
            if token >= 0:
                exponentials[row, :, :, token] *= subject.token_weight
                if subject.query_mask is not None:
                    exponentials[row, :, :, token] *= subject.query_mask[row if subject.query_mask.shape[0] > 1 else 0]
    weights = exponentials / exponentials.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhnt,bthd->bnhd", weights, vh)
    probs = torch.zeros(batch, len(subjects), queries, dtype=torch.float64)
    for i, subject in enumerate(subjects):
        for row, token in enumerate(subject.token_index.tolist()):
            if token < 0:
                continue
            weight = weights[row, :, :, token]  # (H, N)
            probs[row, i] = weight.mean(0)
            if subject.nested_keys is None:
                continue
            keys, values = (x[row] if x.ndim == 3 else x for x in (subject.nested_keys, subject.nested_values))
            keys, values = (x.double().reshape(-1, heads, head_dim) for x in (keys, values))
            nested_weights = (torch.einsum("nhd,mhd->hnm", qh[row], keys) / math.sqrt(head_dim)).softmax(-1)
            nested = torch.einsum("hnm,mhd->nhd", nested_weights, values)
            out[row] += subject.strength * weight.T[..., None] * (nested - vh[row, token])
    return out.reshape(batch, queries, width), probs


def make_layer(seed, batch, queries, context, heads, head_dim, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, length, heads * head_dim, generator=generator, dtype=dtype)
               for length in (queries, context, context))
    return q, k, v, generator


def make_subjects(generator, batch, queries, context, width, count, carried_rows, nested="shared", mask="none",
                  nested_tokens=16, strengths=(1.0, 0.6, 1.4, 0.25), token_weights=(1.0,)):
    """`count` subjects on distinct tokens of each carried row (some in the last CLIP chunk), none elsewhere."""
    tokens = torch.full((count, batch), -1, dtype=torch.int64)
    for row in carried_rows:
        tokens[:, row] = torch.randperm(context - 2, generator=generator)[:count] + 1
    last_chunk = torch.randperm(75, generator=generator)[:count] + context - 76  # inside the last chunk's words
    tokens[:, carried_rows[0]] = last_chunk
    subjects = []
    for i in range(count):
        kind = nested if nested != "mixed" else ("shared", "per_row", "none")[i % 3]
        shape = {"shared": (nested_tokens, width), "per_row": (batch, nested_tokens, width)}.get(kind)
        keys = values = None
        if shape is not None:
            keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        mask_kind = mask if mask != "mixed" else ("hard", "none", "soft")[i % 3]
        rows = 1 if i % 2 else batch
        query_mask = {"none": None,
                      "hard": (torch.rand(rows, queries, generator=generator) > 0.4).float(),
                      "soft": torch.rand(rows, queries, generator=generator)}[mask_kind]
        subjects.append(SubjectBinding(tokens[i], keys, values, strengths[i % len(strengths)], query_mask,
                                       token_weights[i % len(token_weights)]))
    return subjects


CASES = [  # heads, head_dim, queries, nested tokens M, context T, subjects, nested kind, mask kind
    (1, 8, 1, 1, 77, 1, "shared", "none"),
    (5, 64, 64, 16, 77, 1, "shared", "none"),
    (8, 40, 256, 16, 154, 2, "per_row", "hard"),
    (10, 64, 1024, 16, 77, 1, "shared", "soft"),
    (20, 64, 64, 256, 154, 4, "mixed", "mixed"),
    (5, 80, 128, 77, 154, 3, "none", "hard"),
    (8, 8, 4096, 256, 154, 2, "shared", "mixed"),
    (1, 64, 4096, 4, 77, 4, "per_row", "soft"),
    (10, 40, 4096, 16, 77, 1, "shared", "none"),
]


@pytest.mark.parametrize("heads, head_dim, queries, nested_tokens, context, count, nested, mask", CASES)
@pytest.mark.parametrize("return_probs", [False, True])
def test_matches_float64_reference(heads, head_dim, queries, nested_tokens, context, count, nested, mask, return_probs):
    batch = 4
    q, k, v, generator = make_layer(queries + count, batch, queries, context, heads, head_dim)
    subjects = make_subjects(generator, batch, queries, context, heads * head_dim, count, carried_rows=[0, 2],
                             nested=nested, mask=mask, nested_tokens=nested_tokens)
    expected_out, expected_probs = reference(q, k, v, heads, subjects)
    result = subject_attention(q, k, v, heads, subjects, return_subject_probs=return_probs)
    out, probs = result if return_probs else (result, None)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected_out, atol=OUT_ATOL, rtol=OUT_RTOL)
    if return_probs:
        assert probs.shape == (batch, count, queries)
        torch.testing.assert_close(probs.double(), expected_probs, atol=PROB_ATOL, rtol=0)
        assert probs.min() >= 0 and probs.max() <= 1
        assert torch.all(probs[[1, 3]] == 0)  # uncond rows carry no subject


TOKEN_WEIGHTS = [(0.05,), (0.5,), (2.0,), (7.5,), (3.0, 0.2, 1.0)]  # per subject, cycled


@pytest.mark.parametrize("token_weights", TOKEN_WEIGHTS, ids=str)
@pytest.mark.parametrize("nested, mask, count", [("shared", "none", 1), ("per_row", "hard", 2), ("none", "soft", 2),
                                                 ("mixed", "mixed", 3), ("none", "none", 3)])
@pytest.mark.parametrize("return_probs", [False, True])
def test_token_weight_matches_float64_reference(token_weights, nested, mask, count, return_probs):
    """w multiplies the subject column's exponential before the row is normalised, with or without masks and nested
    values (nested "none": the weight alone acts, through the same bias path as masks)."""
    batch, queries, context, heads, head_dim = 4, 256, 154, 8, 40
    q, k, v, generator = make_layer(count + len(token_weights), batch, queries, context, heads, head_dim)
    subjects = make_subjects(generator, batch, queries, context, heads * head_dim, count, carried_rows=[0, 2],
                             nested=nested, mask=mask, token_weights=token_weights)
    expected_out, expected_probs = reference(q, k, v, heads, subjects)
    result = subject_attention(q, k, v, heads, subjects, return_subject_probs=return_probs)
    out, probs = result if return_probs else (result, None)
    print(f"token weights {token_weights}, nested {nested}, mask {mask}: max abs error "
          f"{(out.double() - expected_out).abs().max().item():.1e} on outputs up to {expected_out.abs().max().item():.1f}")
    torch.testing.assert_close(out.double(), expected_out, atol=OUT_ATOL, rtol=OUT_RTOL)
    if return_probs:
        torch.testing.assert_close(probs.double(), expected_probs, atol=PROB_ATOL, rtol=0)
    unweighted = [dataclasses.replace(subject, token_weight=1.0) for subject in subjects]
    assert not torch.allclose(out, subject_attention(q, k, v, heads, unweighted), atol=1e-4)


@pytest.mark.parametrize("nested, mask", [("shared", "none"), ("per_row", "hard"), ("none", "soft"), ("mixed", "mixed")])
@pytest.mark.parametrize("return_probs", [False, True])
def test_token_weight_one_is_todays_output_bit_for_bit(nested, mask, return_probs, monkeypatch):
    """An explicit weight of 1 gives every bit of the binding without one, and builds no bias when there is no mask."""
    q, k, v, generator = make_layer(8, 3, 120, 77, 5, 64)
    subjects = make_subjects(generator, 3, 120, 77, 320, 2, carried_rows=[0, 2], nested=nested, mask=mask)
    default = [SubjectBinding(s.token_index, s.nested_keys, s.nested_values, s.strength, s.query_mask) for s in subjects]
    masks = []
    kernel = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: masks.append(kwargs.get("attn_mask")) or kernel(*args, **kwargs))
    weighted = subject_attention(q, k, v, 5, [dataclasses.replace(s, token_weight=1.0) for s in subjects],
                                 return_subject_probs=return_probs)
    if mask == "none":
        assert all(bias is None for bias in masks)
    expected = subject_attention(q, k, v, 5, default, return_subject_probs=return_probs)
    got, want = (result if return_probs else (result,) for result in (weighted, expected))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_token_weight_acts_at_strength_zero_on_attention_only():
    """Strength 0 keeps the word's own value, but a weight still moves the attention toward or away from it."""
    q, k, v, generator = make_layer(9, 2, 64, 77, 4, 16)
    subjects = make_subjects(generator, 2, 64, 77, 64, 1, carried_rows=[0], strengths=(0.0,), token_weights=(4.0,))
    expected_out, _ = reference(q, k, v, 4, subjects)
    out = subject_attention(q, k, v, 4, subjects)
    torch.testing.assert_close(out.double(), expected_out, atol=OUT_ATOL, rtol=OUT_RTOL)
    assert torch.equal(out[1], plain_attention(q, k, v, 4)[1])  # row 1 carries no subject
    assert not torch.allclose(out[0], plain_attention(q, k, v, 4)[0], atol=1e-4)


@pytest.mark.parametrize("nested", ["shared", "per_row", "none"])
def test_strength_zero_is_exactly_plain_attention(nested):
    q, k, v, generator = make_layer(1, 3, 50, 77, 8, 40)
    subjects = make_subjects(generator, 3, 50, 77, 320, 2, carried_rows=[0, 1], nested=nested, strengths=(0.0,))
    assert torch.equal(subject_attention(q, k, v, 8, subjects), plain_attention(q, k, v, 8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [3, 5, 7, 10, 24, 40, 64, 80, 100, 160])
@pytest.mark.parametrize("queries", [1, 300])
@pytest.mark.parametrize("nested, return_probs", [("none", True), ("shared", False), ("per_row", True)])
def test_subjects_that_change_nothing_are_plain_attention_bit_for_bit(dtype, head_dim, queries, nested, return_probs):
    """Recording only (no nested values) or strength 0: every bit of plain attention, whatever the dtype and d."""
    q, k, v, generator = make_layer(head_dim + queries, 3, queries, 77, 2, head_dim, dtype)
    subjects = make_subjects(generator, 3, queries, 77, 2 * head_dim, 2, carried_rows=[0, 2], nested=nested,
                             strengths=(0.0,))
    result = subject_attention(q, k, v, 2, subjects, return_subject_probs=return_probs)
    assert torch.equal(result[0] if return_probs else result, plain_attention(q, k, v, 2))


@pytest.mark.parametrize("return_probs", [False, True])
def test_rows_without_subjects_equal_plain_attention(return_probs):
    q, k, v, generator = make_layer(2, 4, 300, 154, 5, 64)
    subjects = make_subjects(generator, 4, 300, 154, 320, 3, carried_rows=[1, 2], nested="mixed", mask="mixed")
    result = subject_attention(q, k, v, 5, subjects, return_subject_probs=return_probs)
    out = result[0] if return_probs else result
    plain = plain_attention(q, k, v, 5)
    torch.testing.assert_close(out[[0, 3]], plain[[0, 3]], atol=SAME_ATOL, rtol=0)
    assert (out[[1, 2]] - plain[[1, 2]]).abs().max() > 1e-3  # and the carried rows do change


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("queries, heads, head_dim", [(4096, 8, 40), (1024, 8, 80), (64, 8, 160), (2, 3, 24), (1, 2, 8)])
@pytest.mark.parametrize("nested, mask, return_probs", [("mixed", "mixed", False), ("shared", "none", True),
                                                        ("none", "hard", False)])
def test_rows_without_subjects_keep_plain_attentions_bits_where_promised(formulation, dtype, queries, heads, head_dim,
                                                                          nested, mask, return_probs):
    """Where keeps_rows_without_subjects_plain says so (the log-sum-exp formulation), every row without a subject is
    plain attention's own output for the whole batch, bit for bit, whatever the other rows' masks and weights; a
    caller may then hand the whole batch over. The indicator formulation does not promise it."""
    q, k, v, generator = make_layer(queries + head_dim, 3, queries, 77, heads, head_dim, dtype)
    subjects = make_subjects(generator, 3, queries, 77, heads * head_dim, 2, carried_rows=[0], nested=nested,
                             mask=mask, token_weights=(1.7, 1.0))
    promised = keeps_rows_without_subjects_plain(q, k, v, subjects)
    assert promised == (formulation == "logsumexp")
    if promised:
        result = subject_attention(q, k, v, heads, subjects, return_subject_probs=return_probs)
        out = result[0] if return_probs else result
        assert torch.equal(out[1:], plain_attention(q, k, v, heads)[1:])


def test_rows_are_not_promised_plain_where_gradients_are_asked_for():
    q, k, v, generator = make_layer(5, 2, 64, 77, 4, 16)
    subjects = make_subjects(generator, 2, 64, 77, 64, 1, carried_rows=[0])
    assert not keeps_rows_without_subjects_plain(q.requires_grad_(), k, v, subjects)
    assert not keeps_rows_without_subjects_plain(*(x.detach().to("meta") for x in (q, k, v)), subjects)


def test_no_subjects_is_plain_attention():
    q, k, v, _ = make_layer(3, 2, 20, 77, 4, 16)
    assert torch.equal(subject_attention(q, k, v, 4, []), plain_attention(q, k, v, 4))
    out, probs = subject_attention(q, k, v, 4, [], return_subject_probs=True)
    assert torch.equal(out, plain_attention(q, k, v, 4)) and probs.shape == (2, 0, 20)


@pytest.mark.parametrize("nested", ["shared", "none"])
def test_hard_mask_changes_only_masked_queries_of_carrying_rows(nested):
    batch, queries, heads, head_dim = 3, 200, 5, 40
    q, k, v, generator = make_layer(4, batch, queries, 154, heads, head_dim)
    free = make_subjects(generator, batch, queries, 154, heads * head_dim, 2, carried_rows=[0, 2], nested=nested)
    mask = (torch.rand(1, queries, generator=generator) > 0.5).float()
    masked = [SubjectBinding(free[0].token_index, free[0].nested_keys, free[0].nested_values, free[0].strength, mask),
              free[1]]
    out_free, probs_free = subject_attention(q, k, v, heads, free, return_subject_probs=True)
    out_masked, probs_masked = subject_attention(q, k, v, heads, masked, return_subject_probs=True)
    change = (out_masked - out_free).abs().amax(-1)  # (B, N)
    blocked = mask[0] == 0
    assert torch.all(change[:, ~blocked] <= SAME_ATOL)
    assert torch.all(change[1] <= SAME_ATOL)  # row 1 does not carry the subject
    assert torch.all(change[[0, 2]][:, blocked] > 1e-4)
    assert torch.all(probs_masked[[0, 2], 0][:, blocked] == 0)
    torch.testing.assert_close(probs_masked[:, 1, ~blocked], probs_free[:, 1, ~blocked], atol=PROB_ATOL, rtol=0)


def test_gradients_reach_nested_tensors_queries_and_probabilities():
    q, k, v, generator = make_layer(5, 2, 4, 77, 2, 4, dtype=torch.float64)  # tiny: gradcheck perturbs every input
    subjects = make_subjects(generator, 2, 4, 77, 8, 2, carried_rows=[0], nested="mixed", mask="soft",
                             nested_tokens=3)
    keys = subjects[0].nested_keys.double().requires_grad_()
    values = subjects[0].nested_values.double().requires_grad_()
    rest = subjects[1]

    def run(q, keys, values):
        bound = [SubjectBinding(subjects[0].token_index, keys, values, 0.8, subjects[0].query_mask.double()),
                 SubjectBinding(rest.token_index, None, None, 1.0, rest.query_mask.double())]
        return subject_attention(q, k, v, 2, bound, return_subject_probs=True)

    q = q.requires_grad_()
    assert torch.autograd.gradcheck(run, (q, keys, values), fast_mode=True)
    out, probs = run(q, keys, values)
    grad_keys, grad_values = torch.autograd.grad(out.sum(), (keys, values))
    assert grad_keys.abs().sum() > 0 and grad_values.abs().sum() > 0
    (grad_q,) = torch.autograd.grad(probs[0, 1].sum(), q)
    assert grad_q.abs().sum() > 0


def test_bfloat16_follows_the_reference_loosely():
    q, k, v, generator = make_layer(6, 2, 64, 77, 8, 40)
    subjects = make_subjects(generator, 2, 64, 77, 320, 2, carried_rows=[0], mask="soft")
    expected, _ = reference(q, k, v, 8, subjects)
    low = [SubjectBinding(s.token_index, s.nested_keys.bfloat16(), s.nested_values.bfloat16(), s.strength,
                          s.query_mask.bfloat16()) for s in subjects]
    out = subject_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 8, low)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.05)  # bf16 keeps ~3 significant digits


def _binding(**changes):
    fields = dict(token_index=torch.tensor([3, -1]), nested_keys=torch.zeros(4, 16), nested_values=torch.zeros(4, 16),
                  strength=1.0, query_mask=None)
    fields.update(changes)
    return SubjectBinding(**fields)


@pytest.mark.parametrize("changes, message", [
    (dict(token_index=torch.tensor([3.0, -1.0])), "1-D integer"),
    (dict(token_index=torch.tensor([[3, -1]])), "1-D integer"),
    (dict(nested_values=None), "together"),
    (dict(nested_values=torch.zeros(5, 16)), "same shape"),
    (dict(nested_keys=torch.zeros(0, 16), nested_values=torch.zeros(0, 16)), "M >= 1"),
    (dict(strength=-0.5), "strength must be >= 0"),
    (dict(strength=float("nan")), "strength must be >= 0"),
    (dict(query_mask=torch.ones(10)), "query_mask must be"),
    (dict(token_weight=0.0), "token_weight must be a finite number > 0 .* set its strength to 0 instead"),
    (dict(token_weight=-1.0), "token_weight must be a finite number > 0"),
    (dict(token_weight=float("nan")), "token_weight must be a finite number > 0"),
    (dict(token_weight=float("inf")), "token_weight must be a finite number > 0"),
])
def test_malformed_binding_is_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        _binding(**changes)


@pytest.mark.parametrize("subjects, layer, message", [
    ([_binding(token_index=torch.tensor([3, -1, 4]))], {}, "3 entries for a batch of 2"),
    ([_binding(token_index=torch.tensor([77, -1]))], {}, "outside the 77 key tokens"),
    ([_binding(token_index=torch.tensor([-2, -1]))], {}, "outside the 77 key tokens"),
    ([_binding(), _binding(token_index=torch.tensor([3, 5]))], {}, "both bound to token 3 in row 0"),
    ([_binding(nested_keys=torch.zeros(4, 8), nested_values=torch.zeros(4, 8))], {}, "do not fit this layer"),
    ([_binding(nested_keys=torch.zeros(3, 4, 16), nested_values=torch.zeros(3, 4, 16))], {}, "do not fit this layer"),
    ([_binding(query_mask=torch.ones(1, 9))], {}, "does not fit 2 rows x 10 image tokens"),
    ([_binding(query_mask=torch.ones(3, 10))], {}, "does not fit 2 rows x 10 image tokens"),
    ([_binding()], dict(heads=3), "does not divide"),
    ([_binding()], dict(k=torch.zeros(2, 77, 8)), "same B and H\\*d"),
    ([_binding()], dict(v=torch.zeros(2, 76, 16)), "same B and H\\*d"),
    ([_binding()], dict(q=torch.zeros(3, 10, 16)), "same B and H\\*d"),
])
def test_binding_that_does_not_fit_the_layer_is_rejected(subjects, layer, message):
    args = dict(q=torch.zeros(2, 10, 16), k=torch.zeros(2, 77, 16), v=torch.zeros(2, 77, 16), heads=2)
    args.update(layer)
    with pytest.raises(ValueError, match=message):
        subject_attention(args["q"], args["k"], args["v"], args["heads"], subjects)
