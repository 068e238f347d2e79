"""Several subjects in one image: subject lists for both methods, regional masks, attention maps, preparation."""
import copy

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from unet_calls import LATENT, run_plain, run_wrapped, spy_on_subject_layers, subject_replacements  # noqa: E402

PROMPT = "a man <|image|> and a woman <|image|> reading a book together"
PLAIN_PROMPT = "a man and a woman reading a book together"
LEFT, RIGHT = (0.0, 0.5), (0.5, 1.0)


def image(seed, height=96, width=80):
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))


def subject_list(node, *specs):
    """specs: (word, image, keyword overrides); built with 'Add Subject' the way a graph chains it."""
    subjects = None
    for word, photo, overrides in specs:
        options = {"weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, **overrides}
        (subjects,) = node("SubjectPersonalization_AddSubject").add(photo, word, options.pop("weight"), options.pop("start_percent"),
                                             options.pop("end_percent"), subjects=subjects, **options)
    return subjects


def half_mask(node, columns, size=64):
    return node("SubjectPersonalization_SubjectRegionMask").mask(size, size, columns[0], 0.0, columns[1], 1.0)[0]


@pytest.fixture(scope="module")
def fastcomposer(fastcomposer_models, node):
    _, clip, _, clip_vision, fusion = fastcomposer_models
    encoder = node("SubjectPersonalization_FastComposerEncode")
    return lambda text, subjects=None, images=(), words="", fraction=0.2: encoder.encode(
        clip, clip_vision, fusion, text, words, fraction, subjects=subjects,
        **{f"subject_{i + 1}": photo for i, photo in enumerate(images)})[0]


@pytest.fixture(scope="module")
def masked(node, fastcomposer):
    """Two FastComposer subjects held to the left and right halves."""
    subjects = subject_list(node, ("man", image(1), {"mask": half_mask(node, LEFT)}),
                            ("woman", image(2), {"mask": half_mask(node, RIGHT)}))
    return fastcomposer(PLAIN_PROMPT, subjects)



def test_a_subject_list_encodes_like_the_image_inputs(node, fastcomposer):
    by_images = fastcomposer(PROMPT, images=(image(1), image(2)))
    by_list = fastcomposer(PLAIN_PROMPT, subject_list(node, ("man", image(1), {}), ("woman", image(2), {})))
    assert len(by_list) == len(by_images) == 2
    for (images_cond, images_options), (list_cond, list_options) in zip(by_images, by_list):
        assert torch.equal(images_cond, list_cond)
        assert (images_options.get("start_percent"), images_options.get("end_percent")) == \
               (list_options.get("start_percent"), list_options.get("end_percent"))


def test_subject_weight_and_schedule_shape_fastcomposer_conditioning(node, fastcomposer):
    text_only = fastcomposer(PLAIN_PROMPT, fraction=0.0)[0][0]
    man, woman = 2, 5  # token positions of 'man' and 'woman' (start token first)
    conditioning = fastcomposer(PLAIN_PROMPT, subject_list(
        node, ("man", image(1), {"start_percent": 0.5}), ("woman", image(2), {"weight": 0.0})))
    ranges = [(options.get("start_percent"), options.get("end_percent")) for _, options in conditioning]
    assert ranges == [(0.0, 0.5), (0.5, 1.0)], "the man starts at 0.5; the woman (weight 0) never fuses"
    (early, _), (late, _) = conditioning
    assert torch.equal(early, text_only)
    assert not torch.equal(late[0, man], text_only[0, man]) and torch.equal(late[0, woman], text_only[0, woman])
    half = fastcomposer(PLAIN_PROMPT, subject_list(node, ("man", image(1), {"weight": 0.5})), fraction=0.0)[0][0]
    full = fastcomposer(PLAIN_PROMPT, subject_list(node, ("man", image(1), {})), fraction=0.0)[0][0]
    assert torch.allclose(half[0, man], (text_only[0, man] + full[0, man]) / 2, atol=1e-6)


def test_the_same_subject_list_drives_nested_attention(fastcomposer_models, nested_adapter_files, node):
    _, clip, _, clip_vision, _ = fastcomposer_models
    (adapter,) = node("SubjectPersonalization_NestedAttentionLoader").load(nested_adapter_files["nested_person_sd15"].name)
    prompt = "a photo of a person on the beach"
    photo = image(3)
    (own,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, clip_vision, photo, "person", 1.0, 0.0, 1.0)
    by_adapter_subject = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, own, prompt)[0]
    generic = subject_list(node, ("person", photo, {}))
    by_generic_subject = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, generic, prompt, adapter, clip_vision)[0]
    assert torch.equal(by_adapter_subject[0][0], by_generic_subject[0][0])
    with pytest.raises(ValueError, match="carry no Nested Attention adapter: connect nested_adapter"):
        node("SubjectPersonalization_NestedAttentionEncode").encode(clip, generic, prompt)


def test_masks_restrict_each_subject_token_to_its_region_in_every_layer(fastcomposer_models, masked, node,
                                                                        monkeypatch):
    """At the attention layers themselves: only the masked-out queries of cond rows change."""
    from comfy.ldm.modules.attention import optimized_attention
    model = fastcomposer_models[0]
    patched = node("SubjectPersonalization_ApplySubjectMasks").apply(model, masked)[0]
    assert len(subject_replacements(patched)) == 16
    calls = []
    spy_on_subject_layers(monkeypatch, patched, calls)
    fused = masked[1][0]
    run_wrapped(patched, [fused, fused], [0, 1])
    assert len(calls) == 16
    for q, k, v, extra_options, out in calls:
        height, width = extra_options["activations_shape"][-2:]
        plain = optimized_attention(q, k, v, extra_options["n_heads"]).unflatten(1, (height, width))
        out = out.unflatten(1, (height, width))
        assert torch.equal(out[1], plain[1]), "the negative (uncond) row is never touched"
        if width >= 2:  # both halves hold whole tokens: every query is outside one subject's region
            assert not torch.allclose(out[0], plain[0], atol=1e-6)


def test_a_mask_of_all_ones_changes_nothing_and_masks_change_the_output(fastcomposer_models, node, fastcomposer):
    model = fastcomposer_models[0]
    ones = torch.ones(1, 64, 64)
    everywhere = fastcomposer(PLAIN_PROMPT, subject_list(node, ("man", image(1), {"mask": ones})))
    cond = everywhere[1][0]
    plain = run_plain(model, [cond])
    assert torch.allclose(run_wrapped(node("SubjectPersonalization_ApplySubjectMasks").apply(model, everywhere)[0], [cond], [0]), plain,
                          atol=1e-5, rtol=1e-4)
    left = fastcomposer(PLAIN_PROMPT, subject_list(node, ("man", image(1), {"mask": half_mask(node, LEFT)})))
    masked_out = run_wrapped(node("SubjectPersonalization_ApplySubjectMasks").apply(model, left)[0], [left[1][0]], [0])
    assert not torch.allclose(masked_out, run_plain(model, [left[1][0]]), atol=1e-4)


def test_mask_errors_are_clear_and_the_model_is_never_mutated(fastcomposer_models, node, fastcomposer):
    model, clip = fastcomposer_models[:2]
    before = copy.deepcopy(model.model_options)
    wide = fastcomposer(PLAIN_PROMPT, subject_list(node, ("man", image(1), {"mask": torch.ones(1, 64, 128)})))
    patched = node("SubjectPersonalization_ApplySubjectMasks").apply(model, wide)[0]
    unet_calls = []
    wrapper = patched.model_options["model_function_wrapper"]
    patched.set_model_unet_function_wrapper(lambda apply_model, args: unet_calls.append(1) or wrapper(apply_model, args))
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match=r"subject 'man': a subject mask is 128x64 but the image being generated is "
                                         r"64x64 \(another aspect ratio\): make the mask at the image's size"):
        node("KSampler").sample(patched, 0, 1, 5.0, "ddim", "ddim_uniform", wide, negative, latent)
    assert not unet_calls, "refused when sampling starts, before the first UNet call"
    with pytest.raises(ValueError, match="a subject takes one mask, got a batch of 2"):
        subject_list(node, ("man", image(1), {"mask": torch.ones(2, 64, 64)}))
    with pytest.raises(ValueError, match="no subject in this conditioning has a mask"):
        node("SubjectPersonalization_ApplySubjectMasks").apply(model, fastcomposer(PLAIN_PROMPT, subject_list(node, ("man", image(1), {}))))
    with pytest.raises(ValueError, match="binds 1 subject"):
        fastcomposer("a man <|image|> alone", subject_list(node, ("man", image(1), {}), ("woman", image(2), {})))
    assert model.model_options == before


def test_a_subject_word_missing_from_the_prompt_is_refused(node, fastcomposer):
    with pytest.raises(ValueError, match="subject word 'woman' is not in the prompt"):
        fastcomposer("a man and a dog reading", subject_list(node, ("man", image(1), {}), ("woman", image(2), {})))


def test_recorded_maps_are_per_subject_probabilities_in_their_regions(fastcomposer_models, masked, node):
    model = fastcomposer_models[0]
    patched = node("SubjectPersonalization_ApplySubjectMasks").apply(model, masked)[0]
    recording_model, recording = node("SubjectPersonalization_RecordSubjectAttention").record(patched, masked, "all", 0.0, 1.0)
    assert "model_function_wrapper" not in model.model_options
    fused = masked[1][0]
    with_masks = run_wrapped(patched, [fused, fused], [0, 1])
    recorded = run_wrapped(recording_model, [fused, fused], [0, 1])
    assert torch.allclose(recorded, with_masks, atol=1e-5, rtol=1e-4), "recording must not change the image"
    recorder = recording.recorder
    side = LATENT.shape[-1]
    assert recorder.count == 16 and set(recorder.resolutions) == {(side >> level,) * 2 for level in range(4)}
    maps = recorder.maps()
    assert maps.shape == (1, 2, side, side) and recording.words == ["man", "woman"]
    assert float(maps.min()) >= 0 and float(maps.sum(dim=1).max()) <= 1 + 1e-6, "probabilities of two of the keys"
    man, woman = maps[0]
    half = side // 2
    assert man[:, :half].sum() > 5 * man[:, half:].sum() and woman[:, half:].sum() > 5 * woman[:, :half].sum()

    up_only_model, up_only = node("SubjectPersonalization_RecordSubjectAttention").record(patched, masked, "output (up)", 0.0, 1.0)
    run_wrapped(up_only_model, [fused], [0])
    assert up_only.recorder.count == 9, "SD1.5 has 9 cross-attention layers in its output blocks"
    late_model, late = node("SubjectPersonalization_RecordSubjectAttention").record(patched, masked, "all", 0.9, 1.0)
    run_wrapped(late_model, [fused], [0])
    assert late.recorder.count == 0, "sigma 3 is early in the schedule: outside 0.9-1.0"

    heatmap, masks = node("SubjectPersonalization_SubjectAttentionMaps").draw(recording, torch.rand(1, 64, 64, 3), 0.6, 0.5)
    assert heatmap.shape[0] == 1 and heatmap.shape[1] > 64 and heatmap.shape[2:] == (64, 3)
    assert masks.shape == (2, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks[0, :, :32].mean() > masks[0, :, 32:].mean() and masks[1, :, 32:].mean() > masks[1, :, :32].mean()
    with pytest.raises(ValueError, match="no attention was recorded"):
        node("SubjectPersonalization_SubjectAttentionMaps").draw(late, torch.rand(1, 64, 64, 3), 0.6, 0.5)


def test_nested_attention_masks_and_recording_share_one_patch(fastcomposer_models, nested_adapter_files, node):
    """Record before or after Apply Nested Attention: the same output, the nested value kept, masks applied once."""
    model, clip, _, clip_vision, _ = fastcomposer_models
    (adapter,) = node("SubjectPersonalization_NestedAttentionLoader").load(nested_adapter_files["nested_person_sd15"].name)
    (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, clip_vision, image(4), "person", 1.0, 0.0, 1.0,
                                                        mask=half_mask(node, LEFT))
    (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, subjects, "a photo of a person in a park")
    cond = positive[0][0]
    nested = node("SubjectPersonalization_ApplyNestedAttention").apply(model, positive, 1.0, 0.0, 1.0)[0]
    expected = run_wrapped(nested, [cond], [0])
    record_after, _ = node("SubjectPersonalization_RecordSubjectAttention").record(nested, positive, "all", 0.0, 1.0)
    recorded_first, _ = node("SubjectPersonalization_RecordSubjectAttention").record(model, positive, "all", 0.0, 1.0)
    record_before = node("SubjectPersonalization_ApplyNestedAttention").apply(recorded_first, positive, 1.0, 0.0, 1.0)[0]
    for patched in (record_after, record_before, node("SubjectPersonalization_ApplySubjectMasks").apply(nested, positive)[0]):
        assert torch.allclose(run_wrapped(patched, [cond], [0]), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, run_plain(model, [cond]), atol=1e-4)


def test_prepare_subject_crops_the_masked_subject_onto_a_plain_background(node):
    photo = torch.rand(1, 120, 160, 3, generator=torch.Generator().manual_seed(5))
    (box,) = node("SubjectPersonalization_SubjectRegionMask").mask(160, 120, 0.25, 0.25, 0.5, 0.75)  # x 40..80, y 30..90
    prepared, mask = node("SubjectPersonalization_PrepareSubjectWithMask").prepare(photo, box, 60, 0.0, "white")
    assert prepared.shape == (1, 60, 60, 3) and mask.shape == (1, 60, 60)
    # The 40x60 box, padded to 60x60 with white columns 10 wide on each side; no resizing is needed.
    assert torch.equal(prepared[0, :, 10:50], photo[0, 30:90, 40:80])
    assert torch.equal(prepared[0, :, :10], torch.ones(60, 10, 3)) and torch.equal(mask[0, :, :10], torch.zeros(60, 10))
    with pytest.raises(ValueError, match="mask is 64x64 but the image is 160x120"):
        node("SubjectPersonalization_PrepareSubjectWithMask").prepare(photo, torch.ones(1, 64, 64), 60, 0.0, "white")
