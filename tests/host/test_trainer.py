"""The Nested Attention trainer on a tiny SD1.5-layout UNet and procedural subjects: it learns, it leaves the base
model untouched, it resumes exactly, and it runs on two processes (its command line: test_training_command.py)."""
import dataclasses
import hashlib
import math
import re
from pathlib import Path

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from trainer_setup import SUBJECTS, pretrain_base, tiny_sd15_model, tiny_unet_config, write_dataset  # noqa: E402

STEPS = 200
PRETRAIN_STEPS = 250
GENERATION_SEEDS = 8
PROMPT = "a photo of a toy on a table"
SMALL_ENCODER = {"num_queries": 4, "depth": 1, "width": 64, "heads": 4}


def training_config(folder, output, **changes):
    from subject_personalization.train.config import TrainConfig
    values = dict(data=str(folder), output=str(output), resolution=64, batch_size=4, learning_rate=1e-3,
                  max_steps=STEPS, subject_dropout=0.1, localization_weight=1e-3, encoder=SMALL_ENCODER,
                  checkpoint_every=0, log_every=5, seed=0, device="cpu", encodings=str(folder / "encodings"))
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def world(tmp_path_factory, fastcomposer_models):
    """The toys on disk with their cached encodings, and a tiny base: a seeded random SD1.5-layout UNet with the
    session's CLIP, VAE and CLIP vision."""
    from subject_personalization.train.trainer import BaseModels, Trainer
    folder = tmp_path_factory.mktemp("toys")
    indices = write_dataset(folder)
    _, clip, vae, clip_vision, _ = fastcomposer_models
    base = BaseModels(tiny_sd15_model(tiny_unet_config(fastcomposer_models[0])), clip, vae, clip_vision, "tiny-sd15")
    Trainer(training_config(folder, folder / "cache_run"), base).prepare()  # the encodings do not depend on the UNet
    return folder, indices, base


@pytest.fixture(scope="module")
def taught(world, fastcomposer_models):
    """The world with its own tiny UNet first taught the toys by name, as a real base model knows words: the
    adapter then has to bring a toy's identity through the subject token. Only the learning test needs it."""
    from subject_personalization.train.encodings import load_encoded
    folder, indices, base = world
    model = tiny_sd15_model(tiny_unet_config(fastcomposer_models[0]))
    latents = {name: [load_encoded(folder / "encodings", i).latent for i in examples] for name, examples in indices.items()}
    pretrain_base(model, base.clip, latents, PRETRAIN_STEPS)
    return folder, indices, dataclasses.replace(base, model=model)


@pytest.fixture(scope="module")
def vision_layer_encodings(tmp_path_factory) -> str:
    """One encodings folder for the runs that fine-tune one CLIP vision layer: their cached hidden states are the same."""
    return str(tmp_path_factory.mktemp("encodings_one_vision_layer"))


def digest(module) -> str:
    hasher = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def evaluation_loss(trainer, examples, references_from=None) -> float:
    """Denoising loss on fixed noise and timesteps, optionally with every subject's reference swapped."""
    from subject_personalization.train.trainer import step_generator
    config = trainer.config
    trainer.config = dataclasses.replace(config, subject_dropout=0.0, localization_weight=0.0,
                                         masked_loss_probability=0.0)
    try:
        total = 0.0
        for repeat in range(4):
            batch = examples if references_from is None else [
                dataclasses.replace(e, references=r.references) for e, r in zip(examples, references_from)]
            with torch.no_grad():
                total += float(trainer.losses(batch, step_generator(123, repeat))["denoising_loss"])
        return total / 4
    finally:
        trainer.config = config


def nearest_distance(latent: torch.Tensor, subject_latents: torch.Tensor) -> float:
    """Mean squared distance from a generated latent to the closest of a subject's training latents."""
    return float((subject_latents - latent).square().mean(dim=(1, 2, 3)).min())


def generation_closeness(trainer, folder, indices) -> list[tuple[float, float]]:
    """Per subject and seed, (own, swapped): each sample's distance to the subject's training images, generated
    through the inference nodes with the subject's own reference and, from the same noise, another subject's."""
    from subject_personalization.train.dataset import read_image
    from subject_personalization.train.encodings import load_encoded
    from subject_personalization.train.validation import empty_prompt, generate_latent, reference_subjects
    names, adapter, negative = list(SUBJECTS), trainer.inference_adapter().eval(), empty_prompt(trainer.base.clip)
    subjects = {name: reference_subjects(adapter, trainer.base.clip_vision,
                                         read_image(folder / "references" / f"{number}_0.png")[None], "toy")
                for number, name in enumerate(names)}
    pairs = []
    for name in names:
        subject_latents = torch.stack([load_encoded(trainer.encodings, i).latent for i in indices[name]])
        other = names[(names.index(name) + 1) % len(names)]
        for seed in range(GENERATION_SEEDS):
            own, swapped = (nearest_distance(generate_latent(trainer.base, subjects[reference], PROMPT, negative, 8, seed,
                                                             10, cfg=1.0)[0], subject_latents)
                            for reference in (name, other))
            pairs.append((own, swapped))
    adapter.train()
    return pairs


def better_than_chance(trials: int, significance: float = 0.05) -> int:
    """The fewest successes in `trials` coin flips whose one-sided binomial tail is below `significance` (24: 17)."""
    return next(k for k in range(trials + 1)
                if sum(math.comb(trials, j) for j in range(k, trials + 1)) / 2 ** trials < significance)


@pytest.mark.long
def test_training_learns_the_subjects_and_leaves_the_base_untouched(taught, tmp_path):
    from subject_personalization.train.encodings import load_encoded
    from subject_personalization.train.trainer import Trainer
    folder, indices, base = taught
    frozen = {name: digest(module) for name, module in
              (("unet", base.model.model), ("clip", base.clip.cond_stage_model), ("vae", base.vae.first_stage_model),
               ("clip_vision", base.clip_vision.model))}
    trainer = Trainer(training_config(folder, tmp_path), base)
    placeholder = {key: value.clone() for key, value in trainer.adapter.placeholder_embeddings.items()}
    trainer.prepare()
    names = list(SUBJECTS)
    own = [load_encoded(trainer.encodings, i) for name in names for i in indices[name]]
    swapped = [load_encoded(trainer.encodings, indices[names[(names.index(name) + 1) % len(names)]][k])
               for name in names for k in range(len(indices[name]))]
    before = evaluation_loss(trainer, own)
    assert evaluation_loss(trainer, own, swapped) == pytest.approx(before, rel=1e-6), \
        "a fresh adapter ignores the reference image"

    trainer.fit()
    after, after_swapped = evaluation_loss(trainer, own), evaluation_loss(trainer, own, swapped)
    closeness = generation_closeness(trainer, folder, indices)
    own_distance, swapped_distance = (sum(pair[k] for pair in closeness) / len(closeness) for k in (0, 1))
    own_closer = sum(own_pair < swapped_pair for own_pair, swapped_pair in closeness)
    print(f"\ntrainer: evaluation loss {before:.5f} -> {after:.5f} (x{before / after:.3f} lower); "
          f"with another subject's reference {after_swapped:.5f} (x{after_swapped / after:.3f} of own); "
          f"generated with own reference {own_distance:.4f} vs another's {swapped_distance:.4f} from the subject "
          f"(x{swapped_distance / own_distance:.3f}; own closer for {own_closer}/{len(closeness)} seeds)")
    # Measured here (seeded, CPU): torch 2.9.1, x1.174 lower, swapped x1.339, generation x1.094 with own closer for
    # 18/24; torch 2.14.1, x1.117, x1.237, x1.098 and 23/24. The seeds' count is held to chance, not to one build.
    assert after < before / 1.07, "the denoising loss must fall"
    assert after_swapped > 1.15 * after, "a subject's own reference must denoise its images better than another's"
    assert swapped_distance > 1.05 * own_distance and own_closer >= better_than_chance(len(closeness)), \
        "images generated with a subject's reference must be closer to that subject than with another's"
    for name, module in (("unet", base.model.model), ("clip", base.clip.cond_stage_model),
                         ("vae", base.vae.first_stage_model), ("clip_vision", base.clip_vision.model)):
        assert digest(module) == frozen[name], f"the frozen {name} changed"
    for key, value in trainer.adapter.placeholder_embeddings.items():
        assert torch.equal(value, placeholder[key])
    log = (tmp_path / "loss.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,denoising_loss,localization_loss") and len(log) == 1 + STEPS // 5


def test_resuming_reproduces_the_uninterrupted_run(world, tmp_path):
    from subject_personalization.encoders.nested_adapter import load_nested_adapter
    from subject_personalization.train.trainer import Trainer
    folder, _, base = world
    steps = 8
    straight = Trainer(training_config(folder, tmp_path / "straight", max_steps=steps, ema_decay=0.9), base).fit()
    first = Trainer(training_config(folder, tmp_path / "split", max_steps=steps // 2, checkpoint_every=steps // 2,
                                    ema_decay=0.9), base)
    first.fit()
    checkpoint = tmp_path / "split" / "checkpoints" / f"step_{steps // 2:07d}.safetensors"
    saved = load_nested_adapter(checkpoint)
    assert saved.provenance["step"] == steps // 2 and saved.provenance["ema"] and saved.provenance["base_model"] == "tiny-sd15"
    second = Trainer(training_config(folder, tmp_path / "split", max_steps=steps, ema_decay=0.9), base)
    second.resume("latest")
    assert second.step == steps // 2
    resumed = second.fit()
    for expected, got in zip(straight[steps // 2:], resumed):
        assert got["step"] == expected["step"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-7)


def test_a_damaged_training_state_is_refused_on_resume(world, tmp_path):
    from subject_personalization.encoders.checkpoint_io import UnreadableFile
    from subject_personalization.train.trainer import Trainer
    folder, _, base = world
    config = training_config(folder, tmp_path, max_steps=1, checkpoint_every=1)
    Trainer(config, base).fit()
    checkpoint = tmp_path / "checkpoints" / "step_0000001.safetensors"
    state = checkpoint.with_suffix(".state.pt")
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint in .* \(1 incomplete, skipped\)"):
        Trainer(config, base).resume("latest")
    with pytest.raises(UnreadableFile, match=re.escape(f"cannot use {checkpoint}: step_0000001.state.pt is not the file "
                                                       f"its manifest recorded") + ".*resume from an earlier checkpoint"):
        Trainer(config, base).resume(checkpoint)
    checkpoint.with_suffix(".manifest.json").unlink()  # as an earlier version of the pack wrote checkpoints
    with pytest.raises(UnreadableFile, match=re.escape(f"cannot use {state}: it is damaged or not a PyTorch file")
                       + ".*resume from an earlier checkpoint"):
        Trainer(config, base).resume(checkpoint)


def test_files_comfyui_cannot_use_are_refused_with_their_names(comfy, tmp_path):
    """The base files' containers are checked, then what ComfyUI makes of them; no model is loaded here."""
    from safetensors.torch import save_file
    from subject_personalization.encoders.checkpoint_io import UnreadableFile
    from subject_personalization.train.trainer import load_base_models
    not_clip_vision = tmp_path / "not_clip_vision.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, not_clip_vision)
    truncated = tmp_path / "truncated_checkpoint.safetensors"
    truncated.write_bytes(not_clip_vision.read_bytes()[:-8])
    config = training_config(tmp_path, tmp_path / "run", checkpoint=str(truncated), clip_vision=str(not_clip_vision))
    with pytest.raises(UnreadableFile, match=re.escape(f"cannot use {truncated}: ") + ".*truncated.*"
                       + re.escape("set checkpoint to a Stable Diffusion 1.5 or SDXL checkpoint")):
        load_base_models(config)
    with pytest.raises(UnreadableFile, match=re.escape(f"cannot use {not_clip_vision}: ComfyUI does not recognise it as "
                                                       f"a CLIP vision model; set clip_vision to a CLIP ViT-L/14")):
        load_base_models(dataclasses.replace(config, checkpoint=str(not_clip_vision)))


def test_two_processes_train_together_with_gloo(world, tmp_path):
    """torch's DistributedDataParallel, 2 CPU processes: both end with the same weights, and they moved."""
    import torch.multiprocessing as multiprocessing
    from ddp_worker import train_process
    from subject_personalization.encoders.nested_adapter import load_nested_adapter, save_nested_adapter
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    from subject_personalization.train.trainer import Trainer
    folder, _, base = world
    config = training_config(folder, tmp_path, max_steps=3, checkpoint_every=3, batch_size=2)
    Trainer(config, base).prepare()  # the encodings, written once by this process
    start = fresh_adapter(base.model, base.clip, "person", "ViT-L/14", "person", 0, **SMALL_ENCODER)
    save_nested_adapter(tmp_path / "start.safetensors", start)
    torch.save((base.model.model.model_config.unet_config, base.model.model.state_dict()), tmp_path / "tiny_unet.pt")
    context = multiprocessing.get_context("spawn")
    # Plain values only: the new processes unpickle them before they can import the pack.
    options = dataclasses.asdict(config)
    processes = [context.Process(target=train_process, args=(rank, 2, options, tmp_path)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0, 0]
    trained = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for key in trained[0]:
        assert torch.equal(trained[0][key], trained[1][key]), f"{key} differs between the processes"
    initial = load_nested_adapter(tmp_path / "start.safetensors").state_dict()
    assert any(not torch.equal(trained[0][key], initial[key]) for key in trained[0])
    assert (tmp_path / "checkpoints" / "step_0000003.safetensors").is_file()


def test_fine_tuned_clip_vision_layers_start_exact_train_and_reach_inference(world, tmp_path, vision_layer_encodings):
    from subject_personalization.encoders.nested_adapter import load_nested_adapter
    from subject_personalization.encoders.vision_layers import run_vision_layers
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    from subject_personalization.nodes.nested_subject import vision_hidden_states
    from subject_personalization.train.dataset import read_image
    from subject_personalization.train.trainer import Trainer
    from subject_personalization.train.validation import empty_prompt, generate_latent, reference_subjects
    folder, _, base = world
    photos = torch.stack([read_image(folder / "references" / f"{n}_0.png") for n in range(2)])
    copied = fresh_adapter(base.model, base.clip, "person", "ViT-L/14", "person", 0, base.clip_vision, 2, **SMALL_ENCODER)
    earlier = vision_hidden_states(base.clip_vision, photos, "penultimate", layers_before=2)
    penultimate = base.clip_vision.encode_image(photos)["penultimate_hidden_states"]
    with torch.no_grad():
        torch.testing.assert_close(run_vision_layers(copied.vision_layers, earlier), penultimate, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(earlier, penultimate, atol=1e-2)

    frozen = digest(base.clip_vision.model)
    config = training_config(folder, tmp_path, max_steps=4, checkpoint_every=4, train_vision_layers=1,
                             vision_learning_rate=1e-3, encodings=vision_layer_encodings)
    trainer = Trainer(config, base)
    start = {key: value.clone() for key, value in trainer.adapter.vision_layers.state_dict().items()}
    trainer.fit()
    assert any(not torch.equal(value, start[key]) for key, value in trainer.adapter.vision_layers.state_dict().items())
    assert digest(base.clip_vision.model) == frozen, "the base CLIP vision model changed"
    tuned = load_nested_adapter(tmp_path / "checkpoints" / "step_0000004.safetensors")
    assert len(tuned.vision_layers) == 1
    latent = generate_latent(base, reference_subjects(tuned, base.clip_vision, photos[:1], "toy"),
                             "a photo of a toy on a table", empty_prompt(base.clip), 8, 0, 2)
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()

    with pytest.raises(ValueError, match="train_vision_layers changed"):
        Trainer(dataclasses.replace(config, train_vision_layers=0), base).prepare()


TINY_PLUS = dict(dim=64, depth=1, dim_head=64, heads=1, num_queries=4, embedding_dim=1024, output_dim=768, ff_mult=2)


def tiny_ip_adapter_plus(base, path: Path, widths_from=None) -> Path:
    """An IP-Adapter Plus file in the published layout (tests/ipadapter_files.py), every ip_adapter.<i> map as wide as
    that attn2 layer of `widths_from` (default: the tiny UNet), a small resampler over ViT-L/14 tokens."""
    from ipadapter_files import ip_adapter_plus, write_ip_adapter
    from subject_personalization.encoders.unet_layers import ip_adapter_layers
    from subject_personalization.nodes.base_model import model_cross_attention_layers
    widths = {layer.key: layer.inner_dim for layer in model_cross_attention_layers(widths_from or base.model)}
    numbered = {index: widths[layer.key] for index, layer in ip_adapter_layers("sd15").items()}
    return write_ip_adapter(path, ip_adapter_plus("sd15", seed=5, widths=numbered, **TINY_PLUS))


def first_step_loss(trainer) -> torch.Tensor:
    """The denoising loss of the first batch under fixed draws (nothing is updated)."""
    from subject_personalization.train.trainer import step_generator
    with torch.no_grad():
        return trainer.losses(trainer._examples(0, 0), step_generator(31, 0))["denoising_loss"]


def test_training_starts_from_an_ip_adapter_plus_file_or_an_adapter_file(world, tmp_path):
    """init_from: the trainer's adapter holds the file's weights with this run's subject token, its first step
    computes exactly what the loaded adapter computes, and a checkpoint of the run is itself a starting point."""
    from subject_personalization.encoders.ipadapter_plus import load_ip_adapter_plus
    from subject_personalization.encoders.nested_adapter import load_nested_adapter
    from subject_personalization.nodes.nested_adapter_nodes import initializer_vectors
    from subject_personalization.train.trainer import Trainer
    folder, _, base = world
    plus = tiny_ip_adapter_plus(base, tmp_path / "plus_tiny.safetensors")
    config = training_config(folder, tmp_path / "run", encoder={}, init_from=str(plus), max_steps=1, checkpoint_every=1)
    trainer = Trainer(config, base)
    loaded = load_ip_adapter_plus(plus, "person", initializer_vectors(base.clip, "person")[0]).float()
    assert trainer.adapter.state_dict().keys() == loaded.state_dict().keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(trainer.adapter.state_dict()[key], tensor), key
    warm = first_step_loss(trainer)
    assert torch.equal(warm, first_step_loss(Trainer(dataclasses.replace(config, init_from=""), base, adapter=loaded)))
    fresh = first_step_loss(Trainer(training_config(folder, tmp_path / "fresh"), base))
    print(f"\nwarm start: first-step loss {warm.item():.6f} (the loaded IP-Adapter's: equal), fresh start {fresh.item():.6f}")
    assert not torch.equal(warm, fresh)

    trainer.fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000001.safetensors"
    assert load_nested_adapter(checkpoint).provenance["config"]["init_from"] == str(plus)
    resumed_from = Trainer(dataclasses.replace(config, init_from=str(checkpoint), output=str(tmp_path / "next")), base)
    saved = load_nested_adapter(checkpoint).state_dict()
    for key, tensor in resumed_from.adapter.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    assert any(not torch.equal(saved[key], tensor) for key, tensor in loaded.state_dict().items())


def test_a_warm_start_with_fine_tuned_vision_layers_starts_where_the_file_does(world, tmp_path, vision_layer_encodings):
    """train_vision_layers with an IP-Adapter file: copies of the base CLIP vision layers reproduce its hidden state,
    so the first step equals the file's up to float32 rounding (the copies run the same layers in another order)."""
    from subject_personalization.encoders.ipadapter_plus import load_ip_adapter_plus
    from subject_personalization.nodes.nested_adapter_nodes import initializer_vectors
    from subject_personalization.train.trainer import Trainer
    folder, _, base = world
    plus = tiny_ip_adapter_plus(base, tmp_path / "plus_tiny.bin")
    config = training_config(folder, tmp_path / "run", encoder={}, init_from=str(plus), train_vision_layers=1,
                             encodings=vision_layer_encodings)
    trainer = Trainer(config, base)
    trainer.prepare()
    assert len(trainer.adapter.vision_layers) == 1
    loaded = load_ip_adapter_plus(plus, "person", initializer_vectors(base.clip, "person")[0]).float()
    reference = Trainer(dataclasses.replace(config, init_from="", train_vision_layers=0, encodings=str(folder / "encodings")),
                        base, adapter=loaded)
    torch.testing.assert_close(first_step_loss(trainer), first_step_loss(reference), rtol=1e-4, atol=0)


@pytest.mark.parametrize("changes, message", [
    (dict(encoder={"heads": 4}), r"has encoder\.heads = 1, but the config sets it to 4: the file's resampler defines "
                                 r"the encoder, so remove encoder\.heads from the config"),
    (dict(encoder={"colour": 1}), r"has no encoder setting 'colour'"),
    (dict(vision_model="ViT-H/14"), r"reads ViT-L/14 tokens, but the config says vision_model = 'ViT-H/14': set "
                                    r"vision_model = 'ViT-L/14' and clip_vision to that CLIP vision model"),
])
def test_a_starting_file_that_disagrees_with_the_config_is_refused(world, tmp_path, changes, message):
    from subject_personalization.train.trainer import Trainer
    folder, _, base = world
    plus = tiny_ip_adapter_plus(base, tmp_path / "plus_tiny.safetensors")
    config = training_config(folder, tmp_path / "run", **{"encoder": {}, "init_from": str(plus), **changes})
    with pytest.raises(ValueError, match=r"^init_from plus_tiny\.safetensors " + message):
        Trainer(config, base)


def test_a_starting_file_for_another_unet_is_refused(world, tmp_path, fastcomposer_models):
    """An IP-Adapter made for the full-size SD1.5 UNet does not fit the tiny one."""
    from subject_personalization.train.trainer import Trainer
    folder, _, base = world
    plus = tiny_ip_adapter_plus(base, tmp_path / "plus_sd15.safetensors", widths_from=fastcomposer_models[0])
    with pytest.raises(ValueError, match=r"^init_from plus_sd15\.safetensors: adapter plus_sd15 was made for a UNet "
                                         r"whose attn2 layers differ from this MODEL's"):
        Trainer(training_config(folder, tmp_path / "run", encoder={}, init_from=str(plus)), base)
