"""One cross-attention layer: the pack's replacement against ComfyUI's own attention, at the real shapes of SD1.5
(512x512) and SDXL (1024x1024), each ratio beside its arithmetic limit; and the share of cross-attention in a whole
UNet step, which turns the layer ratios into an estimate of the step ratio.

    python bench/bench_attention_layer.py --comfyui /path/to/ComfyUI --device cpu --before fa1365c --compile
    python bench/bench_attention_layer.py --comfyui /path/to/ComfyUI --device cuda --dtype fp16 bf16

--before REV adds the variants of the pack's attention/subject_attention.py as it was at git revision REV, run through
the same node and timed in the same rounds: before and after in one run.

Layer: the attn2 replacement that 'Apply Nested Attention' installs, taken from a patched MODEL and called with the
extra_options its model wrapper builds, on seeded random q, k, v of one layer's shape; against ComfyUI's
`optimized_attention` on the same q, k, v, which is the unpatched layer's call. Batches: 'cond+uncond' (the
sampler's usual batch: 2 rows, the subjects in the first) and 'cond' (1 row, every row carries the subjects);
1, 2 and 4 subjects with M = 16 nested tokens each. All variants of a shape are interleaved in rounds, the order
rotated each round; the table gives the median and the interquartile range of the per-call time ratio.

Arithmetic limits: the multiply-adds of the attention products, patched over unpatched, per call, for each of the two
formulations in attention/subject_attention.py. Both add one nested attention over M tokens per subject to a row with
subjects. Indicator channels: that row's q.k and a.v run over head size d + e, where e >= S channels pad d + S to a
multiple of 8. Log-sum-exp: that row's products stay those of plain attention, plus one q.k_s per subject. A row without
subjects costs what it did. Softmax, masks and copies are not counted.

Operators: the ATen operators one call dispatches (views included), counted with a TorchDispatchMode: for each
variant, and for ComfyUI's attention beside them. They stand in for kernel launches until a GPU run exists. Beside
them, the minor page faults per call (first touches of memory the allocator has just mapped), after the timed rounds.

Allocator (CPU): glibc's malloc serves a block above its mmap threshold from a fresh mapping, whose every 4 KiB page
faults on first touch, and it moves that threshold, and trims the heap, by what was freed before. Timing one layer
alone, that history differs between variants and between runs, so the same variant can fault thousands of times per
call in one run and never in the next (the page-fault column shows it). The run therefore fixes the thresholds first
(mallopt: mmap threshold 32 MiB, glibc's largest; trim threshold 1 GiB), so every variant allocates from a heap that is
already mapped and the time is the operators', not where the allocator happened to put each block; --glibc-defaults
leaves malloc as it is.

Compile (--compile): the replacement for one shape (SD1.5 1024 x 640, cond+uncond), 1 and 4 subjects: graph breaks
found by torch._dynamo.explain, the time of a first torch.compile(fullgraph=True) call (inductor), and the compiled
call's time against the eager one and ComfyUI's attention.

Step: a real ComfyUI UNet (the family's own config, seeded random weights), one call as the sampler makes it
(batch 2, cond + uncond), with a timing attn2 replacement on every layer: the share of the step spent in each
layer shape's cross-attention. The estimated step ratio is 1 + sum over shapes of share x (layer ratio - 1).
"""
import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config
from torch.utils._python_dispatch import TorchDispatchMode

try:
    import resource  # page-fault counts: POSIX only
except ImportError:
    resource = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nested_attention import (DTYPES, PROMPT_TOKENS, SUBJECT_POSITIONS, UNET_CONFIGS, HeadlessComfy,  # noqa: E402
                                    add_machine_arguments, build_unet, chosen_device, interleaved_times, markdown_table,
                                    register_pack, step_inputs, synchronize, time_ms, unet_step,
                                    variant_name)

NESTED_TOKENS = 16
SUBJECT_COUNTS = (1, 2, 4)
HEAD_DIM_ALIGN = 8  # attention/subject_attention.py pads the indicator channels to this multiple
# One layer per attention shape: (family, block, latent side at the family's size, width, heads).
LAYERS = [("sd15", ("input", 1, 0), 64, 320, 8), ("sd15", ("input", 4, 0), 32, 640, 8),
          ("sd15", ("input", 7, 0), 16, 1280, 8), ("sd15", ("middle", 0, 0), 8, 1280, 8),
          ("sdxl", ("input", 4, 0), 64, 640, 10), ("sdxl", ("input", 7, 0), 32, 1280, 20)]
STEP_SIZE = {"sd15": 512, "sdxl": 1024}
# A tiny UNet of each family's layout only hosts the patch (its model_options); the timed tensors have real shapes.
HOST_WIDTH = 32


def arithmetic_limit(queries: int, width: int, heads: int, subjects: int, rows: int, carried: int,
                     formulation: str) -> float:
    """Multiply-adds of the patched attention products over the unpatched ones, for the whole batch."""
    plain_row = 2 * queries * PROMPT_TOKENS * width
    nested = subjects * 2 * queries * NESTED_TOKENS * width
    if formulation == "indicator":
        head_dim = width // heads
        padded = -(-(head_dim + subjects) // HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN
        subject_row = 2 * queries * PROMPT_TOKENS * heads * padded + nested
    else:  # log-sum-exp: plain products, the nested attentions and one q.k_s per subject
        subject_row = plain_row + nested + subjects * queries * width
    return (carried * subject_row + (rows - carried) * plain_row) / (rows * plain_row)


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the block (views included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def page_faults_per_call(call, calls: int = 10) -> float | None:
    """Minor page faults per call, averaged over `calls` calls: 0 when every allocation reuses mapped memory."""
    if resource is None:
        return None
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / calls


def steady_heap() -> str:
    """Fix glibc malloc's mmap and trim thresholds (see the docstring), and say what the run's allocator is."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(None)
        fixed = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        fixed = False
    return "malloc: mmap threshold 32 MiB, trim threshold 1 GiB" if fixed else "malloc: as the platform has it (no glibc mallopt)"


def operator_count(call) -> int:
    with OperatorCount() as counter:
        call()
    return counter.count


def formulation_at(revision: str, folder: str):
    """attention/subject_attention.py as it was at a git revision, written into folder and loaded as a module of the
    pack."""
    pack_root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(pack_root), "show", f"{revision}:attention/subject_attention.py"],
                            check=True, capture_output=True, text=True).stdout
    name = "subject_personalization.attention.subject_attention_before"
    path = Path(folder) / "subject_attention_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def formulation_in_node(module):
    """The node's replacement calls `module`'s SubjectBinding and subject_attention while the block runs."""
    from subject_personalization.nodes import subject_patch

    binding = module.SubjectBinding
    if "token_positions" not in {field.name for field in dataclasses.fields(binding)}:
        class Binding(binding):  # the node now hands over host positions; bindings before took a tensor only
            def __init__(self, token_index, *args, **kwargs):
                super().__init__(torch.as_tensor(token_index), *args, **kwargs)

            @property
            def token_positions(self) -> tuple[int, ...]:
                return tuple(self.token_index.tolist())
        binding = Binding

    # a formulation without the predicate gets the whole batch only where every row carries a subject, as its node did
    whole_batch = getattr(module, "keeps_rows_without_subjects_plain", lambda *args: False)
    names = ("SubjectBinding", "subject_attention", "keeps_rows_without_subjects_plain")
    saved = [getattr(subject_patch, name) for name in names]
    for name, value in zip(names, (binding, module.subject_attention, whole_batch)):
        setattr(subject_patch, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(subject_patch, name, value)


def host_model(family: str, device: torch.device, dtype: torch.dtype):
    """A ModelPatcher around a tiny UNet of the family's layout, to install the patch on as the node does."""
    import comfy.model_detection
    import comfy.model_patcher
    config = comfy.model_detection.model_config_from_unet_config(dict(UNET_CONFIGS[family]))
    config.unet_config["model_channels"] = HOST_WIDTH
    if family == "sdxl":
        config.unet_config["num_head_channels"] = HOST_WIDTH
    config.set_inference_dtype(dtype, None)
    return comfy.model_patcher.ModelPatcher(config.get_model({}, "", device=device), load_device=device,
                                            offload_device=device)


def layer_calls(model, family: str, block, side: int, width: int, heads: int, rows: int, device, dtype, before=None,
                subject_counts=SUBJECT_COUNTS):
    """{variant: call} for one layer shape and batch: ComfyUI's attention, and the patched replacement per count
    (and per count with the `before` formulation, when given)."""
    from comfy.ldm.modules.attention import optimized_attention
    from subject_personalization.encoders.unet_layers import layer_key
    from subject_personalization.nodes.subject_patch import PatchedSubject, add_subject_patch

    generator = torch.Generator().manual_seed(side * width + rows)
    queries = side * side
    q = torch.randn(rows, queries, width, generator=generator).to(device, dtype)
    k, v = (torch.randn(rows, PROMPT_TOKENS, width, generator=generator).to(device, dtype) for _ in range(2))
    context = torch.randn(rows, PROMPT_TOKENS, UNET_CONFIGS[family]["context_dim"], generator=generator).to(device, dtype)
    cond_or_uncond = [0, 1][:rows]
    calls = {"unpatched": lambda: optimized_attention(q, k, v, heads)}
    for count in subject_counts:
        subjects = [PatchedSubject(signature=context[0, position].clone(), source=position, strength=1.0,
                                   nested={layer_key(block): tuple(
                                       torch.randn(NESTED_TOKENS, width, generator=generator).to(device, dtype)
                                       for _ in range(2))})
                    for position in SUBJECT_POSITIONS[:count]]
        patched = add_subject_patch(model, subjects)
        captured = {}

        def capture(latent, timestep, **conditioning):
            captured.update(conditioning["transformer_options"])

        patched.model_options["model_function_wrapper"](capture, {
            "input": torch.zeros(rows, 4, side, side, device=device), "cond_or_uncond": cond_or_uncond,
            "timestep": torch.ones(rows, device=device),
            "c": {"c_crossattn": context, "transformer_options": {"cond_or_uncond": cond_or_uncond}}})
        extra_options = {**captured, "block": block[:2], "block_index": block[2], "n_heads": heads,
                         "dim_head": width // heads, "activations_shape": [rows, width, side, side]}
        replacement = captured["patches_replace"]["attn2"][block]  # what the patch puts into this call
        name = variant_name(count)
        calls[name] = lambda replacement=replacement, options=extra_options: replacement(q, k, v, options)
        if before is not None:
            def before_call(replacement=replacement, options=extra_options):
                with formulation_in_node(before):
                    return replacement(q, k, v, options)
            calls[f"{name}, before"] = before_call
    return calls


def bench_layers(families, device, dtype, rounds: int, before=None) -> tuple[list[tuple], dict, list[tuple]]:
    """Rows of the layer table, {(family, width, queries): {variant: median ratio}} for the 'cond+uncond' batch, and
    rows of the operator-count table."""
    rows, ratios, operator_rows = [], {}, []
    for family in families:
        model = host_model(family, device, dtype)
        for layer_family, block, side, width, heads in LAYERS:
            if layer_family != family:
                continue
            for batch, rows_in_batch in (("cond+uncond", 2), ("cond", 1)):
                calls = layer_calls(model, family, block, side, width, heads, rows_in_batch, device, dtype, before)
                reference = calls["unpatched"]()
                for name, call in calls.items():  # warm-up, and proof that every patched variant is live
                    if name != "unpatched" and torch.equal(call(), reference):
                        raise RuntimeError(f"{family} {block} {name}: the patched output equals the unpatched one")
                shape = f"{side * side} x {width} ({heads} heads of {width // heads})"
                operators = {name: operator_count(call) for name, call in calls.items()}
                times = interleaved_times(calls, rounds, device)
                faults = {name: page_faults_per_call(call) for name, call in calls.items()}
                plain = statistics.median(times["unpatched"])
                for count in SUBJECT_COUNTS:
                    name = variant_name(count)
                    ratio = {variant: statistics.median(t / p for t, p in zip(times[variant], times["unpatched"]))
                             for variant in (name, f"{name}, before") if variant in times}
                    per_round = sorted(t / p for t, p in zip(times[name], times["unpatched"]))
                    quartiles = statistics.quantiles(per_round, n=4)
                    limits = [arithmetic_limit(side * side, width, heads, count, rows_in_batch, 1, formulation)
                              for formulation in ("indicator", "logsumexp")]
                    before_ratio = ratio.get(f"{name}, before")
                    rows.append((family, shape, batch, name, f"{plain:.2f}", f"{statistics.median(times[name]):.2f}",
                                 "-" if before_ratio is None else f"{before_ratio:.3f}", f"{ratio[name]:.3f}",
                                 f"{quartiles[0]:.3f}-{quartiles[2]:.3f}", f"{limits[0]:.3f}", f"{limits[1]:.3f}",
                                 f"{ratio[name] / limits[0]:.2f}", f"{ratio[name] / limits[1]:.2f}"))
                    operator_rows.append((family, shape, batch, name, operators["unpatched"],
                                          operators.get(f"{name}, before", "-"), operators[name],
                                          *("-" if faults.get(variant) is None else f"{faults[variant]:.0f}"
                                            for variant in ("unpatched", f"{name}, before", name))))
                    if batch == "cond+uncond":
                        ratios.setdefault((family, width, side * side), {})[name] = ratio[name]
        del model
        gc.collect()
    return rows, ratios, operator_rows


def bench_compile(device, dtype, rounds: int) -> list[tuple]:
    """Rows of the compile table: the replacement at SD1.5 1024 x 640, cond+uncond, traced and compiled."""
    family, block, side, width, heads = LAYERS[1]
    model = host_model(family, device, dtype)
    table = []
    for count in (1, 4):
        calls = layer_calls(model, family, block, side, width, heads, 2, device, dtype, subject_counts=(count,))
        name = variant_name(count)
        eager = calls[name]
        explained = torch._dynamo.explain(eager)()
        for reason in explained.break_reasons:
            print(f"graph break, {name}: {reason.reason}", file=sys.stderr)
        torch._dynamo.reset()
        compiled_function = torch.compile(eager, fullgraph=True)
        start = time.perf_counter()
        with torch._inductor.config.patch(force_disable_caches=True):  # a cold compile, not one from an earlier run
            compiled_out = compiled_function()
        compile_seconds = time.perf_counter() - start
        difference = (compiled_out.double() - eager().double()).abs().max().item()
        times = interleaved_times({"unpatched": calls["unpatched"], "eager": eager, "compiled": compiled_function},
                                  rounds, device)
        ratio = {variant: statistics.median(t / p for t, p in zip(times[variant], times["unpatched"]))
                 for variant in ("eager", "compiled")}
        table.append((family, f"{side * side} x {width}", "cond+uncond", name, explained.graph_break_count,
                      explained.graph_count, f"{compile_seconds:.1f}", f"{ratio['eager']:.3f}",
                      f"{ratio['compiled']:.3f}", f"{difference:.1e}"))
        torch._dynamo.reset()
    return table


def bench_step_share(family: str, size: int, device, dtype, rounds: int) -> dict:
    """{(family, width, queries): median share of the step spent in that shape's cross-attention}, and 'step ms'."""
    from comfy.ldm.modules.attention import optimized_attention
    from subject_personalization.encoders.unet_layers import cross_attention_layers

    patcher = build_unet(family, dtype, device)
    inputs = step_inputs(family, size, device, patcher.get_model_object("model_sampling"))
    timed = patcher.clone()
    spent: dict[tuple, float] = {}

    def timing_attention(q, k, v, extra_options):
        synchronize(device)
        start = time.perf_counter()
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        synchronize(device)
        shape = (family, q.shape[-1], q.shape[1])
        spent[shape] = spent.get(shape, 0.0) + (time.perf_counter() - start) * 1000
        return out

    for layer in cross_attention_layers(family):
        timed.set_model_attn2_replace(timing_attention, *layer.block)
    step = unet_step(timed, inputs)
    step()  # warm-up
    shares: dict[tuple, list[float]] = {}
    step_times = []
    for _ in range(rounds):
        spent.clear()
        step_ms = time_ms(step, device)
        step_times.append(step_ms)
        for shape, ms in spent.items():
            shares.setdefault(shape, []).append(ms / step_ms)
    del patcher, timed
    gc.collect()
    return {**{shape: statistics.median(values) for shape, values in shares.items()},
            "step ms": statistics.median(step_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_arguments(parser)
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES),
                        help="one table per dtype (default: fp16 on GPU, fp32 on CPU); on a GPU: --dtype fp16 bf16")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds per layer shape (default 40)")
    parser.add_argument("--before", metavar="REV", help="also time the formulation at this git revision, same rounds")
    parser.add_argument("--compile", action="store_true", help="also trace and compile the replacement (inductor)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave malloc's thresholds as they are (default: fixed, see above)")
    parser.add_argument("--step-rounds", type=int, default=3, help="timed UNet steps for the share (default 3)")
    parser.add_argument("--step-families", nargs="*", choices=("sd15", "sdxl"),
                        help="families whose whole-step share is measured (default: GPU sd15 sdxl; CPU sd15: SDXL at "
                             "1024 needs minutes per step and 10 GB in fp32 there); none: give the flag alone")
    args = parser.parse_args()
    device = chosen_device(parser, args)
    on_gpu = device.type == "cuda"
    dtypes = [DTYPES[name] for name in (args.dtype or ["fp16" if on_gpu else "fp32"])]
    step_families = args.step_families if args.step_families is not None else (["sd15", "sdxl"] if on_gpu else ["sd15"])
    allocator = "malloc: glibc defaults" if args.glibc_defaults else steady_heap()

    with tempfile.TemporaryDirectory(prefix="bench_attention_layer_") as scratch:
        HeadlessComfy(args.comfyui, scratch, extra_args=("--use-pytorch-cross-attention",), cpu=not on_gpu)
        register_pack()
        from comfyui_version import __version__ as comfyui_version
        before = formulation_at(args.before, scratch) if args.before else None
        hardware = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
        for dtype in dtypes:
            with torch.inference_mode():
                layer_rows, ratios, operator_rows = bench_layers(("sd15", "sdxl"), device, dtype, args.rounds, before)
                shares = {family: bench_step_share(family, STEP_SIZE[family], device, dtype, args.step_rounds)
                          for family in step_families}
            compile_rows = bench_compile(device, dtype, args.rounds) if args.compile else []
            print_tables(f"{hardware}; torch {torch.__version__}; ComfyUI {comfyui_version} "
                         f"(--use-pytorch-cross-attention); {str(dtype).removeprefix('torch.')}; M = {NESTED_TOKENS}; "
                         f"{args.rounds} interleaved rounds; {allocator}"
                         + (f"; before = {args.before}" if before else ""),
                         layer_rows, ratios, operator_rows, shares, compile_rows)


def print_tables(title: str, layer_rows, ratios, operator_rows, shares, compile_rows) -> None:
    print(f"\n{title}\n")
    print(markdown_table(("model", "queries x width", "batch", "variant", "unpatched ms", "patched ms",
                          "x unpatched, before", "x unpatched", "interquartile", "limit, indicator",
                          "limit, log-sum-exp", "/ indicator limit", "/ log-sum-exp limit"), layer_rows))
    print()
    print(markdown_table(("model", "queries x width", "batch", "variant", "operators, ComfyUI's attention",
                          "operators, before", "operators", "page faults, ComfyUI's attention", "page faults, before",
                          "page faults"), operator_rows))
    step_rows = []
    for family, measured in shares.items():
        shape_shares = {shape: share for shape, share in measured.items() if shape != "step ms"}
        for count in SUBJECT_COUNTS:
            name = variant_name(count)
            estimate = 1 + sum(share * (ratios[shape][name] - 1) for shape, share in shape_shares.items())
            step_rows.append((family, f"{STEP_SIZE[family]}x{STEP_SIZE[family]}", f"{measured['step ms']:.0f}",
                              f"{100 * sum(shape_shares.values()):.1f}%", name, f"{estimate:.3f}"))
    if step_rows:
        print()
        print(markdown_table(("model", "image", "unpatched step ms", "cross-attention share of the step", "variant",
                              "estimated step ratio"), step_rows))
    if compile_rows:
        print()
        print(markdown_table(("model", "queries x width", "batch", "variant", "graph breaks", "graphs",
                              "first compiled call s", "eager x unpatched", "compiled x unpatched",
                              "max |compiled - eager|"), compile_rows))


if __name__ == "__main__":
    main()
