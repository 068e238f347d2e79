"""Nested Attention training throughput: images/s and peak memory of one optimizer step of the pack's trainer,
with gradient checkpointing off and on, side by side in one run.

    python bench/bench_training.py --comfyui /path/to/ComfyUI                                  # GPU: the issue's setting
    python bench/bench_training.py --comfyui /path/to/ComfyUI --device cpu --size 128 --batch 1   # CPU fallback

What is measured: `Trainer.train_step` itself (subject encoder forward, the frozen ComfyUI UNet forward with the
subject attention, backward into the encoder and projections, AdamW step) on a real ComfyUI SD1.5 / SDXL UNet
(ComfyUI's own model config, seeded random weights in the chosen dtype) with a default-size adapter
(16 subject tokens, ViT-L/14 references), one subject per image, localisation loss on. The frozen encoders'
outputs are cached once before training (train/encodings.py), so they are synthetic here and not timed.
On a GPU the batch is the largest power of two that fits (per variant); on a CPU it is --batch.
"""
import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nested_attention import (CLIP_VISION_TOKENS, CLIP_VISION_WIDTH, DTYPES, GPU_SIZE, HeadlessComfy,  # noqa: E402
                                    add_machine_arguments, build_unet, chosen_device, markdown_table, peak_memory_mib,
                                    synchronize, time_ms)
from pack_package import register_pack  # noqa: E402  (bench_nested_attention put tools/ on sys.path)

PROMPT_TOKENS = 77
SUBJECT_POSITION = 5
EXAMPLES = 64
POOLED_WIDTH = {"sd15": 768, "sdxl": 1280}


def write_synthetic_run(folder: Path, family: str, size: int) -> None:
    """A metadata.jsonl and its cached encodings: random latents, contexts, masks and CLIP vision tokens."""
    from subject_personalization.encoders.unet_layers import CONTEXT_WIDTH
    from subject_personalization.train.encodings import EncodedExample, save_encoded
    entry = {"image": "unused.png", "caption": "a photo of a person", "subjects": [{"word": "person", "mask": "m.png"}]}
    (folder / "metadata.jsonl").write_text((json.dumps(entry) + "\n") * EXAMPLES)
    (folder / "encodings").mkdir()
    generator = torch.Generator().manual_seed(0)
    side = size // 8
    for index in range(EXAMPLES):
        mask = torch.zeros(side, side)
        mask[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 1
        save_encoded(folder / "encodings" / f"{index:06d}.safetensors", EncodedExample(
            torch.randn(4, side, side, generator=generator),
            torch.randn(PROMPT_TOKENS, CONTEXT_WIDTH[family], generator=generator),
            torch.randn(POOLED_WIDTH[family], generator=generator), [SUBJECT_POSITION],
            [torch.randn(1, CLIP_VISION_TOKENS, CLIP_VISION_WIDTH, generator=generator)], [mask]))


def make_trainer(patcher, family: str, folder: Path, size: int, batch: int, checkpointing: bool, device, precision: str):
    from subject_personalization.encoders.nested_adapter import TEXT_ENCODER_WIDTHS, new_nested_adapter
    from subject_personalization.encoders.unet_layers import CONTEXT_WIDTH
    from subject_personalization.nodes.base_model import attn2_weights, model_cross_attention_layers
    from subject_personalization.train.config import TrainConfig
    from subject_personalization.train.trainer import BaseModels, Trainer
    layers = model_cross_attention_layers(patcher)
    adapter = new_nested_adapter(family, CLIP_VISION_WIDTH, "person", "person",
                                 {name: torch.randn(width) for name, width in TEXT_ENCODER_WIDTHS[family].items()},
                                 torch.randn(CONTEXT_WIDTH[family]), attn2_weights(patcher, layers, "to_k"),
                                 attn2_weights(patcher, layers, "to_v"), layers=layers)
    config = TrainConfig(data=str(folder), output=str(folder / "run"), encodings=str(folder / "encodings"),
                         resolution=size, batch_size=batch, mixed_precision=precision, gradient_checkpointing=checkpointing,
                         localization_weight=1e-3, subject_dropout=0.0, device=str(device), checkpoint_every=0)
    return Trainer(config, BaseModels(patcher, name=f"random-{family}"), adapter=adapter)


def measure(patcher, family, folder, size, batch, checkpointing, device, precision, steps) -> tuple[float, float]:
    """(median seconds per step, peak MiB of one step)."""
    trainer = make_trainer(patcher, family, folder, size, batch, checkpointing, device, precision)
    try:
        trainer.train_step()  # warm-up
        peak = peak_memory_mib(trainer.train_step, device)
        seconds = statistics.median(time_ms(trainer.train_step, device) / 1000 for _ in range(steps))
        return seconds, peak
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(patcher, family, folder, size, checkpointing, device, precision, steps, limit: int = 256):
    """The largest power-of-two batch whose step runs on this GPU, with its (seconds, peak)."""
    found, batch = None, 1
    while batch <= limit:
        try:
            found = (batch, *measure(patcher, family, folder, size, batch, checkpointing, device, precision, steps))
        except torch.OutOfMemoryError:
            break
        batch *= 2
    if found is None:
        raise RuntimeError(f"{family} at {size}x{size}: batch 1 does not fit on this GPU")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_arguments(parser)
    parser.add_argument("--family", choices=("sd15", "sdxl", "both"), default="both")
    parser.add_argument("--size", type=int, help="image side, a multiple of 64 (default: 512 sd15, 1024 sdxl; CPU 128)")
    parser.add_argument("--batch", type=int, default=1, help="CPU only: images per step (a GPU searches the largest)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16", help="autocast of the step")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: GPU 10, CPU 2)")
    args = parser.parse_args()
    device = chosen_device(parser, args)
    on_gpu = device.type == "cuda"
    weights = DTYPES["fp32" if args.precision == "no" else args.precision] if on_gpu else torch.float32
    steps = args.steps or (10 if on_gpu else 2)
    families = ("sd15", "sdxl") if args.family == "both" else (args.family,)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as scratch:
        HeadlessComfy(args.comfyui, scratch, extra_args=("--use-pytorch-cross-attention",), cpu=not on_gpu)
        register_pack()
        from comfyui_version import __version__ as comfyui_version
        for family in families:
            size = args.size or (GPU_SIZE[family] if on_gpu else 128)
            folder = Path(scratch) / family
            folder.mkdir()
            write_synthetic_run(folder, family, size)
            patcher = build_unet(family, weights, device)
            for checkpointing in (False, True):
                if on_gpu:
                    batch, seconds, peak = largest_batch(patcher, family, folder, size, checkpointing, device,
                                                         args.precision, steps)
                else:
                    batch = args.batch
                    seconds, peak = measure(patcher, family, folder, size, batch, checkpointing, device,
                                            args.precision, steps)
                rows.append((family, f"{size}x{size}", "on" if checkpointing else "off", batch,
                             f"{seconds * 1000:.0f}", f"{batch / seconds:.2f}", f"{seconds * 1000 / 3600:.2f}",
                             f"{peak:.0f}"))
                print(rows[-1], flush=True)
            del patcher
            gc.collect()
            synchronize(device)

    hardware = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    memory = "CUDA max_memory_allocated" if on_gpu else "process peak RSS (VmHWM), coarse"
    print(f"\n{hardware}; torch {torch.__version__}; ComfyUI {comfyui_version}; UNet weights "
          f"{str(weights).removeprefix('torch.')}, autocast {args.precision}; median of {steps} steps\n")
    print(markdown_table(("model", "image", "grad. checkpointing", "batch", "ms/step", "images/s", "h per 1,000 steps",
                          f"peak MiB ({memory})"), rows))


if __name__ == "__main__":
    main()
