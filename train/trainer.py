"""The Nested Attention trainer: a frozen ComfyUI base model, a learning subject encoder and nested projections.

One process per device; several processes through PyTorch's DistributedDataParallel (`torchrun`). Every random
draw of a step (data order, reference choice, subject dropout, timesteps, noise) comes from generators seeded by
(seed, step, process, micro-batch), so a resumed run continues exactly where the interrupted one was.
"""
import contextlib
import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..encoders.checkpoint_io import UnreadableFile, check_model_file
from ..encoders.ipadapter_plus import check_ip_adapter_layout, load_ip_adapter_plus, save_ip_adapter_plus
from ..encoders.kill_safe import kill_point, written_beside
from ..encoders.nested_adapter import NestedAdapter, load_nested_adapter, save_nested_adapter
from ..nodes.base_model import model_cross_attention_layers, model_family
from .config import TrainConfig, config_dict
from .dataset import SubjectDataset
from .encodings import EncodedExample, check_vision_input, encode_dataset, load_encoded
from .objective import TrainingAttention, gradient_checkpointing, masked_mse, noised, prediction_target
from .training_state import (RESUME_FIX, incomplete, latest_complete_checkpoint, manifest_file, read_training_state,
                             state_file, write_manifest)
from .warm_start import starting_adapter

LOG_COLUMNS = ("step", "loss", "denoising_loss", "localization_loss", "learning_rate", "images_per_second")
CHECKPOINT_FIX = ("set checkpoint to a Stable Diffusion 1.5 or SDXL checkpoint holding UNet, text encoder and VAE (what "
                  "ComfyUI's 'Load Checkpoint' loads, from models/checkpoints/)")
CLIP_VISION_FIX = ("set clip_vision to a CLIP ViT-L/14 or ViT-H/14 vision model file (what ComfyUI's 'Load CLIP Vision' "
                   "loads, from models/clip_vision/)")


@dataclass
class BaseModels:
    """ComfyUI's objects for the frozen base: MODEL, CLIP, VAE and CLIP_VISION (the latter three may be None
    once the encodings are cached and no validation is asked for)."""
    model: object
    clip: object = None
    vae: object = None
    clip_vision: object = None
    name: str = ""


def load_base_models(config: TrainConfig) -> BaseModels:
    """The base checkpoint through ComfyUI's own loader, and the CLIP vision model: both files' containers are checked
    first, and what ComfyUI makes of them after (None, or a model without its text encoder or VAE, for files it does
    not know)."""
    import comfy.clip_vision

    from ..nodes.host_compat import load_checkpoint_resident
    check_model_file(config.checkpoint, CHECKPOINT_FIX)
    check_model_file(config.clip_vision, CLIP_VISION_FIX)
    clip_vision = comfy.clip_vision.load(config.clip_vision)  # first: the smaller file, refused before the big one loads
    if not isinstance(clip_vision, comfy.clip_vision.ClipVisionModel):
        raise UnreadableFile(config.clip_vision, "ComfyUI does not recognise it as a CLIP vision model", CLIP_VISION_FIX)
    model, clip, vae = load_checkpoint_resident(config.checkpoint)
    if clip is None or vae is None or vae.first_stage_model is None:
        raise UnreadableFile(config.checkpoint, "ComfyUI found a diffusion model in it but no text encoder or no VAE",
                             CHECKPOINT_FIX)
    return BaseModels(model, clip, vae, clip_vision, Path(config.checkpoint).name)


class SubjectEncoderTraining(nn.Module):
    """The learning part: resampler and nested projections (what DistributedDataParallel synchronises)."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, reference_tokens: torch.Tensor, placement: list[tuple[int, int]], batch: int, slots: int) -> list[dict]:
        """reference_tokens (P, tokens, W) of the subjects at placement [(row, slot)] -> per slot, layer -> (K~, V~)."""
        subject_tokens = self.adapter.subject_tokens(reference_tokens)
        per_slot = subject_tokens.new_zeros(slots, batch, *subject_tokens.shape[1:])
        rows, slot_ids = zip(*placement)
        where = (torch.tensor(slot_ids, device=subject_tokens.device), torch.tensor(rows, device=subject_tokens.device))
        per_slot = per_slot.index_put(where, subject_tokens)
        return [self.adapter.projections.project(per_slot[slot]) for slot in range(slots)]


def step_generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0]))


def decoupled_starting_adapter(config: TrainConfig, base: BaseModels) -> NestedAdapter:
    """The adapter a decoupled run starts from: init_from's weights, or a fresh adapter in IP-Adapter Plus's layout
    (norm_out after proj_out) started as `fresh_ip_adapter` says."""
    if config.init_from:
        return starting_adapter(config, base)
    encoder = {"norm_after_projection": True, **config.encoder}
    return fresh_ip_adapter(starting_adapter(dataclasses.replace(config, encoder=encoder), base), config.seed)


@torch.no_grad()
def fresh_ip_adapter(adapter: NestedAdapter, seed: int) -> NestedAdapter:
    """A fresh adapter made a fresh IP-Adapter, as IP-Adapter's training starts one (a random resampler, to_k_ip the
    base's to_k) but for to_v_ip: zero, so that the first step adds nothing to the base model's attention, as a fresh
    nested adapter's does. No base token (IP-Adapter's resampler has none); proj_out drawn as nn.Linear draws it, since
    norm_out after it would give every image the same tokens from a zero proj_out."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter.resampler.proj_out.reset_parameters()
    adapter.resampler.base_token.zero_()
    for maps in adapter.projections.maps.values():
        maps.to_v.weight.zero_()
    return adapter


class Trainer:
    def __init__(self, config: TrainConfig, base: BaseModels, rank: int = 0, world_size: int = 1, adapter=None):
        self.config, self.base, self.rank, self.world_size = config, base, rank, world_size
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.output = Path(config.output)
        self.family = model_family(base.model)
        self.layers = model_cross_attention_layers(base.model)
        if adapter is None:
            adapter = decoupled_starting_adapter(config, base) if config.attention == "decoupled" else \
                starting_adapter(config, base)
        self.adapter = adapter
        self.adapter.to(self.device).float().train()
        self.adapter.placeholder_embeddings.requires_grad_(False)  # s* stays fixed: the cached contexts depend on it
        if config.attention == "decoupled":
            try:  # refused now rather than at the first checkpoint
                check_ip_adapter_layout(self.adapter)
            except ValueError as error:
                start = f" (init_from {Path(config.init_from).name})" if config.init_from else ""
                raise ValueError(f"attention = 'decoupled' writes IP-Adapter Plus files, which cannot hold the starting "
                                 f"adapter{start}: {error}") from None
            self.adapter.resampler.base_token.requires_grad_(False)  # IP-Adapter's resampler has none: it stays 0
        self.unet = base.model.model.diffusion_model.to(self.device).requires_grad_(False).eval()
        # What ComfyUI's apply_model casts the UNet's inputs to: its weights' dtype (fp16 or bf16 on most GPUs) or the
        # dtype its ops compute in when they cast the weights (manual cast).
        self.unet_dtype = base.model.model.manual_cast_dtype or base.model.model.get_dtype()
        self.model_sampling = base.model.model.model_sampling.to(self.device)
        self.attention = TrainingAttention(self.family, config.localization_weight > 0)
        self.replacement = self.attention.decoupled if config.attention == "decoupled" else self.attention.replacement
        self.encoder = SubjectEncoderTraining(self.adapter)
        self.trainable = DistributedDataParallel(self.encoder) if world_size > 1 else self.encoder
        vision = list(self.adapter.vision_layers.parameters())
        vision_ids = {id(parameter) for parameter in vision}
        rest = [p for p in self.encoder.parameters() if p.requires_grad and id(p) not in vision_ids]
        groups = [{"params": rest}] + ([{"params": vision, "lr": config.vision_learning_rate}] if vision else [])
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup = max(1, config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))
        self.ema = AveragedModel(self.adapter, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True) \
            if config.ema_decay > 0 else None
        # Without loss scaling small gradients underflow in fp16: under fp16 autocast, and in a UNet computing in fp16.
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=config.mixed_precision == "fp16" or self.unet_dtype == torch.float16)
        self.step = 0
        self.dataset = SubjectDataset(config.data, config.resolution, config.reference_background)
        self.encodings = Path(config.encodings) if config.encodings else self.output / "encodings"
        self._orders: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ data
    def prepare(self) -> None:
        """Process 0 writes the cached encodings; the others wait for it."""
        if self.rank == 0:
            from tqdm import tqdm
            check_vision_input(self.encodings, self.adapter)
            missing = sum(not (self.encodings / f"{i:06d}.safetensors").is_file() for i in range(len(self.dataset)))
            if missing:
                with tqdm(total=missing, desc="encoding the training set") as progress:
                    encode_dataset(self.dataset, self.encodings, self.adapter, self.base.clip, self.base.vae,
                                   self.base.clip_vision, progress)
        if self.world_size > 1:
            dist.barrier()

    def _examples(self, step: int, micro: int) -> list[EncodedExample]:
        """This process's examples for one micro-batch: a fixed permutation per epoch, shared by all processes."""
        size, batch = len(self.dataset), self.config.batch_size
        first = ((step * self.config.gradient_accumulation + micro) * self.world_size + self.rank) * batch
        examples = []
        for position in range(first, first + batch):
            epoch, index = divmod(position, size)
            examples.append(load_encoded(self.encodings, int(self._epoch_order(epoch)[index])))
        return examples

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The dataset's permutation for one epoch, drawn once (a batch may straddle two epochs)."""
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.dataset), generator=step_generator(self.config.seed, 0, epoch)),
                            **{e: order for e, order in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    # ------------------------------------------------------------------ one step
    def losses(self, examples: list[EncodedExample], generator: torch.Generator) -> dict[str, torch.Tensor]:
        device, config = self.device, self.config
        batch, slots = len(examples), max(len(e.positions) for e in examples)
        if len({tuple(e.context.shape) for e in examples}) > 1:
            raise ValueError("captions of one batch encode to different lengths (over 77 tokens); shorten the long "
                             "captions or use batch_size 1")
        # The cache holds what the VAE makes; the UNet works on latents in its own scale (process_in, as the sampler).
        latent = self.base.model.model.process_latent_in(torch.stack([e.latent for e in examples]).to(device))
        context = torch.stack([e.context for e in examples]).to(device)
        token_index, present, placement, references = [], torch.zeros(batch, slots, dtype=torch.bool), [], []
        for slot in range(slots):
            index = torch.full((batch,), -1)
            for row, example in enumerate(examples):
                if slot < len(example.positions) and float(torch.rand((), generator=generator)) >= config.subject_dropout:
                    index[row], present[row, slot] = example.positions[slot], True
                    choices = example.references[slot]
                    references.append(choices[int(torch.randint(len(choices), (), generator=generator))])
                    placement.append((row, slot))
            token_index.append(index)
        sigma, noisy = noised(self.model_sampling, latent, generator)
        masks = self._masks(examples, slots, latent.shape[-2:])
        masked_rows = torch.rand(batch, generator=generator) < config.masked_loss_probability
        autocast_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=config.mixed_precision != "no"):
            if not placement:  # every subject dropped: encode one unbound reference so each process runs the same graph
                references, placement = [examples[0].references[0][0]], [(0, 0)]
            nested = self.trainable(torch.stack(references).to(device), placement, batch, slots)
        self.attention.set_step(token_index, nested)
        options = {"patches_replace": {"attn2": {layer.block: self.replacement for layer in self.layers}}}
        # A UNet ComfyUI loaded in fp16 or bf16 computes in that dtype, as it does in ComfyUI: autocast to the other
        # half dtype would give its norms inputs of one dtype and weights of the other.
        unet_autocast = torch.autocast(device.type, dtype=autocast_dtype,
                                       enabled=config.mixed_precision != "no" and self.unet_dtype == torch.float32)
        with unet_autocast, gradient_checkpointing(self.unet, config.gradient_checkpointing):
            unet_input = self.model_sampling.calculate_input(sigma.reshape(-1, 1, 1, 1), noisy)
            output = self.unet(unet_input.to(self.unet_dtype), self.model_sampling.timestep(sigma),
                               context=context.to(self.unet_dtype), y=self._adm(examples), transformer_options=options)
        target = prediction_target(self.model_sampling, sigma, latent, noisy)
        pixel_weight = None
        if bool(masked_rows.any()) and masks is not None:
            union = masks.amax(dim=1)
            pixel_weight = torch.where(masked_rows[:, None, None].to(device), union, torch.ones_like(union))
        losses = {"denoising_loss": masked_mse(output, target, pixel_weight)}
        loss = losses["denoising_loss"]
        if config.localization_weight > 0:
            if masks is None:
                raise ValueError("localization_weight > 0 needs a mask for every subject in the training set")
            losses["localization_loss"] = self.attention.localization_loss(masks, present.to(device))
            loss = loss + config.localization_weight * losses["localization_loss"]
        # Zero times every nested value: all trainable weights are in the graph even when dropout unbinds them all,
        # which DistributedDataParallel needs to synchronise the gradients.
        losses["loss"] = loss + 0.0 * sum(keys.sum() + values.sum() for keys, values in nested[0].values())
        return losses

    def _masks(self, examples: list[EncodedExample], slots: int, size) -> torch.Tensor | None:
        if any(mask is None for e in examples for mask in e.masks):
            return None
        masks = torch.zeros(len(examples), slots, *size)
        for row, example in enumerate(examples):
            for slot, mask in enumerate(example.masks):
                masks[row, slot] = mask
        return masks.to(self.device)

    def _adm(self, examples: list[EncodedExample]) -> torch.Tensor | None:
        """SDXL's size-and-pooled-text vector (None for SD1.5), for the training resolution without crops."""
        side = self.config.resolution
        rows = [self.base.model.model.encode_adm(pooled_output=e.pooled[None].to(self.device), width=side, height=side,
                                                 crop_w=0, crop_h=0, target_width=side, target_height=side)
                for e in examples]
        return None if rows[0] is None else torch.cat(rows).to(self.device, self.unet_dtype)  # as apply_model casts y

    def train_step(self) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        accumulation, totals = self.config.gradient_accumulation, {}
        for micro in range(accumulation):
            generator = step_generator(self.config.seed, 1, self.step, self.rank, micro)
            sync = micro == accumulation - 1 or self.world_size == 1
            with self.trainable.no_sync() if not sync else contextlib.nullcontext():
                losses = self.losses(self._examples(self.step, micro), generator)
                self.scaler.scale(losses["loss"] / accumulation).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / accumulation
        kill_point(f"step@{self.step + 1}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.adapter)
        self.step += 1
        return totals

    # ------------------------------------------------------------------ the run
    def fit(self, validate=None) -> list[dict]:
        """Train to max_steps; returns the logged rows. `validate(trainer)` is called every validate_every steps."""
        from tqdm import tqdm
        config = self.config
        self.prepare()
        log, history = _LossLog(self.output if self.rank == 0 else None, self.step), []
        progress = tqdm(total=config.max_steps, initial=self.step, desc="training", disable=self.rank != 0)
        started, images = time.perf_counter(), 0
        while self.step < config.max_steps:
            losses = self.train_step()
            images += config.batch_size * config.gradient_accumulation * self.world_size
            progress.update(1)
            progress.set_postfix(loss=f"{losses['loss']:.4f}")
            row = {"step": self.step, **losses, "learning_rate": self.scheduler.get_last_lr()[0],
                   "images_per_second": images / (time.perf_counter() - started)}
            history.append(row)
            if self.rank == 0 and (self.step % config.log_every == 0 or self.step == config.max_steps):
                log.write(row)
            if config.checkpoint_every and (self.step % config.checkpoint_every == 0 or self.step == config.max_steps):
                self.save_checkpoint()
            if validate is not None and config.validate_every and self.rank == 0 and self.step % config.validate_every == 0:
                validate(self)
        progress.close()
        log.close()
        return history

    def inference_adapter(self):
        """The weights to use for generation: the EMA when it is kept, else the current ones."""
        return self.ema.module if self.ema is not None else self.adapter

    def save_checkpoint(self) -> Path | None:
        """Process 0 writes the adapter file, its training state, then its manifest (training_state.py): the checkpoint
        counts as written once the manifest is there."""
        if self.world_size > 1:
            dist.barrier()
        if self.rank != 0:
            return None
        kill_point(f"checkpoint-start@{self.step}")
        folder = self.output / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:07d}.safetensors"
        adapter = self.inference_adapter()
        adapter.provenance = {"trainer": "subject_personalization.train", "step": self.step, "base_model": self.base.name,
                              "dataset": str(self.config.data), "examples": len(self.dataset),
                              "processes": self.world_size, "ema": self.ema is not None,
                              "config": config_dict(self.config)}
        (save_ip_adapter_plus if self.config.attention == "decoupled" else save_nested_adapter)(path, adapter)
        kill_point(f"checkpoint-between@{self.step}")
        state = {"step": self.step, "adapter": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None}
        with written_beside(state_file(path)) as partial:
            torch.save(state, partial)
        write_manifest(path, self.step)
        return path

    def resume(self, checkpoint: str | Path) -> bool:
        """Continue the run a checkpoint of it was written by: weights, optimizer, schedule, EMA and step.
        `latest`: the run's newest complete checkpoint, each newer one skipped said with why; `auto`: the same, or a
        fresh start, said, when there is none (the form for jobs that torchrun restarts). Returns whether it resumed."""
        if str(checkpoint) in ("latest", "auto"):
            checkpoint = self._latest_complete(required=str(checkpoint) == "latest")  # checked against its manifest
            if checkpoint is None:
                return False
        else:
            checkpoint = Path(checkpoint)
            if manifest_file(checkpoint).is_file() and (problem := incomplete(checkpoint)) is not None:
                raise UnreadableFile(checkpoint, problem, RESUME_FIX)
        if not state_file(checkpoint).is_file():
            raise UnreadableFile(state_file(checkpoint), "it is missing: resuming needs the training state written "
                                                         "with the checkpoint", RESUME_FIX)
        if self.config.attention == "decoupled":  # refuses anything that is not an IP-Adapter Plus file
            load_ip_adapter_plus(checkpoint, self.adapter.initializer_word,
                                 {key: value.detach() for key, value in self.adapter.placeholder_embeddings.items()})
        else:
            load_nested_adapter(checkpoint)  # refuses anything that is not an adapter file
        state = read_training_state(state_file(checkpoint), self.adapter)
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = state["step"]
        return True

    def _latest_complete(self, required: bool) -> Path | None:
        """Process 0's choice of checkpoint, shared with every process (they resume from the same one)."""
        folder = self.output / "checkpoints"
        choice = latest_complete_checkpoint(folder) if self.rank == 0 else None
        if self.world_size > 1:
            shared = [choice]
            dist.broadcast_object_list(shared, src=0)
            choice = shared[0]
        found, skipped = choice
        if self.rank == 0:
            for line in skipped:
                print(f"resume: skipped {line}", flush=True)
        if found is None and required:
            raise FileNotFoundError(f"no complete checkpoint in {folder} to resume from"
                                    f"{f' ({len(skipped)} incomplete, skipped)' if skipped else ''}: start the run "
                                    f"without --resume, or give --resume auto to start it fresh when there is none")
        if self.rank == 0:
            print(f"resume: from {found}" if found else f"resume auto: no complete checkpoint in {folder}, starting "
                                                         f"fresh", flush=True)
        return found


class _LossLog:
    """loss.csv and TensorBoard when installed. On resume the rows up to the resumed step are kept (rewritten beside
    the file and renamed into place, so a kill then loses none), the rows past it and any row cut short dropped."""

    def __init__(self, output: Path | None, step: int):
        self.file = self.writer = self.board = None
        if output is None:
            return
        output.mkdir(parents=True, exist_ok=True)
        path = output / "loss.csv"
        kept = []
        if path.is_file() and step > 0:
            with path.open(newline="") as log:
                kept = [row for row in csv.DictReader(log) if None not in row.values() and row["step"].isdecimal()
                        and int(row["step"]) <= step]
        with written_beside(path) as partial, partial.open("w", newline="") as log:
            writer = csv.DictWriter(log, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(output / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.board = None

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        self.writer.writerow({column: row.get(column, "") for column in LOG_COLUMNS})
        self.file.flush()
        if self.board is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, float) and math.isfinite(value):
                    self.board.add_scalar(name, value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
