"""Nested Attention patched into a real ComfyUI SD1.5 UNet: the contract of the patch, in the host."""
import copy
import dataclasses
import math
import sys

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from unet_calls import run_plain, run_wrapped, spy_on_subject_layers, subject_replacements  # noqa: E402

pytestmark = pytest.mark.compat  # the patch's contract, checked on every ComfyUI the pack supports

PROMPT = "a photo of a person walking a dog on the beach"
LONG_PROMPT = ", ".join(["a quiet street with old trees"] * 12) + ", and a person walking a dog"
LAYOUT_TOLERANCE = 1e-4  # a row batched with others may take another summation order (seen: 1.6e-5)
REFERENCE_TOLERANCE = 1e-4  # float32 layer vs float64 reference


@pytest.fixture(scope="module")
def nested(fastcomposer_models, node):
    """Two subjects from two freshly initialised adapters, bound to 'person' and 'dog'."""
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    model, clip, _, clip_vision, _ = fastcomposer_models
    person = fresh_adapter(model, clip, "person", "ViT-L/14", "person", seed=1)
    pet = fresh_adapter(model, clip, "dog", "ViT-L/14", "pet", seed=2)
    # A fresh adapter starts at the base model; perturb the encoders so the subjects have a visible effect.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in (person, pet):
            adapter.resampler.proj_out.weight.normal_(0, 0.05, generator=generator)
    images = [torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(person, clip_vision, images[0], "person", 1.0, 0.0, 1.0)
    (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(pet, clip_vision, images[1], "dog", 1.0, 0.0, 1.0, subjects=subjects)
    (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, subjects, PROMPT)
    (long_positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, subjects, LONG_PROMPT)
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry, lowres")
    return {"subjects": subjects, "positive": positive, "long_positive": long_positive, "negative": negative}


def apply(node, model, positive, strength=1.0):
    return node("SubjectPersonalization_ApplyNestedAttention").apply(model, positive, strength, 0.0, 1.0)[0]


def subject_patch_module(node):
    """The patch module of the pack as ComfyUI loaded it (from custom_nodes), which the nodes use."""
    return sys.modules[type(node("SubjectPersonalization_ApplyNestedAttention")).__module__.rsplit(".", 1)[0] + ".subject_patch"]


def narrow_adapter(family):
    """An adapter with the family's layer table and context width but 64-wide nested maps and a small encoder: what
    the trainer makes for a small test UNet, and an SDXL adapter without SDXL's size."""
    from subject_personalization.encoders.nested_adapter import NestedAdapter
    from subject_personalization.encoders.subject_resampler import ResamplerConfig
    from subject_personalization.encoders.unet_layers import CONTEXT_WIDTH, CrossAttentionLayer, cross_attention_layers
    layers = [CrossAttentionLayer(layer.key, layer.block, 64, 1) for layer in cross_attention_layers(family)]
    encoder = ResamplerConfig(num_queries=4, depth=1, width=64, heads=4, output_width=CONTEXT_WIDTH[family])
    return NestedAdapter(family, encoder, "person", "person", layers=layers).eval().requires_grad_(False)




def test_apply_patches_every_layer_of_a_clone_and_leaves_the_model_alone(fastcomposer_models, nested, node):
    model = fastcomposer_models[0]
    options_before = copy.deepcopy({k: v for k, v in model.model_options.items() if k != "transformer_options"})
    transformer_options_before = copy.deepcopy(model.model_options["transformer_options"])
    patched = apply(node, model, nested["positive"])
    assert len(subject_replacements(patched)) == 16  # every attn2 layer, in each UNet call carrying a subject
    assert "patches_replace" not in patched.model_options["transformer_options"]  # left to other packs
    assert "model_function_wrapper" in patched.model_options
    assert model.model_options["transformer_options"] == transformer_options_before
    assert {k: v for k, v in model.model_options.items() if k != "transformer_options"} == options_before
    assert not model.patches and patched.model is model.model  # weights shared, never modified


def test_strength_zero_is_the_unpatched_model(fastcomposer_models, nested, node):
    model = fastcomposer_models[0]
    positive, negative = nested["positive"], nested["negative"]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (plain,) = node("KSampler").sample(model, 0, 2, 5.0, "ddim", "ddim_uniform", positive, negative, latent)
    (zero,) = node("KSampler").sample(apply(node, model, positive, 0.0), 0, 2, 5.0, "ddim", "ddim_uniform",
                                      positive, negative, latent)
    (full,) = node("KSampler").sample(apply(node, model, positive, 1.0), 0, 2, 5.0, "ddim", "ddim_uniform",
                                      positive, negative, latent)
    assert torch.equal(zero["samples"], plain["samples"])  # exact: rows without an acting subject use ComfyUI's kernel
    assert not torch.equal(full["samples"], plain["samples"])


def test_only_the_positive_branch_changes_in_the_sampler(fastcomposer_models, nested, node):
    model = fastcomposer_models[0]
    recorded = {}

    def recorder(name):
        def cfg(args):
            recorded.setdefault(name, (args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
            return args["uncond_denoised"] + (args["cond_denoised"] - args["uncond_denoised"]) * args["cond_scale"]
        return cfg

    latent = {"samples": torch.zeros(1, 4, 16, 16)}  # 4 queries or more in every layer (the kernels' test below)
    for name, candidate in (("plain", model), ("patched", apply(node, model, nested["positive"]))):
        candidate = candidate.clone()
        candidate.set_model_sampler_cfg_function(recorder(name))
        node("KSampler").sample(candidate, 0, 1, 5.0, "ddim", "ddim_uniform", nested["positive"], nested["negative"], latent)
    assert torch.equal(recorded["patched"][1], recorded["plain"][1]), "the negative branch must be untouched"
    assert not torch.equal(recorded["patched"][0], recorded["plain"][0])


def test_subject_tokens_are_found_in_every_batch_layout(fastcomposer_models, nested, node):
    model = fastcomposer_models[0]
    positive, long_positive, negative = (nested[k][0][0] for k in ("positive", "long_positive", "negative"))
    patched = apply(node, model, nested["positive"] + nested["long_positive"])
    alone = run_wrapped(patched, [positive], [0])
    negative_alone = run_wrapped(patched, [negative], [1])
    assert not torch.equal(alone, run_plain(model, [positive])), "the subjects must change the positive row"
    assert torch.equal(negative_alone, run_plain(model, [negative]))

    together = run_wrapped(patched, [positive, negative], [0, 1])
    reversed_order = run_wrapped(patched, [negative, positive], [1, 0])
    torch.testing.assert_close(together[0], alone[0], rtol=0, atol=LAYOUT_TOLERANCE)
    torch.testing.assert_close(reversed_order[1], alone[0], rtol=0, atol=LAYOUT_TOLERANCE)
    torch.testing.assert_close(together[1], negative_alone[0], rtol=0, atol=LAYOUT_TOLERANCE)

    two_per_chunk = run_wrapped(patched, [positive, positive, negative, negative], [0, 1])
    for row, expected in ((0, alone[0]), (1, alone[0]), (2, negative_alone[0]), (3, negative_alone[0])):
        torch.testing.assert_close(two_per_chunk[row], expected, rtol=0, atol=LAYOUT_TOLERANCE)

    # Two positive prompts of different lengths batched together: the short one is repeated to 154 tokens.
    long_alone = run_wrapped(patched, [long_positive], [0])
    assert not torch.equal(long_alone, run_plain(model, [long_positive]))
    mixed = run_wrapped(patched, [positive.repeat(1, 2, 1), long_positive, negative.repeat(1, 2, 1)], [0, 0, 1])
    torch.testing.assert_close(mixed[0], alone[0], rtol=0, atol=LAYOUT_TOLERANCE)
    torch.testing.assert_close(mixed[1], long_alone[0], rtol=0, atol=LAYOUT_TOLERANCE)
    torch.testing.assert_close(mixed[2], negative_alone[0], rtol=0, atol=LAYOUT_TOLERANCE)


@pytest.mark.parametrize("kernel", ["ComfyUI's SDPA attention", "another kernel"])
def test_each_row_is_attended_once_and_uncond_rows_keep_the_kernels_bits(fastcomposer_models, nested, node, kernel,
                                                                       monkeypatch):
    """cond + uncond in one batch, in every layer: where ComfyUI attends with torch's SDPA (this tier's kernel), one
    subject attention call takes both rows and no second kernel call is made; under another kernel (here ComfyUI's
    SDPA wrapped, which the patch cannot see through), that kernel runs on the uncond row only and subject attention
    on the cond row only. Either way the uncond row's output is the kernel's on the whole batch, bit for bit."""
    from comfy.ldm.modules.attention import optimized_attention
    subject_patch = subject_patch_module(node)
    subject_attention, host_attention = subject_patch.subject_attention, subject_patch.host_attention
    kernel_rows, subject_rows, calls = [], [], []

    def counted_host_attention(q, *args, **kwargs):
        kernel_rows.append(q.shape[0])
        return host_attention(q, *args, **kwargs)

    def counted_subject_attention(q, *args, **kwargs):
        subject_rows.append(q.shape[0])
        return subject_attention(q, *args, **kwargs)

    if kernel == "another kernel":
        monkeypatch.setattr(subject_patch, "optimized_attention",
                            lambda q, k, v, heads, *args, **kwargs: optimized_attention(q, k, v, heads, *args, **kwargs))
    monkeypatch.setattr(subject_patch, "host_attention", counted_host_attention)
    monkeypatch.setattr(subject_patch, "subject_attention", counted_subject_attention)
    patched = apply(node, fastcomposer_models[0], nested["positive"])
    spy_on_subject_layers(monkeypatch, patched, calls)
    run_wrapped(patched, [nested["positive"][0][0], nested["negative"][0][0]], [0, 1])
    if kernel == "another kernel":
        assert kernel_rows == [1] * 16 and subject_rows == [1] * 16
    else:
        assert kernel_rows == [] and subject_rows == [2] * 16
    assert len(calls) == 16
    for q, k, v, extra_options, out in calls:
        assert torch.equal(out[1], optimized_attention(q, k, v, extra_options["n_heads"])[1])


def test_an_attention_backend_chosen_for_the_model_attends_the_rows_without_subjects(fastcomposer_models, nested,
                                                                                      node):
    """A backend set on the model (core's ModelAttentionBackend node calls set_model_optimized_attention) is what
    ComfyUI runs in every attention call: the patch keeps it for the uncond row and for calls without subjects."""
    from comfy.ldm.modules.attention import attention_pytorch
    model = fastcomposer_models[0].clone()
    backend_rows = []

    def backend(q, k, v, heads, *args, **kwargs):
        backend_rows.append(q.shape[0])
        return attention_pytorch(q, k, v, heads, *args, **kwargs)

    if hasattr(model, "set_model_optimized_attention"):  # 0.33.0 has it, 0.8.0 not yet
        model.set_model_optimized_attention(backend)
    else:  # before: the key that optimized_attention reads, set directly
        model.model_options["transformer_options"]["optimized_attention_override"] = \
            lambda function, *args, **kwargs: backend(*args, **kwargs)
    patched = apply(node, model, nested["positive"])
    contexts = [nested["positive"][0][0], nested["negative"][0][0]]
    out = run_wrapped(patched, contexts, [0, 1])
    assert backend_rows.count(1) == 16  # each attn2's uncond row, by the backend (each attn1 takes both rows)
    backend_rows.clear()
    unpatched = run_wrapped(patched, [nested["negative"][0][0]] * 2, [1, 1])  # no subject anywhere
    assert backend_rows == [2] * 32  # attn1 and attn2 of every block, each over the batch
    torch.testing.assert_close(unpatched, run_plain(model, [nested["negative"][0][0]] * 2), rtol=0, atol=0)
    assert not torch.equal(out[0], unpatched[0])


REAL_SHAPES = [(4096, 320, 8), (1024, 640, 8), (256, 1280, 8), (64, 1280, 8),  # SD1.5 at 512x512
               (4096, 640, 10), (1024, 1280, 20)]                                 # SDXL at 1024x1024
SMALL_SHAPES = [(256, 320, 8), (64, 640, 8), (16, 1280, 8), (4, 1280, 8)]         # SD1.5 at 128x128 (the tests' size)
FEWEST_QUERIES = [(2, 1280, 8), (1, 1280, 8)]                                     # below: SD1.5 at 96 and 64 px


@pytest.mark.parametrize("kernel", ["attention_pytorch", "attention_sub_quad"])
def test_comfyuis_kernels_give_a_row_alone_the_bits_it_gets_in_the_batch(comfy, kernel):
    """The patch runs ComfyUI's kernel on the rows without an acting subject only, so those rows keep the unpatched
    bits where the kernel is batch-invariant: PyTorch's SDPA (this tier's kernel, ComfyUI's default on NVIDIA GPUs)
    at every attn2 shape from 4 queries up; ComfyUI's sub-quadratic CPU default at every attn2 shape of SD1.5 at 512
    and SDXL at 1024. Below those, a row alone is rounded differently (SDPA on a CPU, torch 2.9: at 1 or 2 queries; the
    sub-quadratic kernel's small batched matmuls: at small latents): by one rounding step, bounded."""
    from comfy.ldm.modules import attention
    attend = getattr(attention, kernel)
    invariant = REAL_SHAPES + (SMALL_SHAPES if kernel == "attention_pytorch" else [])
    generator = torch.Generator().manual_seed(0)
    for queries, width, heads in REAL_SHAPES + SMALL_SHAPES + FEWEST_QUERIES:
        q = torch.randn(2, queries, width, generator=generator)
        k, v = torch.randn(2, 2, 77, width, generator=generator)
        together, alone = attend(q, k, v, heads)[1], attend(q[1:], k[1:], v[1:], heads)[0]
        if (queries, width, heads) in invariant:
            assert torch.equal(together, alone), f"{kernel} at {queries} x {width}"
        else:
            torch.testing.assert_close(alone, together, rtol=0, atol=1e-6 * together.abs().max().item())


def test_each_subject_acts_through_its_own_token_with_the_nested_equation(fastcomposer_models, nested, node, comfy):
    """Capture one layer's real q, k, v (through a replacement another pack installed first, which the patch
    must wrap), then check the patched layer against a float64 evaluation of docs/methods.md §2.1."""
    from subject_personalization.nodes.nested_encode import bound_token_positions
    model, clip = fastcomposer_models[:2]
    block, captured = ("input", 4, 0), {}

    def other_pack(q, k, v, extra_options):
        captured.update(q=q.clone(), k=k.clone(), v=v.clone(), extra_options=dict(extra_options))
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    recording = model.clone()
    recording.set_model_attn2_replace(other_pack, *block)
    patched = apply(node, recording, nested["positive"])
    run_wrapped(patched, [nested["positive"][0][0], nested["negative"][0][0]], [0, 1])
    q, k, v = (captured[name].double() for name in ("q", "k", "v"))
    assert q.shape[0] == 2, "the other pack's replacement sees the whole batch, once"
    ours = subject_replacements(patched)[block](captured["q"], captured["k"], captured["v"], captured["extra_options"])

    _, positions = bound_token_positions(clip, PROMPT, ["person", "dog"])
    heads = captured["extra_options"]["n_heads"]
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)
    qh, kh, vh = split(q), split(k), split(v)
    weights = (qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])).softmax(-1)
    expected = weights @ vh
    for subject, position in zip(nested["subjects"], positions):
        keys, values = subject.adapter.projections.project(subject.tokens)[f"{block[0]}_{block[1]}_{block[2]}"]
        nested_value = (qh[:1] @ split(keys.double()).transpose(-1, -2) / math.sqrt(qh.shape[-1])).softmax(-1) @ split(values.double())
        expected[:1] += weights[:1, :, :, position:position + 1] * (nested_value - vh[:1, :, position:position + 1])
    expected = expected.transpose(1, 2).flatten(2)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=REFERENCE_TOLERANCE)
    torch.testing.assert_close(ours[1:].double(), (weights @ vh).transpose(1, 2).flatten(2)[1:], rtol=0, atol=REFERENCE_TOLERANCE)


def test_the_patched_layer_reads_nothing_back_and_compiles_into_one_graph(fastcomposer_models, nested, node,
                                                                          monkeypatch):
    """The attn2 replacement itself, on one layer's real q, k, v and extra_options from a sampler-made call: with the
    layer's tensors as FakeTensors (shapes, no data) it runs, so it reads nothing back from the model's device; and
    torch._dynamo traces it, subject path included, into one graph without a break (ComfyUI's TorchCompileModel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    block, calls = ("input", 4, 0), []
    patched = apply(node, fastcomposer_models[0], nested["positive"])
    replacement = subject_replacements(patched)[block]
    spy_on_subject_layers(monkeypatch, patched, calls)
    run_wrapped(patched, [nested["positive"][0][0], nested["negative"][0][0]], [0, 1])  # also fills the layer caches
    q, k, v, extra_options, _ = next(call for call in calls if call[3]["block"] + (call[3]["block_index"],) == block)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_q, fake_k, fake_v = (mode.from_tensor(x) for x in (q, k, v))
    with mode, torch.no_grad():
        assert replacement(fake_q, fake_k, fake_v, extra_options).shape == q.shape
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(replacement)(q, k, v, extra_options)
        compiled = torch.compile(replacement, fullgraph=True, backend="eager")(q, k, v, extra_options)
        eager = replacement(q, k, v, extra_options)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
    assert torch.equal(compiled, eager)


def test_conditioning_without_subjects_is_refused(fastcomposer_models, nested, node):
    with pytest.raises(ValueError, match="binds no Nested Attention subject"):
        apply(node, fastcomposer_models[0], nested["negative"])


def test_subject_word_missing_from_the_prompt_is_refused(fastcomposer_models, nested, node):
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        node("SubjectPersonalization_NestedAttentionEncode").encode(fastcomposer_models[1], nested["subjects"], "a photo of a person")


def test_a_patched_model_sampled_without_its_subjects_is_refused_before_the_first_step(fastcomposer_models, nested,
                                                                                        node):
    """The sampler's positive must carry a subject token of the patch: an ordinary CLIP Text Encode does not, and
    the negative never counts."""
    model, clip = fastcomposer_models[:2]
    patched = apply(node, model, nested["positive"])
    unet_calls = []
    wrapper = patched.model_options["model_function_wrapper"]
    patched.set_model_unet_function_wrapper(lambda apply_model, args: unet_calls.append(1) or wrapper(apply_model, args))
    (plain_prompt,) = node("CLIPTextEncode").encode(clip, "a photo of a cat on the beach")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    message = (r"no positive conditioning of this sampler carries a subject token of the patched MODEL \(subjects "
               r"'person', 'dog'\): connect the conditioning from the subject encode node \(Nested Attention Encode / "
               r"FastComposer Encode\) to both the patch node and the sampler's positive input")
    for positive, negative in ((plain_prompt, nested["negative"]), (nested["negative"], nested["positive"])):
        with pytest.raises(ValueError, match=message):
            node("KSampler").sample(patched, 0, 1, 5.0, "ddim", "ddim_uniform", positive, negative, latent)
    assert not unet_calls


def test_one_positive_of_several_carrying_the_subjects_is_enough_and_is_checked_once_per_run(fastcomposer_models,
                                                                                              nested, node,
                                                                                              monkeypatch):
    """Another positive without subjects next to it, and subjects acting on the second half of the schedule only
    (not at the first step): no error; the check runs when sampling starts, not at each step."""
    model, clip = fastcomposer_models[:2]
    subject_patch = subject_patch_module(node)
    check, checks = subject_patch.check_sampling_inputs, []
    monkeypatch.setattr(subject_patch, "check_sampling_inputs", lambda *args: checks.append(1) or check(*args))
    late = node("SubjectPersonalization_ApplyNestedAttention").apply(model, nested["positive"], 1.0, 0.5, 1.0)[0]
    (street,) = node("CLIPTextEncode").encode(clip, "a quiet street")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node("KSampler").sample(late, 0, 2, 5.0, "ddim", "ddim_uniform", street + nested["positive"], nested["negative"],
                            latent)
    assert len(checks) == 1


def test_a_patch_stacked_over_another_packs_wrapper_checks_the_subjects_below_it(fastcomposer_models, nested, node):
    """Record Subject Attention on a model another pack wrapped after Apply Nested Attention stacks a second patch,
    whose subjects are all in the first: the check when sampling starts sees both."""
    patched = apply(node, fastcomposer_models[0], nested["positive"])
    ours = patched.model_options["model_function_wrapper"]
    patched.set_model_unet_function_wrapper(lambda apply_model, args: ours(apply_model, args))  # a wrapper that chains
    recorded, _ = node("SubjectPersonalization_RecordSubjectAttention").record(patched, nested["positive"], "all", 0.0, 1.0)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node("KSampler").sample(recorded, 0, 1, 5.0, "ddim", "ddim_uniform", nested["positive"], nested["negative"], latent)
    with pytest.raises(ValueError, match=r"no positive conditioning of this sampler carries .* \(subjects 'person', "
                                         r"'dog'\)"):
        node("KSampler").sample(recorded, 0, 1, 5.0, "ddim", "ddim_uniform", nested["negative"], nested["negative"],
                                latent)


def test_an_adapter_for_another_base_model_is_refused_and_nothing_is_patched(fastcomposer_models, nested, node):
    from subject_personalization.nodes.subjects import BINDINGS_KEY
    model, clip, _, clip_vision, _ = fastcomposer_models
    before = copy.deepcopy(model.model_options)
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    sdxl_adapter = narrow_adapter("sdxl")
    (sdxl_subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(sdxl_adapter, clip_vision, photo, "person", 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"is for sdxl \(text encoders \['g', 'l'\]\) but this CLIP has text encoders "
                                         r"\['l'\]: use the CLIP of the model the adapter was made for"):
        node("SubjectPersonalization_NestedAttentionEncode").encode(clip, sdxl_subjects, PROMPT)
    # An SD1.5 CLIP with an SDXL adapter is refused above; a conditioning that binds one anyway (made by hand here)
    # is refused by the patch node, whose MODEL is SD1.5.
    cond, options = nested["positive"][0]
    (person, signature), *others = options[BINDINGS_KEY]
    swapped = [[cond, {**options, BINDINGS_KEY: ((dataclasses.replace(person, adapter=sdxl_adapter), signature),
                                                 *others)}]]
    with pytest.raises(ValueError, match=r"trained for sdxl \(context 2048\) but the MODEL is sd15 \(context 768\)"):
        apply(node, model, swapped)
    (narrow_subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(narrow_adapter("sd15"), clip_vision, photo, "person",
                                                               1.0, 0.0, 1.0)
    (narrow_positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, narrow_subjects, PROMPT)
    with pytest.raises(ValueError, match=r"made for a UNet whose attn2 layers differ from this MODEL's .*use an "
                                         r"adapter made for this model"):
        apply(node, model, narrow_positive)
    assert model.model_options == before and not model.patches
