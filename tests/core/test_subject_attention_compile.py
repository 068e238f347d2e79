"""What subject_attention does around its arithmetic: which kernel it takes, that a call reads nothing back from
the model's device (no .item(), .tolist() or .cpu() on its tensors: each would stall a GPU), and that its subject path
traces into one graph for torch.compile, as ComfyUI's TorchCompileModel node would compile it."""
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from subject_personalization.attention.subject_attention import SubjectBinding, subject_attention

subject_attention_module = importlib.import_module("subject_personalization.attention.subject_attention")

HEADS, WIDTH, QUERIES, CONTEXT = 8, 320, 256, 77
CONFIGS = {  # name: (subjects, per-row nested keys, mask, token weight, recording)
    "one subject": (1, False, False, 1.0, False),
    "four subjects, masks, weights, recording": (4, False, True, 2.0, True),
    "two subjects, per-row keys": (2, True, False, 1.0, False),
}


def layer(seed: int, config: str):
    count, per_row, masked, weight, _ = CONFIGS[config]
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, QUERIES, WIDTH, generator=generator)
    k, v = (torch.randn(2, CONTEXT, WIDTH, generator=generator) for _ in range(2))
    subjects = []
    for i in range(count):
        shape = (2, 16, WIDTH) if per_row else (16, WIDTH)
        mask = torch.rand(1, QUERIES, generator=generator) if masked else None
        subjects.append(SubjectBinding((3 + 2 * i, -1), torch.randn(shape, generator=generator),
                                       torch.randn(shape, generator=generator), 1.0, mask, weight))
    return q, k, v, subjects


def test_cpu_inference_takes_the_log_sum_exp_kernel(monkeypatch):
    """Without autograd, on the CPU, the subject path is the kernel that returns lse; with autograd, it is not."""
    taken = []
    kernel = subject_attention_module.attention_with_logsumexp
    monkeypatch.setattr(subject_attention_module, "attention_with_logsumexp",
                        lambda *args: taken.append(kernel(*args) is not None) or kernel(*args))
    q, k, v, subjects = layer(0, "one subject")
    with torch.no_grad():
        subject_attention(q, k, v, HEADS, subjects)
    subject_attention(q.requires_grad_(), k, v, HEADS, subjects)
    assert taken == [True, False]


@pytest.mark.parametrize("formulation", ["logsumexp", "indicator"])
@pytest.mark.parametrize("config", CONFIGS)
def test_a_call_reads_nothing_back_from_the_models_device(formulation, config, monkeypatch):
    """Every tensor of the layer is a FakeTensor (shapes, no data): reading one back raises. The bindings' token
    positions are host data, as the node hands them over."""
    if formulation == "indicator":
        monkeypatch.setattr(subject_attention_module, "attention_with_logsumexp", lambda *args: None)
    q, k, v, subjects = layer(1, config)
    record = CONFIGS[config][4]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = {name: mode.from_tensor(tensor) for name, tensor in (("q", q), ("k", k), ("v", v))}
    fake_subjects = [SubjectBinding(s.token_positions, *(None if x is None else mode.from_tensor(x) for x in (
        s.nested_keys, s.nested_values)), s.strength, None if s.query_mask is None else mode.from_tensor(s.query_mask),
        s.token_weight) for s in subjects]
    with mode, torch.no_grad():
        result = subject_attention(fake["q"], fake["k"], fake["v"], HEADS, fake_subjects, return_subject_probs=record)
        out = result[0] if record else result
        assert out.shape == q.shape
        with pytest.raises(DataDependentOutputException):  # the control: a read-back is caught here
            out.sum().item()


@pytest.mark.parametrize("config", CONFIGS)
def test_the_subject_path_traces_into_one_graph(config):
    q, k, v, subjects = layer(2, config)
    record = CONFIGS[config][4]

    def layer_call(q, k, v):
        return subject_attention(q, k, v, HEADS, subjects, return_subject_probs=record)

    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(layer_call)(q, k, v)
        assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
        assert explained.graph_count == 1
        compiled = torch.compile(layer_call, fullgraph=True, backend="eager")(q, k, v)
        eager = layer_call(q, k, v)
    torch._dynamo.reset()
    for got, want in zip(compiled if record else (compiled,), eager if record else (eager,)):
        assert torch.equal(got, want)
