"""Nested Attention cost: UNet step time and peak memory without the patch and with 1, 2 and 4 subjects, side by
side in one run, and the time to encode one subject (docs/methods.md §2.6, the cost model).

    python bench/bench_nested_attention.py --comfyui /path/to/ComfyUI --dtype fp16 bf16     # GPU: the issue's setting
    python bench/bench_nested_attention.py --comfyui /path/to/ComfyUI --device cpu --family sd15 --size 256 --dtype fp32

Targets (GPU, SD1.5 at 512x512 and SDXL at 1024x1024, batch 2, fp16): 1 subject <= 1.05x the unpatched step,
4 subjects <= 1.15x, encoding one subject < 50 ms. On a CPU the same ratios are reported at a small size.

What is measured:
- a real ComfyUI UNet built from ComfyUI's own model config (`comfy.supported_models.SD15` / `SDXL`) with seeded
  random weights, wrapped in a ModelPatcher; the patched variants are the pack's `SubjectAttentionPatch` installed
  on clones, exactly as 'Apply Nested Attention' does, with M = 16 random K~, V~ per layer and subject;
- one step = one UNet call made the way comfy/samplers.py `_calc_cond_batch` makes it for one positive and one
  negative prompt: batch 2 (cond row with the subject tokens, uncond row), cond_or_uncond [0, 1], through the
  installed model_function_wrapper;
- variants interleaved in rounds (order rotated each round) after warm-up; medians per variant;
- peak memory in a separate pass, one step per variant: CUDA max_memory_allocated, or on CPU the process's peak
  RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim; Linux only, page-level and coarse);
- encoding: a fresh `NestedAdapter`'s resampler on (1, 257, 1024) CLIP ViT-L tokens, then its per-layer
  projections to K~, V~ (the CLIP vision model itself is not included).

ComfyUI is booted headless on the chosen device with --use-pytorch-cross-attention: ComfyUI's PyTorch SDPA
attention, its default on NVIDIA GPUs, so the unpatched layers run the kernel a GPU user gets on both devices.
"""
import argparse
import ctypes
import gc
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))  # the tools folder only, never the pack root
from comfy_headless import HeadlessComfy, comfyui_path_from_env  # noqa: E402
from pack_package import register_pack  # noqa: E402

SUBJECT_COUNTS = (1, 2, 4)
NESTED_TOKENS = 16          # M subject tokens per subject
PROMPT_TOKENS = 77
SUBJECT_POSITIONS = (2, 4, 6, 8)  # token index of each subject's word in the positive prompt
CLIP_VISION_TOKENS, CLIP_VISION_WIDTH = 257, 1024  # ViT-L/14
ENCODE_REPEATS = 20
GPU_SIZE = {"sd15": 512, "sdxl": 1024}
CPU_SIZE = 256
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MIB = 2 ** 20
# Full UNet configs as comfy/model_detection.py `unet_config_from_diffusers_unet` spells them (its SD15 and SDXL).
UNET_CONFIGS = {
    "sd15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
             "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "sdxl": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(run: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return (time.perf_counter() - start) * 1000


def interleaved_times(calls: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Each call's time (ms) in every round, the order rotated round by round so that drift (heat, other load) is
    spread evenly over the variants measured side by side."""
    names = list(calls)
    times = {name: [] for name in names}
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_ms(calls[name], device))
    return times


def add_machine_arguments(parser: argparse.ArgumentParser) -> None:
    """--comfyui and --device, as every benchmark of the pack takes them."""
    parser.add_argument("--comfyui", default=comfyui_path_from_env(), help="the ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")


def chosen_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The device asked for, once --comfyui and --device are checked: what is missing stops the run, saying what to pass."""
    if not args.comfyui:
        parser.error("set COMFYUI_PATH or pass --comfyui")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    return torch.device(args.device)


def peak_memory_mib(run: Callable[[], object], device: torch.device) -> float:
    """Peak memory of the process during one call: CUDA allocations, or on CPU the resident set (coarse)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MIB
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the peak counts pages this call touches
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    run()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) * 1024 / MIB


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI allocates UNet weights uninitialised (they normally come from a file): norms get identity, every
    other parameter N(0, 0.02), seeded."""
    torch.manual_seed(seed)
    for submodule in module.modules():
        is_norm = isinstance(submodule, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for name, parameter in submodule.named_parameters(recurse=False):
            if is_norm:
                parameter.fill_(1.0 if name == "weight" else 0.0)
            else:
                parameter.normal_(0.0, 0.02)


def build_unet(family: str, dtype: torch.dtype, device: torch.device):
    """A ComfyUI ModelPatcher around the family's UNet, as ComfyUI's loaders build it, with random weights."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIGS[family]))
    expected = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family]
    if type(config) is not expected:
        raise RuntimeError(f"ComfyUI matched the {family} UNet config to {type(config).__name__}, not {expected.__name__}")
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=device)
    randomize(model.diffusion_model, seed=0)
    model.to(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


@dataclass
class StepInputs:
    latent: torch.Tensor     # (2, 4, h, w): the cond and the uncond copy of one latent
    sigma: torch.Tensor      # (1,)
    context: torch.Tensor    # (2, 77, D): positive prompt (row 0, carries the subject tokens), negative prompt (row 1)
    extra: dict              # SDXL: y (2, 2816)


def step_inputs(family: str, size: int, device: torch.device, model_sampling) -> StepInputs:
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, size // 8, size // 8, generator=generator).repeat(2, 1, 1, 1)
    context = torch.randn(2, PROMPT_TOKENS, UNET_CONFIGS[family]["context_dim"], generator=generator)
    extra = {}
    if UNET_CONFIGS[family]["adm_in_channels"] is not None:
        extra["y"] = torch.randn(2, UNET_CONFIGS[family]["adm_in_channels"], generator=generator).to(device)
    sigma = model_sampling.percent_to_sigma(0.5)
    return StepInputs(latent.to(device), torch.tensor([sigma], device=device), context.to(device), extra)


def unet_step(patcher, inputs: StepInputs) -> Callable[[], torch.Tensor]:
    """One UNet call for one positive and one negative prompt, made as comfy/samplers.py `_calc_cond_batch` makes it."""
    import comfy.patcher_extension

    model, options = patcher.model, patcher.model_options
    wrapper = options.get("model_function_wrapper")
    cond_or_uncond, uuids = [0, 1], [uuid.uuid4(), uuid.uuid4()]
    timestep = torch.cat([inputs.sigma] * 2)

    def step() -> torch.Tensor:
        transformer_options = comfy.patcher_extension.merge_nested_dicts({}, options.get("transformer_options", {}),
                                                                         copy_dict1=False)
        transformer_options.update(cond_or_uncond=cond_or_uncond[:], uuids=uuids[:], sigmas=inputs.sigma)
        c = {"c_crossattn": inputs.context, **inputs.extra, "transformer_options": transformer_options}
        if wrapper is not None:
            return wrapper(model.apply_model, {"input": inputs.latent, "timestep": timestep, "c": c,
                                               "cond_or_uncond": cond_or_uncond})
        return model.apply_model(inputs.latent, timestep, **c)
    return step


def patched_variants(patcher, family: str, inputs: StepInputs, dtype: torch.dtype) -> dict[str, object]:
    """The unpatched model and clones patched with 1, 2, 4 subjects, each bound to its word in the positive row."""
    from subject_personalization.encoders.unet_layers import cross_attention_layers
    from subject_personalization.nodes.subject_patch import PatchedSubject, add_subject_patch

    layers = cross_attention_layers(family)
    device = inputs.context.device
    subjects = [PatchedSubject(
        signature=inputs.context[0, position].clone(), source=position, strength=1.0, sigma_start=float("inf"), sigma_end=0.0,
        nested={layer.key: (torch.randn(NESTED_TOKENS, layer.inner_dim, device=device, dtype=dtype),
                            torch.randn(NESTED_TOKENS, layer.inner_dim, device=device, dtype=dtype)) for layer in layers})
        for position in SUBJECT_POSITIONS[:max(SUBJECT_COUNTS)]]
    variants = {"unpatched": patcher}
    for count in SUBJECT_COUNTS:
        variants[variant_name(count)] = add_subject_patch(patcher, subjects[:count])
    return variants


def bench_unet(family: str, size: int, dtype: torch.dtype, device: torch.device, rounds: int) -> list[tuple]:
    patcher = build_unet(family, dtype, device)
    inputs = step_inputs(family, size, device, patcher.get_model_object("model_sampling"))
    steps = {name: unet_step(variant, inputs) for name, variant in patched_variants(patcher, family, inputs, dtype).items()}

    reference = steps["unpatched"]()  # warm-up, and proof that each patch is live and the output finite
    for name, step in steps.items():
        output = step()
        if not torch.isfinite(output).all():
            raise RuntimeError(f"{family} {name}: the UNet output is not finite")
        if name != "unpatched" and torch.equal(output, reference):
            raise RuntimeError(f"{family} {name}: the output equals the unpatched one; the patch did not engage")
    del reference, output

    names = list(steps)
    times = interleaved_times(steps, rounds, device)
    peaks = {name: peak_memory_mib(steps[name], device) for name in names}

    plain_ms, plain_peak = statistics.median(times["unpatched"]), peaks["unpatched"]
    rows = []
    for name in names:
        median = statistics.median(times[name])
        rows.append((family, f"{size}x{size}", name, f"{median:.1f}", f"{min(times[name]):.1f}",
                     f"{median / plain_ms:.3f}", f"{peaks[name]:.0f}", f"{peaks[name] - plain_peak:+.0f}"))
    return rows


@torch.no_grad()
def bench_encoding(family: str, dtype: torch.dtype, device: torch.device) -> tuple:
    from subject_personalization.encoders.nested_adapter import DEFAULT_ENCODER, NestedAdapter
    from subject_personalization.encoders.subject_resampler import ResamplerConfig
    from subject_personalization.encoders.unet_layers import CONTEXT_WIDTH

    torch.manual_seed(0)
    encoder = ResamplerConfig(vision_width=CLIP_VISION_WIDTH, num_queries=NESTED_TOKENS,
                              output_width=CONTEXT_WIDTH[family], **DEFAULT_ENCODER[family])
    with torch.device(device):
        adapter = NestedAdapter(family, encoder, subject_domain="person", initializer_word="person")
    adapter.to(dtype).eval()
    clip_tokens = torch.randn(1, CLIP_VISION_TOKENS, CLIP_VISION_WIDTH, device=device, dtype=dtype)
    subject_tokens = adapter.resampler(clip_tokens)

    def resample() -> torch.Tensor:
        return adapter.resampler(clip_tokens)

    def project() -> dict:
        return adapter.projections.project(subject_tokens)

    for _ in range(3):
        resample()
        project()
    resampler_ms = statistics.median(time_ms(resample, device) for _ in range(ENCODE_REPEATS))
    projections_ms = statistics.median(time_ms(project, device) for _ in range(ENCODE_REPEATS))
    return family, f"{resampler_ms:.1f}", f"{projections_ms:.1f}", f"{resampler_ms + projections_ms:.1f}"


def variant_name(count: int) -> str:
    """How every table of the benchmarks names a patched variant: '1 subject', '2 subjects'."""
    return f"{count} subject{'s' * (count > 1)}"


def markdown_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_arguments(parser)
    parser.add_argument("--family", choices=("sd15", "sdxl", "both"), default="both")
    parser.add_argument("--size", type=int, help=f"image side in pixels, a multiple of 64 (default: GPU "
                        f"{GPU_SIZE['sd15']} for sd15 and {GPU_SIZE['sdxl']} for sdxl, CPU {CPU_SIZE})")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES),
                        help="one table per dtype (default: fp16 on GPU, fp32 on CPU); on a GPU: --dtype fp16 bf16")
    parser.add_argument("--rounds", type=int, help="timed rounds over all variants (default: GPU 30, CPU 5)")
    args = parser.parse_args()
    if args.size is not None and (args.size <= 0 or args.size % 64):
        parser.error("--size must be a positive multiple of 64")
    device = chosen_device(parser, args)
    on_gpu = device.type == "cuda"
    dtypes = [DTYPES[name] for name in (args.dtype or ["fp16" if on_gpu else "fp32"])]
    rounds = args.rounds or (30 if on_gpu else 5)
    families = ("sd15", "sdxl") if args.family == "both" else (args.family,)

    with tempfile.TemporaryDirectory(prefix="bench_nested_attention_") as scratch:
        HeadlessComfy(args.comfyui, scratch, extra_args=("--use-pytorch-cross-attention",), cpu=not on_gpu)
        register_pack()
        from comfyui_version import __version__ as comfyui_version

        hardware = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
        memory = "CUDA max_memory_allocated" if on_gpu else "process peak RSS (VmHWM), coarse"
        for dtype in dtypes:
            unet_rows, encode_rows = [], []
            with torch.inference_mode():
                for family in families:
                    encode_rows.append(bench_encoding(family, dtype, device))
                    gc.collect()
                    size = args.size or (GPU_SIZE[family] if on_gpu else CPU_SIZE)
                    unet_rows += bench_unet(family, size, dtype, device, rounds)
                    gc.collect()
            print(f"\n{hardware}; torch {torch.__version__}; ComfyUI {comfyui_version}; "
                  f"{str(dtype).removeprefix('torch.')}; batch 2 (cond + uncond); M = {NESTED_TOKENS} tokens per "
                  f"subject; {rounds} rounds, medians\n")
            print(markdown_table(("model", "image", "variant", "ms/step (median)", "ms/step (min)", "x unpatched",
                                  f"peak MiB ({memory})", "peak vs unpatched (MiB)"), unet_rows))
            print()
            print(markdown_table(("model", "resampler (ms)", "projections (ms)", "encode one subject (ms)"),
                                 encode_rows))


if __name__ == "__main__":
    main()
