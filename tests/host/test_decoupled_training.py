"""attention = "decoupled": the trainer's IP-Adapter form against a float64 reference; a short run on the tiny
SD1.5-layout UNet that writes IP-Adapter Plus checkpoints; those files through the pack's "IP-Adapter Plus as nested"
loader and through IPAdapter_plus's own loader and model; and --resume from them."""
import dataclasses
import json
import math
import shutil
import sys

import pytest
import torch

from hostenv import require_comfyui
from ipadapter_files import assert_same_adapter

require_comfyui()
from peers import require_peer  # noqa: E402
from trainer_setup import tiny_sd15_model, tiny_unet_config, write_dataset  # noqa: E402

RUN_STEPS = 20
TRAINED_FILE = "decoupled_tiny_sd15.safetensors"  # the run's checkpoint, copied into models/ipadapter
# IP-Adapter's layout at a small size (heads of 64), for the runs no other pack has to load.
SMALL_PLUS_ENCODER = {"num_queries": 4, "depth": 1, "width": 64, "heads": 1}
# IP-Adapter Plus SD1.5's resampler, the sizes IPAdapter_plus builds (IPAdapterPlus.py, IPAdapter.init_proj_plus): the
# trainer's defaults for SD1.5.
PUBLISHED_ENCODER = {"num_queries": 16, "depth": 4, "width": 768, "heads": 12, "ff_mult": 4}


def training_config(folder, output, **changes):
    from subject_personalization.train.config import TrainConfig
    values = dict(data=str(folder), output=str(output), resolution=64, batch_size=4, learning_rate=1e-3,
                  max_steps=RUN_STEPS, subject_dropout=0.1, attention="decoupled", encoder=SMALL_PLUS_ENCODER,
                  initializer_word="toy", checkpoint_every=0, log_every=5, seed=0, device="cpu",
                  encodings=str(folder / "encodings"))
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def world(tmp_path_factory, fastcomposer_models):
    """The toys of tests/trainer_setup.py with their cached encodings, and a seeded random SD1.5-layout tiny UNet with the
    session's CLIP, VAE and CLIP vision (ViT-L/14)."""
    from subject_personalization.train.trainer import BaseModels, Trainer
    folder = tmp_path_factory.mktemp("toys")
    write_dataset(folder)
    _, clip, vae, clip_vision, _ = fastcomposer_models
    base = BaseModels(tiny_sd15_model(tiny_unet_config(fastcomposer_models[0])), clip, vae, clip_vision, "tiny-sd15")
    Trainer(training_config(folder, folder / "cache_run"), base).prepare()
    return folder, base


def evaluation_loss(trainer) -> float:
    """The denoising loss of every training image, every subject bound, on fixed noise and timesteps."""
    from subject_personalization.train.encodings import load_encoded
    from subject_personalization.train.trainer import step_generator
    config = trainer.config
    examples = [load_encoded(trainer.encodings, index) for index in range(len(trainer.dataset))]
    trainer.config = dataclasses.replace(config, subject_dropout=0.0, masked_loss_probability=0.0)
    try:
        with torch.no_grad():
            return sum(float(trainer.losses(examples, step_generator(123, repeat))["denoising_loss"])
                       for repeat in range(4)) / 4
    finally:
        trainer.config = config


def reference_hidden_states(folder, clip_vision) -> torch.Tensor:
    """CLIP vision's penultimate hidden states (what IP-Adapter Plus reads) of two references: (2, 257, 1024)."""
    from subject_personalization.train.dataset import read_image
    photos = torch.stack([read_image(folder / "references" / f"{n}_0.png") for n in range(2)])
    return clip_vision.encode_image(photos)["penultimate_hidden_states"].float()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, in float64: (B, N, H*d) x (B, T, H*d) -> (B, N, H*d)."""
    q, k, v = (x.double().unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def test_one_layer_call_is_ip_adapters_decoupled_attention(comfy):
    """Two subjects over four rows (both, none, the first, the second): each row is its plain attention plus one
    attention over the K_ip, V_ip of each subject it carries; a row that carries none is plain attention bit for bit and
    sends no gradient to the subjects' keys and values."""
    from subject_personalization.attention.subject_attention import plain_attention
    from subject_personalization.train.objective import TrainingAttention
    generator = torch.Generator().manual_seed(0)
    batch, queries, context, tokens, heads, width = 4, 24, 9, 5, 4, 64
    q, k, v = (torch.randn(batch, length, width, generator=generator) for length in (queries, context, context))
    # Every row has keys and values, as the trainer's zero tokens give rows without the subject: the token index decides.
    subjects = [tuple(torch.randn(batch, tokens, width, generator=generator, requires_grad=True) for _ in range(2))
                for _ in range(2)]
    token_index = [torch.tensor([3, -1, 5, -1]), torch.tensor([6, -1, -1, 2])]
    attention = TrainingAttention("sd15", record_localization=False)
    attention.set_step(token_index, [{"input_1_0": keys_values} for keys_values in subjects])
    out = attention.decoupled(q, k, v, {"block": ("input", 1), "block_index": 0, "n_heads": heads})

    expected = attend(q, k, v, heads)
    for index, (keys, values) in zip(token_index, subjects):
        expected = expected + (index >= 0)[:, None, None] * attend(q, keys, values, heads)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0].double(), attend(q, k, v, heads)[0], atol=1e-2), "the subjects add nothing"
    assert torch.equal(out[1], plain_attention(q, k, v, heads)[1])
    out.square().sum().backward()
    for index, (keys, values) in zip(token_index, subjects):
        for tensor in (keys, values):
            assert torch.equal(tensor.grad[index < 0], torch.zeros_like(tensor.grad[index < 0]))
            assert tensor.grad[index >= 0].abs().amax() > 0


def test_a_fresh_decoupled_adapter_starts_at_the_base_model(world, tmp_path):
    """to_v_ip starts at zero: the first step's loss is that of plain attention in every attn2 layer, bit for bit, though
    the resampler's tokens already depend on the image."""
    from subject_personalization.attention.subject_attention import plain_attention
    from subject_personalization.train.trainer import Trainer, step_generator
    folder, base = world
    trainer = Trainer(training_config(folder, tmp_path), base)
    resampler = trainer.adapter.resampler
    assert resampler.config.norm_after_projection and not resampler.base_token.any()
    assert not resampler.base_token.requires_grad
    hidden = reference_hidden_states(folder, base.clip_vision)
    with torch.no_grad():
        tokens = trainer.adapter.subject_tokens(hidden)
        assert not torch.allclose(tokens[0], tokens[1], atol=1e-3), "the tokens must depend on the reference"
        examples = trainer._examples(0, 0)
        decoupled = trainer.losses(examples, step_generator(7, 0))["denoising_loss"]
        trainer.replacement = lambda q, k, v, extra_options: plain_attention(q, k, v, extra_options["n_heads"])
        plain = trainer.losses(examples, step_generator(7, 0))["denoising_loss"]
    assert torch.equal(decoupled, plain)


@pytest.fixture(scope="module")
def decoupled_run(world, tmp_path_factory):
    """RUN_STEPS decoupled steps with IP-Adapter Plus SD1.5's resampler sizes: (trainer, evaluation loss before and
    after, the adapter's tensors that moved, the last checkpoint)."""
    from subject_personalization.train.trainer import Trainer
    folder, base = world
    output = tmp_path_factory.mktemp("decoupled_run")
    trainer = Trainer(training_config(folder, output, encoder=PUBLISHED_ENCODER, batch_size=2,
                                      checkpoint_every=RUN_STEPS), base)
    before = evaluation_loss(trainer)
    start = {key: value.clone() for key, value in trainer.adapter.state_dict().items()}
    trainer.fit()
    after = evaluation_loss(trainer)
    print(f"\ndecoupled: evaluation loss {before:.5f} -> {after:.5f} in {RUN_STEPS} steps")
    moved = [key for key, value in trainer.adapter.state_dict().items() if not torch.equal(value, start[key])]
    return trainer, before, after, moved, output / "checkpoints" / f"step_{RUN_STEPS:07d}.safetensors"


def test_a_decoupled_run_learns_and_writes_ip_adapter_plus_files(decoupled_run, comfy, node, world):
    """The run lowers the loss and moves every part but the base token; its checkpoint is an IP-Adapter Plus file, with
    the training state beside it, that the pack's "IP-Adapter Plus as nested" loader reads as the trained adapter: the
    same subject tokens and K~, V~, bit for bit."""
    from safetensors import safe_open
    from subject_personalization.encoders.unet_layers import ip_adapter_layers
    trainer, before, after, moved, checkpoint = decoupled_run
    folder, base = world
    assert after < before, "the denoising loss must fall"
    assert "resampler.base_token" not in moved and "resampler.queries" in moved
    assert all(f"projections.maps.{layer.key}.to_{kv}.weight" in moved for layer in trainer.layers for kv in "kv")
    assert checkpoint.with_suffix(".state.pt").is_file()
    with safe_open(str(checkpoint), framework="pt") as file:
        keys, provenance = set(file.keys()), json.loads(file.metadata()["provenance"])
    assert provenance["step"] == RUN_STEPS and provenance["config"]["attention"] == "decoupled"
    assert {key for key in keys if not key.startswith("image_proj.")} == \
        {f"ip_adapter.{number}.to_{kv}_ip.weight" for number in ip_adapter_layers("sd15") for kv in "kv"}

    shutil.copy(checkpoint, comfy.model_dir("ipadapter") / TRAINED_FILE)
    (loaded,) = node("SubjectPersonalization_NestedAttentionIPAdapterLoader").load(TRAINED_FILE, base.clip, "toy")
    assert_same_adapter(loaded, trainer.inference_adapter().eval(), reference_hidden_states(folder, base.clip_vision))


def test_ipadapter_plus_reads_the_checkpoint_as_the_trained_adapter(decoupled_run, comfy, world):
    """IPAdapter_plus's own model loader and model class (its Resampler and per-layer to_k_ip / to_v_ip) on the same
    file: the same image tokens and keys/values as the trained adapter's, up to float32 rounding (its attention scales
    q and k apart and takes the softmax in its own order)."""
    from subject_personalization.encoders.unet_layers import ip_adapter_layers
    require_peer(comfy.nodes.NODE_CLASS_MAPPINGS, "IPAdapterModelLoader")
    trainer, *_, checkpoint = decoupled_run
    folder, base = world
    shutil.copy(checkpoint, comfy.model_dir("ipadapter") / TRAINED_FILE)
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["IPAdapterModelLoader"]()
    (model,) = loader.load_ipadapter_model(TRAINED_FILE)
    ipadapter = sys.modules[type(loader).__module__]
    # What IPAdapterPlus.py's ipadapter_execute derives for an SD1.5 Plus file and ViT-L/14 hidden states.
    projection = ipadapter.IPAdapter(model, cross_attention_dim=768, output_cross_attention_dim=768,
                                     clip_embeddings_dim=1024, clip_extra_context_tokens=16, is_plus=True)
    hidden = reference_hidden_states(folder, base.clip_vision)
    image_tokens, _ = projection.get_image_embeds(hidden, torch.zeros_like(hidden), 0)
    trained = trainer.inference_adapter().eval()
    with torch.no_grad():
        tokens = trained.subject_tokens(hidden)
        torch.testing.assert_close(image_tokens, tokens, rtol=1e-4, atol=1e-4)
        keys_values = trained.projections.project(tokens)
        for number, layer in ip_adapter_layers("sd15").items():
            for kv, ours in zip("kv", keys_values[layer.key]):
                theirs = projection.ip_layers.to_kvs[f"{number}_to_{kv}_ip"](image_tokens.clone())
                torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_resuming_a_decoupled_run_reproduces_the_uninterrupted_one(world, tmp_path):
    """--resume latest from an IP-Adapter Plus checkpoint and its .state.pt: the loss curve of the run that went on."""
    from subject_personalization.train.trainer import Trainer
    folder, base = world
    steps = 4
    straight = Trainer(training_config(folder, tmp_path / "straight", max_steps=steps, ema_decay=0.9), base).fit()
    Trainer(training_config(folder, tmp_path / "split", max_steps=steps // 2, checkpoint_every=steps // 2,
                            ema_decay=0.9), base).fit()
    second = Trainer(training_config(folder, tmp_path / "split", max_steps=steps, ema_decay=0.9), base)
    second.resume("latest")
    assert second.step == steps // 2
    resumed = second.fit()
    assert [row["step"] for row in resumed] == [row["step"] for row in straight[steps // 2:]]
    for expected, got in zip(straight[steps // 2:], resumed):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("overrides, message", [
    (["attention=gated"], r"^attention must be nested or decoupled, got 'gated'$"),
    (["attention=decoupled", "localization_weight=0.001"],
     r"^localization_weight is 0\.001, but attention = 'decoupled' adds the subject to every query: no subject token's "
     r"attention to localise; set localization_weight = 0, or attention = 'nested'$"),
    (["attention=decoupled", "train_vision_layers=2"],
     r"^train_vision_layers is 2, but attention = 'decoupled' writes IP-Adapter Plus files, which hold no CLIP vision "
     r"layers: set train_vision_layers = 0, or attention = 'nested'$"),
])
def test_the_option_is_checked(overrides, message):
    from subject_personalization.train.config import load_config
    assert load_config(None).attention == "nested"
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_a_starting_adapter_ip_adapter_plus_cannot_hold_is_refused(world, tmp_path):
    """Refused when the run starts, not at its first checkpoint: here a resampler with heads of 16."""
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    from subject_personalization.train.trainer import Trainer
    folder, base = world
    adapter = fresh_adapter(base.model, base.clip, "toy", "ViT-L/14", "object", 0, num_queries=4, depth=1, width=64,
                            heads=4, norm_after_projection=True)
    with pytest.raises(ValueError, match=r"^attention = 'decoupled' writes IP-Adapter Plus files, which cannot hold the "
                                         r"starting adapter: its resampler's attention is 64 wide in 4 heads of 16, "
                                         r"but IP-Adapter's layout fixes the head size at 64 .*: set encoder\.heads = 1$"):
        Trainer(training_config(folder, tmp_path), base, adapter=adapter)
