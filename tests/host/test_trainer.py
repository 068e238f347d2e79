"""The Nested Attention trainer on a tiny SD1.5-layout UNet and procedural subjects: it learns, it leaves the base
model untouched, it resumes exactly, and it runs on two processes."""
import dataclasses
import hashlib

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from trainer_setup import SUBJECTS, pretrain_base, tiny_sd15_model, tiny_unet_config, write_dataset  # noqa: E402

STEPS = 60
PRETRAIN_STEPS = 150
SMALL_ENCODER = {"num_queries": 4, "depth": 1, "width": 64, "heads": 4}


def training_config(folder, output, **changes):
    from subject_personalization.train.config import TrainConfig
    values = dict(data=str(folder), output=str(output), resolution=64, batch_size=4, learning_rate=2e-3,
                  max_steps=STEPS, subject_dropout=0.1, localization_weight=1e-3, encoder=SMALL_ENCODER,
                  checkpoint_every=0, log_every=5, seed=0, device="cpu", encodings=str(folder / "encodings"))
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def world(tmp_path_factory, fastcomposer_models):
    from subject_personalization.train.trainer import BaseModels
    from subject_personalization.train.encodings import load_encoded
    from subject_personalization.train.trainer import Trainer
    folder = tmp_path_factory.mktemp("toys")
    indices = write_dataset(folder)
    _, clip, vae, clip_vision, _ = fastcomposer_models
    base = BaseModels(tiny_sd15_model(tiny_unet_config(fastcomposer_models[0])), clip, vae, clip_vision, "tiny-sd15")
    cache = Trainer(training_config(folder, folder / "cache_run"), base)  # the encodings do not depend on the UNet
    cache.prepare()
    latents = {name: [load_encoded(cache.encodings, i).latent for i in examples] for name, examples in indices.items()}
    pretrain_base(base.model, clip, latents, PRETRAIN_STEPS)
    return folder, indices, base


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


def test_training_learns_the_subjects_and_leaves_the_base_untouched(world, tmp_path):
    from subject_personalization.train.encodings import load_encoded
    from subject_personalization.train.trainer import Trainer
    folder, indices, base = world
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

    history = trainer.fit()
    after, after_swapped = evaluation_loss(trainer, own), evaluation_loss(trainer, own, swapped)
    print(f"\ntrainer: evaluation loss {before:.5f} -> {after:.5f} (x{before / after:.2f} lower); "
          f"with another subject's reference {after_swapped:.5f} (x{after_swapped / after:.3f} of own); "
          f"training loss first 5 steps {sum(r['loss'] for r in history[:5]) / 5:.5f}, "
          f"last 5 {sum(r['loss'] for r in history[-5:]) / 5:.5f}")
    # Measured here (seeded, CPU): 0.32018 -> 0.31460 (x1.018) and swapped x1.002; weak, see BENCHMARKS.md/README.
    assert after < before / 1.01, "the denoising loss must fall"
    assert after_swapped > after, "a subject's own reference must denoise its images better than another's"
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

