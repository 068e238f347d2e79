"""FastComposer through the pack equals the reference computation, on seeded random weights in the official layout.

Tolerances (float32 in ComfyUI vs float64 references; each test prints what it measured):
- fused conditioning: max abs error <= 2e-5 (measured 2.5e-6 to 2.7e-6: 12 CLIP-L + 24 ViT-L layers + fusion in fp32)
- UNet, VAE decode / encode, text encoder (and pooled), vision tower: max abs error relative to the output's max
  magnitude <= 5e-5 (measured 3.0e-6, 6.1e-6 / 5.1e-6, 5.1e-7 / 4.9e-7, 6.9e-7)
"""
from pathlib import Path

import pytest
import torch

from hostenv import require_comfyui
from subject_personalization.tools.random_fastcomposer import write_random_fastcomposer

require_comfyui()
pytest.importorskip("diffusers", reason="the exactness tests compare against diffusers / transformers")
from reference import fastcomposer_hf as hf  # noqa: E402
from reference.fusion import fuse as reference_fuse  # noqa: E402

pytestmark = pytest.mark.long
FUSED_ATOL = 2e-5
RELATIVE_TOLERANCE = 5e-5

PROMPTS = [
    "a man <|image|> and a woman <|image|> reading a book together",
    "a photo of a schnauzerdogfriend <|image|> in the snow",          # one word, several tokens
    "a man and a man <|image|> talking",                               # repeated word: the marked one counts
    "a man<|image|>, a woman<|image|>! reading, laughing.",            # punctuation, no spaces
    "a man <|image|>, a woman <|image|>, a dog <|image|> and a cat <|image|> in a park",  # four subjects
]


@pytest.fixture(scope="module")
def fastcomposer_file(comfy):
    """Every tensor its own draw (5.5 GB), so a swapped layer or projection cannot hide; gone after the module."""
    path = write_random_fastcomposer(comfy.model_dir("fastcomposer") / "fastcomposer_independent.bin", seed=0)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def fastcomposer_models(fastcomposer_file, node):
    return node("SubjectPersonalization_FastComposerLoader").load(fastcomposer_file.name)


@pytest.fixture(scope="module")
def checkpoint(fastcomposer_file):
    return torch.load(fastcomposer_file, map_location="cpu", weights_only=True, mmap=True)


@pytest.fixture(scope="module")
def text_model(checkpoint):
    return hf.text_encoder(checkpoint)


@pytest.fixture(scope="module")
def vision_model(checkpoint):
    return hf.vision_encoder(checkpoint)


def relative_error(ours, expected):
    return ((ours.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# The UNet and VAE references come first: each exists only during its test, before the module's text and
# vision references are built (the float64 UNet alone takes 7 GB).
def test_unet_matches_diffusers(fastcomposer_models, checkpoint):
    model = fastcomposer_models[0].model
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    timesteps = torch.tensor([999.0, 421.0])
    with torch.no_grad():
        ours = model.diffusion_model(latents, timesteps=timesteps, context=context)
        reference = hf.unet(checkpoint)
        expected = reference(latents.double(), timesteps.double(), encoder_hidden_states=context.double()).sample
    del reference
    error = relative_error(ours, expected)
    print(f"measured UNet relative error {error:.2e}")
    assert error <= RELATIVE_TOLERANCE, f"relative error {error:.2e}"


def test_vae_matches_diffusers(fastcomposer_models, checkpoint):
    vae = fastcomposer_models[2]
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    images = torch.rand(1, 64, 64, 3, generator=generator)
    reference = hf.vae(checkpoint)
    with torch.no_grad():
        decoded = vae.decode(latents)
        expected_decoded = ((reference.decode(latents.double()).sample + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
        encoded = vae.encode(images)
        expected_encoded = reference.encode(images.double().movedim(-1, 1) * 2.0 - 1.0).latent_dist.mode()
    errors = relative_error(decoded, expected_decoded), relative_error(encoded, expected_encoded)
    print(f"measured VAE relative error decode {errors[0]:.2e}, encode {errors[1]:.2e}")
    assert max(errors) <= RELATIVE_TOLERANCE


# Subject photos of four shapes (portrait, landscape, square, odd); each prompt binds them in its own order.
SUBJECT_IMAGES = [torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
                  for seed, shape in enumerate([(3, 240, 180), (3, 200, 260), (3, 224, 224), (3, 150, 151)])]


def photo_order(count, first):
    """Which photos (indices into SUBJECT_IMAGES) a prompt with count subjects binds."""
    return [(first + i) % len(SUBJECT_IMAGES) for i in range(count)]


@pytest.fixture(scope="module")
def reference_embeds(vision_model):
    """The reference pipeline's object embedding of each subject photo, (4, 768) float64."""
    with torch.no_grad():
        return vision_model(pixel_values=torch.stack([hf.preprocess(image) for image in SUBJECT_IMAGES])).image_embeds


def as_comfy_image(image):
    return (image.permute(1, 2, 0).float() / 255.0)[None]


def test_fused_conditioning_matches_reference(comfy, fastcomposer_models, checkpoint, text_model, reference_embeds, node):
    _, clip, _, clip_vision, fusion = fastcomposer_models
    tokenizer = hf.reference_tokenizer(Path(comfy.comfyui_path) / "comfy" / "sd1_tokenizer")
    fusion_params = hf.float64_part(checkpoint, "postfuse_module.")
    encode = node("SubjectPersonalization_FastComposerEncode")
    for prompt_index, prompt in enumerate(PROMPTS):
        images = photo_order(prompt.count("<|image|>"), first=prompt_index)
        comfy_images = {f"subject_{i + 1}": as_comfy_image(SUBJECT_IMAGES[image]) for i, image in enumerate(images)}
        (conditioning,) = encode.encode(clip, clip_vision, fusion, prompt, "", 0.0, **comfy_images)
        ours = conditioning[0][0]

        input_ids, positions = hf.reference_tokenize(prompt, tokenizer)
        with torch.no_grad():
            text_states = text_model(input_ids).last_hidden_state
        expected = text_states.clone()
        for subject, position in enumerate(positions):
            expected[0, position] = reference_fuse(text_states[0, position], reference_embeds[images[subject]],
                                                   fusion_params)

        assert ours.shape == expected.shape == (1, 77, 768)
        error = (ours.double() - expected).abs().max().item()
        print(f"measured fused conditioning max abs error {error:.2e}: {prompt!r}")
        assert error <= FUSED_ATOL, f"{prompt!r}: max abs error {error:.2e}"
        changed = (ours[0] - text_states[0].float()).abs().amax(-1) > 1e-2
        assert changed.nonzero().flatten().tolist() == positions, f"{prompt!r}: fused positions differ from the reference"


def test_long_prompt_binds_a_word_in_the_second_chunk(fastcomposer_models, checkpoint, reference_embeds, node):
    _, clip, _, clip_vision, fusion = fastcomposer_models
    filler = ", ".join(["a quiet street with old trees"] * 12)
    prompt = f"{filler}, and a dog <|image|> sitting"
    (conditioning,) = node("SubjectPersonalization_FastComposerEncode").encode(clip, clip_vision, fusion, prompt, "", 0.0,
                                                        subject_1=as_comfy_image(SUBJECT_IMAGES[1]))
    fused = conditioning[0][0]
    plain, _ = clip.encode_from_tokens(clip.tokenize(prompt.replace(" <|image|>", "")), return_pooled=True)
    assert fused.shape[1] > 77 and fused.shape == plain.shape
    changed = ((fused - plain).abs().amax(-1)[0] > 1e-4).nonzero().flatten().tolist()
    assert len(changed) == 1 and changed[0] >= 77
    dog_token = clip.tokenizer.clip_l.tokenizer("dog")["input_ids"][1]
    assert clip.tokenize(prompt.replace(" <|image|>", ""))["l"][changed[0] // 77][changed[0] % 77][0] == dog_token
    expected = reference_fuse(plain[0, changed[0]].double(), reference_embeds[1],
                              hf.float64_part(checkpoint, "postfuse_module."))
    assert (fused[0, changed[0]].double() - expected).abs().max() <= FUSED_ATOL


def test_text_encoder_matches_transformers(fastcomposer_models, text_model):
    clip = fastcomposer_models[1]
    tokens = clip.tokenize("a man and a woman reading a book together, photograph")
    ours, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    ids = torch.tensor([[token for token, _ in tokens["l"][0]]])
    with torch.no_grad():
        expected = text_model(ids)
    errors = relative_error(ours, expected.last_hidden_state), relative_error(pooled, expected.pooler_output)
    print(f"measured text encoder relative error {errors[0]:.2e}, pooled {errors[1]:.2e}")
    assert max(errors) <= RELATIVE_TOLERANCE


def test_vision_tower_matches_transformers(fastcomposer_models, vision_model):
    clip_vision = fastcomposer_models[3]
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = clip_vision.model(pixel_values=pixels, intermediate_output=-2)[2]
        expected = vision_model(pixel_values=pixels.double()).image_embeds
    error = relative_error(ours, expected)
    print(f"measured vision tower relative error {error:.2e}")
    assert error <= RELATIVE_TOLERANCE
