"""Half-precision base models: on a GPU ComfyUI loads the UNet in fp16 or bf16. Here the trainer tests' tiny
SD1.5-layout UNet (32 channels, seeded random weights) is loaded in fp16 and in bf16 on the CPU, and the trainer and
the Nested Attention patch run on it, each against the same weights in float32.

What the frozen CLIP vision model and VAE make of a photo does not depend on the UNet's dtype, so the trainer's cache
and the subject's CLIP vision hidden state hold seeded random values of their shapes: encoding photos with the
full-size models would cost seconds here and show nothing more.
"""
import copy
import dataclasses
import json

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from trainer_setup import tiny_sd15_model, tiny_unet_config  # noqa: E402

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION = ("no", "bf16", "fp16")
SMALL_ENCODER = {"num_queries": 4, "depth": 1, "width": 64, "heads": 4}
CAPTION = "a photo of a toy on a table"
SUBJECT_POSITION = 5  # "toy" in the caption's tokens: <start> a photo of a toy
VISION_HIDDEN = (1, 257, 1024)  # CLIP ViT-L/14's penultimate hidden state of one photo
EXAMPLES = 2
# Adam's first update is about lr * sign(gradient) for every weight, so it weighs small gradients as much as large
# ones. Measured against the float32 base: cosine 0.998 to 1.000 in every case; 0.62 where an fp16 backward runs
# without loss scaling and the small gradients underflow to zero.
SAME_DIRECTION = 0.98
# Rounding to fp16 (11 significant bits) or bf16 (8) moves a value by up to its unit roundoff u, relative, per
# operation. Over the UNet's and the sampler's operations these errors partly cancel: the sample's relative RMS error
# against float32 measures 0.39 u in fp16 and 0.30 u in bf16 (unpatched: 0.29 u in both). The tolerance is u.
UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
# The subject moves the sample by about 3% of its RMS, 60 u in fp16 and 7.4 u in bf16: a patch acting only within
# rounding falls short of 5 u.
EFFECT_OVER_ROUNDING = 5


@pytest.fixture(scope="module")
def unets(fastcomposer_models) -> dict:
    """The tiny UNet's seeded random weights in float32, and loaded in fp16 and in bf16: ComfyUI builds a UNet in its
    config's dtype, where its checkpoint loader puts the dtype it picks for the device."""
    config = tiny_unet_config(fastcomposer_models[0])
    full = tiny_sd15_model(config)
    return {"fp32": full, **{name: tiny_sd15_model({**config, "dtype": dtype}, state_dict=full.model.state_dict())
                             for name, dtype in HALF.items()}}


@pytest.fixture(scope="module")
def fresh(unets, fastcomposer_models):
    """A fresh adapter for the tiny UNet, as the trainer starts one."""
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    return fresh_adapter(unets["fp32"], fastcomposer_models[1], "person", "ViT-L/14", "person", 0, **SMALL_ENCODER)


@pytest.fixture(scope="module")
def cached_examples(tmp_path_factory):
    """A training set of two captioned examples, each with a masked subject, and its complete encodings cache: the
    trainer reads only the cache (it opens an image only to fill a missing entry, so none is written)."""
    from subject_personalization.train.encodings import EncodedExample, save_encoded
    folder = tmp_path_factory.mktemp("cached_examples")
    (folder / "encodings").mkdir()
    generator = torch.Generator().manual_seed(0)
    lines = []
    for index in range(EXAMPLES):
        mask = torch.zeros(8, 8)  # the training resolution's latent size
        mask[2 * index:2 * index + 4, 2:6] = 1.0
        save_encoded(folder / "encodings" / f"{index:06d}.safetensors", EncodedExample(
            torch.randn(4, 8, 8, generator=generator), torch.randn(77, 768, generator=generator),
            torch.randn(768, generator=generator), [SUBJECT_POSITION],
            [torch.randn(VISION_HIDDEN, generator=generator)], [mask]))
        lines.append({"image": f"images/{index}.png", "caption": CAPTION,
                      "subjects": [{"word": "toy", "mask": f"masks/{index}.png"}]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def first_step(model, folder, adapter, mixed_precision: str, output):
    """(the trainer after its first step, that step's losses, the adapter's change in it)."""
    from subject_personalization.train.config import TrainConfig
    from subject_personalization.train.trainer import BaseModels, Trainer, step_generator
    config = TrainConfig(data=str(folder), output=str(output), encodings=str(folder / "encodings"), resolution=64,
                         batch_size=EXAMPLES, learning_rate=1e-3, subject_dropout=0.0, localization_weight=1e-3,
                         encoder=SMALL_ENCODER, seed=0, device="cpu", mixed_precision=mixed_precision)
    trainer = Trainer(config, BaseModels(model, name="tiny"), adapter=copy.deepcopy(adapter))
    # GradScaler starts at 2^16, where the first steps of an fp16 backward overflow and are skipped, on a float32 base
    # as well (under fp16 autocast); from 2^10 the first step is taken, so it can be compared.
    trainer.scaler.load_state_dict(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10).state_dict())
    before = {key: value.clone() for key, value in trainer.adapter.state_dict().items()}
    with torch.no_grad():  # the draws of train_step's first micro-batch
        losses = trainer.losses(trainer._examples(0, 0), step_generator(config.seed, 1, 0, 0, 0))
    trainer.train_step()
    change = torch.cat([(value - before[key]).reshape(-1) for key, value in trainer.adapter.state_dict().items()])
    return trainer, losses, change


@pytest.fixture(scope="module")
def float32_changes(unets, cached_examples, fresh, tmp_path_factory) -> dict:
    """Per mixed_precision setting, the adapter's change in the first step on the float32 base."""
    return {precision: first_step(unets["fp32"], cached_examples, fresh, precision, tmp_path_factory.mktemp("fp32"))[2]
            for precision in MIXED_PRECISION}


@pytest.mark.parametrize("mixed_precision", MIXED_PRECISION)
@pytest.mark.parametrize("base_dtype", list(HALF))
def test_the_trainer_steps_on_a_half_precision_base_as_on_a_float32_one(unets, cached_examples, fresh, float32_changes,
                                                                        tmp_path, base_dtype, mixed_precision):
    """One step on the base in fp16 or bf16 under each mixed_precision setting: the base stays in its dtype, the adapter
    and the losses are float32, and the update is the float32 base's."""
    trainer, losses, change = first_step(unets[base_dtype], cached_examples, fresh, mixed_precision, tmp_path)
    assert {parameter.dtype for parameter in trainer.unet.parameters()} == {HALF[base_dtype]}, \
        "the base must stay in the dtype ComfyUI loaded it in"
    assert {value.dtype for value in trainer.adapter.state_dict().values()} == {torch.float32}
    assert set(losses) == {"denoising_loss", "localization_loss", "loss"}
    for name, loss in losses.items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss), f"{name}: {loss}"
    assert torch.isfinite(change).all()
    cosine = float(torch.nn.functional.cosine_similarity(change, float32_changes[mixed_precision], dim=0))
    assert cosine > SAME_DIRECTION, f"the first update points elsewhere than on the float32 base: cosine {cosine:.3f}"


def test_the_nested_patch_samples_on_half_precision_unets_as_in_float32(unets, fresh, fastcomposer_models):
    """Apply Nested Attention, then ComfyUI's KSampler, on the same weights in float32, fp16 and bf16."""
    import nodes
    from subject_personalization.nodes.nested_apply import ApplyNestedAttention
    from subject_personalization.nodes.nested_encode import NestedAttentionEncode
    from subject_personalization.nodes.subjects import checked_subject
    clip = fastcomposer_models[1]
    adapter = copy.deepcopy(fresh).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # A fresh adapter's tokens ignore the image (zero output projection); perturbed, the subject moves the sample.
        adapter.resampler.proj_out.weight.normal_(0, 2.0, generator=generator)
        tokens = adapter.subject_tokens(torch.randn(VISION_HIDDEN, generator=generator)[None])
    photo = torch.rand(1, 64, 64, 3, generator=generator)
    subject = dataclasses.replace(checked_subject("person", photo, 1.0, 0.0, 1.0), adapter=adapter, tokens=tokens)
    (positive,) = NestedAttentionEncode().encode(clip, [subject], "a photo of a person on a table")
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")

    def sample(model):
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return nodes.KSampler().sample(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]

    patched = {name: sample(ApplyNestedAttention().apply(model, positive, 1.0, 0.0, 1.0)[0])
               for name, model in unets.items()}
    scale = patched["fp32"].square().mean().sqrt()
    for name, dtype in HALF.items():
        assert {parameter.dtype for parameter in unets[name].model.parameters()} == {dtype}
        error = float((patched[name] - patched["fp32"]).square().mean().sqrt() / scale)
        assert error <= UNIT_ROUNDOFF[name], f"{name}: relative RMS error {error:.2e} against float32"
        effect = float((patched[name] - sample(unets[name])).square().mean().sqrt() / scale)
        assert effect >= EFFECT_OVER_ROUNDING * UNIT_ROUNDOFF[name], \
            f"{name}: the subject moves the sample by only {effect:.2e}"
