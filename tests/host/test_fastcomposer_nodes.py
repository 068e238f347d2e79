"""FastComposer nodes inside ComfyUI: loading both file formats, delayed conditioning in the sampler, a subject's mask
never ignored in silence, errors."""
import pytest
import torch

from hostenv import require_comfyui

require_comfyui()

PROMPT = "a man <|image|> and a woman <|image|> reading a book together"


def image(seed, height=96, width=80):
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def encode(fastcomposer_models, node):
    _, clip, _, clip_vision, fusion = fastcomposer_models
    encoder = node("SubjectPersonalization_FastComposerEncode")
    return lambda text, *subjects, words="", fraction=0.2, clip=clip: encoder.encode(
        clip, clip_vision, fusion, text, words, fraction,
        **{f"subject_{i + 1}": s for i, s in enumerate(subjects) if s is not None})[0]


def weights(models):
    model, clip, vae, clip_vision, fusion = models
    return {"unet": model.model.state_dict(), "clip": clip.cond_stage_model.state_dict(),
            "vae": vae.first_stage_model.state_dict(), "vision": clip_vision.model.state_dict(), "fusion": fusion.state_dict()}


def test_safetensors_conversion_loads_the_same_models(fastcomposer_file, fastcomposer_models, node):
    from subject_personalization.encoders.fastcomposer_checkpoint import convert_to_safetensors
    converted = convert_to_safetensors(fastcomposer_file, fastcomposer_file.with_name("fastcomposer.safetensors"))
    try:
        from_safetensors = weights(node("SubjectPersonalization_FastComposerLoader").load(converted.name))
        from_pickle = weights(fastcomposer_models)
        for part, tensors in from_safetensors.items():
            assert tensors.keys() == from_pickle[part].keys(), part
            for key, tensor in tensors.items():
                assert torch.equal(tensor, from_pickle[part][key]), f"{part}: {key}"
    finally:
        converted.unlink()


def test_subject_words_syntax_equals_marker_syntax(encode):
    subjects = (image(1), image(2))
    by_markers = encode(PROMPT, *subjects)
    by_words = encode(PROMPT.replace(" <|image|>", ""), *subjects, words="man, woman")
    for (markers_cond, _), (words_cond, _) in zip(by_markers, by_words):
        assert torch.equal(markers_cond, words_cond)


def test_several_images_of_one_subject_are_averaged_and_order_matters(encode):
    both = encode("a man <|image|>", torch.cat([image(1), image(2)]))[1][0]
    first = encode("a man <|image|>", image(1))[1][0]
    assert not torch.equal(both, first)
    swapped = encode(PROMPT, image(2), image(1))[1][0]
    assert not torch.equal(encode(PROMPT, image(1), image(2))[1][0], swapped)


def test_delayed_subject_conditioning_switches_in_the_sampler(comfy, fastcomposer_models, encode, node):
    model, clip = fastcomposer_models[0].clone(), fastcomposer_models[1]
    positive = encode(PROMPT, image(1), image(2), fraction=0.3)
    text_only, fused = positive[0][0], positive[1][0]
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry")
    seen = []

    def record(apply_model, args):
        context = args["c"]["c_crossattn"]
        for chunk, kind in enumerate(args["cond_or_uncond"]):
            rows = context.chunk(len(args["cond_or_uncond"]))[chunk]
            seen.append((float(args["timestep"][0]), kind, rows[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(record)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node("KSampler").sample(model, 0, 10, 5.0, "ddim", "ddim_uniform", positive, negative, latent)

    switch_sigma = model.get_model_object("model_sampling").percent_to_sigma(0.3)
    positives = [(sigma, context) for sigma, kind, context in seen if kind == 0]
    assert len(positives) == 10
    for sigma, context in positives:
        expected = text_only if sigma > switch_sigma else fused
        assert torch.equal(context, expected[0].to(context.dtype)), f"sigma {sigma:.3f}, switch at {switch_sigma:.3f}"
    text_only_steps = sum(sigma > switch_sigma for sigma, _ in positives)
    assert 0 < text_only_steps < 10
    assert all(torch.equal(context, negative[0][0][0]) for _, kind, context in seen if kind == 1), "the negative is never fused"


def test_a_masked_subject_is_sampled_only_by_a_model_that_applies_its_mask(fastcomposer_models, node):
    """The MODEL of 'Load FastComposer' refuses, before the first UNet call, a masked subject without 'Apply Subject
    Masks' (recording its attention is not applying its mask); a clone of the patched MODEL on its way to the sampler
    samples it. (Unmasked subjects on the plain MODEL: test_delayed_subject_conditioning_switches_in_the_sampler.)"""
    model, clip, _, clip_vision, fusion = fastcomposer_models
    left = node("SubjectPersonalization_SubjectRegionMask").mask(64, 64, 0.0, 0.0, 0.5, 1.0)[0]
    (masked,) = node("SubjectPersonalization_AddSubject").add(image(1), "man", 1.0, 0.0, 1.0, mask=left)
    (unmasked,) = node("SubjectPersonalization_AddSubject").add(image(2), "woman", 1.0, 0.0, 1.0)
    encode = node("SubjectPersonalization_FastComposerEncode").encode
    (positive,) = encode(clip, clip_vision, fusion, "a man and a woman reading", "", 0.5, subjects=unmasked + masked)
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    unet_calls = []
    spied = model.clone()
    spied.set_model_unet_function_wrapper(lambda apply_model, args: unet_calls.append(1) or
                                          apply_model(args["input"], args["timestep"], **args["c"]))
    (recording_only, _) = node("SubjectPersonalization_RecordSubjectAttention").record(spied, positive, "all", 0.0, 1.0)
    for unapplied in (spied, recording_only):  # a subject patch that records is no mask
        with pytest.raises(ValueError, match=r"^the mask of subject 'man' would do nothing: the MODEL this sampler "
                                             r"uses does not apply it .* Pass the MODEL through 'Apply Subject Masks'"):
            node("KSampler").sample(unapplied, 0, 1, 5.0, "ddim", "ddim_uniform", positive, negative, latent)
    assert not unet_calls, "refused when sampling starts, before the first UNet call"

    (patched,) = node("SubjectPersonalization_ApplySubjectMasks").apply(model, positive)
    (recording, _) = node("SubjectPersonalization_RecordSubjectAttention").record(patched, positive, "all", 0.0, 1.0)
    (samples,) = node("KSampler").sample(recording, 0, 1, 5.0, "ddim", "ddim_uniform", positive, negative, latent)
    assert torch.isfinite(samples["samples"]).all()


def test_zero_fraction_fuses_from_the_first_step(encode):
    positive = encode(PROMPT, image(1), image(2), fraction=0.0)
    assert len(positive) == 1 and "start_percent" not in positive[0][1]


@pytest.mark.parametrize("text, subjects, words, message", [
    (PROMPT, (image(1),), "", "binds 2 subject"),
    ("a man <|image|>", (image(1), image(2)), "", "binds 1 subject"),
    ("<|image|> a man", (image(1),), "", "no word before it"),
    ("a man <|image|><|image|>", (image(1), image(2)), "", "same word"),
    ("a man and a woman", (image(1), image(2)), "man, dog", "'dog' is not in the prompt"),
    ("a man <|image|>", (torch.zeros(0, 64, 64, 3),), "", "empty"),
    ("a man <|image|>", (None, image(1)), "", "subject_1 is empty"),
])
def test_bad_input_gets_a_clear_error(encode, text, subjects, words, message):
    with pytest.raises(ValueError, match=message):
        encode(text, *subjects, words=words)


def test_an_sdxl_clip_is_refused(comfy, encode):
    import comfy.sd
    import comfy.sdxl_clip

    class SDXLTarget:
        clip, tokenizer, params = comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer, {}

    sdxl_clip = comfy.sd.CLIP(target=SDXLTarget(), model_options={"dtype": torch.float16})
    with pytest.raises(ValueError, match="SDXL"):
        encode(PROMPT, image(1), image(2), clip=sdxl_clip)


def test_loader_refuses_files_that_are_not_fastcomposer(comfy, node):
    from safetensors.torch import save_file
    folder = comfy.model_dir("fastcomposer")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, folder / "sd15.safetensors")
    torch.save({"weight": torch.zeros(1)}, folder / "renamed.safetensors")
    try:
        with pytest.raises(ValueError, match="ordinary Stable Diffusion checkpoint"):
            node("SubjectPersonalization_FastComposerLoader").load("sd15.safetensors")
        with pytest.raises(ValueError, match="is a PyTorch pickle, not safetensors"):
            node("SubjectPersonalization_FastComposerLoader").load("renamed.safetensors")
    finally:
        (folder / "sd15.safetensors").unlink()
        (folder / "renamed.safetensors").unlink()
