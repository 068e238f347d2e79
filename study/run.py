"""The study: the papers' claims measured in the toy world, through the pack's trainer, nodes and ComfyUI's sampler.

Stages, each logged: the world and the scorer's validation (refused below its bar), the base model and its prior
(refused below 90% on background and position), the adapters trained by the pack's trainer for every seed, then the
measurements on held-out identities. Seeds vary both the adapters' training and the sampling noise.
Results: <output>/results.json, <output>/report.md and <output>/identity_vs_prompt.png.
"""
import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..encoders.kill_safe import written_beside
from . import world
from .base_model import SECOND_WORD, SUBJECT_WORD, BaseRecipe, base_model, image_encoder, pixel_vae, text_encoder
from .scorer import check_validated, score_image, score_pair, validate

EVALUATION_SCENES = (world.Scene("red", "left", True), world.Scene("blue", "right", False),
                     world.Scene("green", "right", True), world.Scene("yellow", "left", False))
STRENGTHS = {"token_weight": (0.5, 1.0, 2.0, 4.0), "scale": (0.25, 0.5, 1.0)}
START_PERCENTS = (0.0, 0.2, 0.4, 0.6)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
PRIOR_BAR = 0.9


@dataclass
class StudyOptions:
    output: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    held_out: tuple[int, ...] = (12, 13, 14, 15)
    identities: int = 16
    base: BaseRecipe = field(default_factory=BaseRecipe)
    adapter_steps: int = 400
    images_per_condition: int = 4
    sampler_steps: int = 12
    cfg: float = 10.0  # the 1,500-step base's prior (background, position): 0.58, 0.84 at 4; 0.84, 0.92 at 7; 0.92, 0.95 at 10
    evaluation_scenes: int = len(EVALUATION_SCENES)
    smoke: bool = False

    def scenes(self) -> tuple:
        return EVALUATION_SCENES[: self.evaluation_scenes]


def smoke_options(output: Path) -> StudyOptions:
    """Every stage, a few steps each: the CI run (findings are not asserted)."""
    return StudyOptions(output, seeds=(0,), held_out=(4, 5), identities=6,
                        base=BaseRecipe(steps=3, batch_size=8, views_per_scene=1), adapter_steps=2,
                        images_per_condition=1, sampler_steps=2, evaluation_scenes=1, smoke=True)


# ---------------------------------------------------------------- statistics
def say(message: str) -> None:
    """One line of the study's log, at once (ComfyUI's log interceptor holds stdout back otherwise)."""
    print(message, flush=True)


def interval(values: list[float]) -> dict:
    """Mean over seeds with a 95% t interval (half-width; none for one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "half_width": None, "seeds": len(values)}
    spread = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return {"mean": mean, "half_width": T_975.get(len(values) - 1, 1.96) * spread, "seeds": len(values)}


def shown(entry: dict) -> str:
    return f"{entry['mean']:.2f}" + ("" if entry["half_width"] is None else f" ± {entry['half_width']:.2f}")


# ---------------------------------------------------------------- the models
class CachedImageEncoder:
    """ComfyUI's CLIP vision model, each distinct image encoded once (the study reuses a few references many times)."""

    def __init__(self, clip_vision):
        self.clip_vision, self.cache = clip_vision, {}

    def __getattr__(self, name):
        return getattr(self.clip_vision, name)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, crop: bool = True) -> dict:
        rows = []
        for image in images:
            key = (image.shape, image.float().cpu().numpy().tobytes())
            if key not in self.cache:
                self.cache[key] = self.clip_vision.encode_image(image[None], crop=crop)["penultimate_hidden_states"][0]
            rows.append(self.cache[key])
        return {"penultimate_hidden_states": torch.stack(rows)}


def to_image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float()[None] / 255


def write_adapter_data(folder: Path, identities: list, seed: int) -> None:
    """The adapters' training set: each training identity in every scene (word 'toy'), four shared references per
    identity, and two-subject images ('toy' left, 'pet' right) with both masks."""
    from PIL import Image
    rng = np.random.default_rng([seed, 2])
    for sub in ("images", "masks", "references"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    references = {}
    for identity in identities:
        references[identity.index] = []
        for number in range(4):
            name = f"references/{identity.index}_{number}.png"
            Image.fromarray(world.draw_reference(identity, rng)).save(folder / name)
            references[identity.index].append(name)
    lines = []
    for identity in identities:
        for number, scene in enumerate(world.scenes()):
            image, mask = world.draw(identity, scene, rng)
            stem = f"{identity.index}_{number}"
            Image.fromarray(image).save(folder / "images" / f"{stem}.png")
            Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")
            lines.append({"image": f"images/{stem}.png", "caption": world.caption(SUBJECT_WORD, scene),
                          "subjects": [{"word": SUBJECT_WORD, "references": references[identity.index],
                                        "mask": f"masks/{stem}.png"}]})
    for number, (left, right) in enumerate(zip(identities, identities[1:] + identities[:1])):
        background = list(world.BACKGROUNDS)[number % len(world.BACKGROUNDS)]
        image, left_mask, right_mask = world.draw_pair(left, right, background, rng)
        stem = f"pair_{number}"
        Image.fromarray(image).save(folder / "images" / f"{stem}.png")
        Image.fromarray(left_mask).save(folder / "masks" / f"{stem}_left.png")
        Image.fromarray(right_mask).save(folder / "masks" / f"{stem}_right.png")
        lines.append({"image": f"images/{stem}.png", "caption": world.pair_caption(SUBJECT_WORD, SECOND_WORD, background),
                      "subjects": [{"word": SUBJECT_WORD, "references": references[left.index], "mask": f"masks/{stem}_left.png"},
                                   {"word": SECOND_WORD, "references": references[right.index], "mask": f"masks/{stem}_right.png"}]})
    with written_beside(folder / "metadata.jsonl") as partial:  # last: the set is complete once it is there
        partial.write_text("".join(json.dumps(line) + "\n" for line in lines))


ADAPTERS = {  # the trainer's options for each method; the rest of the recipe is shared (same data and budget)
    "nested": {},
    "decoupled": {"attention": "decoupled"},
    "nested_localization": {"localization_weight": 1e-2},
    "nested_single_token": {"encoder": {"num_queries": 1, "depth": 1, "width": 64, "heads": 1}},
}


def train_adapter(method: str, seed: int, options: StudyOptions, base, data: Path, log) -> Path:
    """One adapter through the pack's trainer (cached by its options): the path of its final checkpoint."""
    from ..train.config import TrainConfig
    from ..train.trainer import Trainer
    output = options.output / "adapters" / f"{method}_seed{seed}_steps{options.adapter_steps}"
    final = output / "checkpoints" / f"step_{options.adapter_steps:07d}.safetensors"
    if final.is_file():
        log(f"adapter {method}, seed {seed}: {final} (cached)")
        return final
    values = dict(data=str(data), output=str(output), encodings=str(options.output / "encodings"), resolution=world.SIZE,
                  initializer_word=SUBJECT_WORD, subject_domain="object", vision_model="ViT-L/14",
                  encoder={"num_queries": 16, "depth": 1, "width": 64, "heads": 1}, batch_size=16, learning_rate=1e-3,
                  max_steps=options.adapter_steps, seed=seed, subject_dropout=0.1, checkpoint_every=options.adapter_steps,
                  log_every=50, device="cpu")
    log(f"adapter {method}, seed {seed}: training {options.adapter_steps} steps")
    started = time.perf_counter()
    Trainer(TrainConfig(**{**values, **ADAPTERS[method]}), base).fit()
    log(f"adapter {method}, seed {seed}: {time.perf_counter() - started:.0f} s")
    return final


# ---------------------------------------------------------------- generation through the nodes
class Generator:
    def __init__(self, model, clip, vae, clip_vision, options: StudyOptions):
        from ..train.validation import empty_prompt
        self.model, self.clip, self.vae, self.clip_vision, self.options = model, clip, vae, clip_vision, options
        self.negative = empty_prompt(clip)

    def sample(self, model, positive, seed: int) -> np.ndarray:
        """ComfyUI's KSampler node: images_per_condition images (uint8) from consecutive noise of one seed."""
        import nodes
        latent = {"samples": torch.zeros(self.options.images_per_condition, 3, world.SIZE, world.SIZE)}
        (samples,) = nodes.KSampler().sample(model, seed, self.options.sampler_steps, self.options.cfg, "euler", "normal",
                                             positive, self.negative, latent)
        images = self.vae.decode(samples["samples"]).clamp(0, 1)
        return (images.numpy() * 255).round().astype(np.uint8)

    def prompt(self, text: str) -> list:
        import nodes
        return nodes.CLIPTextEncode().encode(self.clip, text)[0]

    def nested(self, adapter, references: list[tuple[np.ndarray, str, torch.Tensor | None]], text: str,
               token_weight: float, start_percent: float, seed: int) -> np.ndarray:
        """Nested Attention Subject (one per subject) -> Nested Attention Encode -> Apply Nested Attention -> KSampler."""
        from ..nodes.nested_apply import ApplyNestedAttention
        from ..nodes.nested_encode import NestedAttentionEncode
        from ..nodes.nested_subject import NestedAttentionSubject
        subjects = None
        for reference, word, mask in references:
            (subjects,) = NestedAttentionSubject().encode(adapter, self.clip_vision, to_image(reference), word, 1.0, 0.0,
                                                          1.0, subjects=subjects, mask=mask,
                                                          token_weight_source="token_weight below",
                                                          token_weight=token_weight)
        (positive,) = NestedAttentionEncode().encode(self.clip, subjects, text)
        (model,) = ApplyNestedAttention().apply(self.model, positive, 1.0, start_percent, 1.0)
        return self.sample(model, positive, seed)

    def decoupled(self, adapter, reference: np.ndarray, text: str, scale: float, seed: int) -> np.ndarray:
        from ..nodes.nested_subject import encode_subject_tokens
        from .decoupled_baseline import decoupled_model
        tokens = encode_subject_tokens(adapter, self.clip_vision, to_image(reference))
        return self.sample(decoupled_model(self.model, adapter, tokens, scale), self.prompt(text), seed)


# ---------------------------------------------------------------- measurements
def single_scores(images: np.ndarray, identities: list, expected, scene: world.Scene, reference_identity) -> dict:
    scores = [score_image(image, identities, expected) for image in images]
    return {"identity": float(np.mean([s.identity == expected.index for s in scores])),
            "reference_identity": float(np.mean([s.identity == reference_identity.index for s in scores])),
            "background": float(np.mean([s.background == scene.background for s in scores])),
            "side": float(np.mean([s.side == scene.side for s in scores])),
            "ball": float(np.mean([s.ball == scene.ball for s in scores]))}


def mean_rows(rows: list[dict]) -> dict:
    summary = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
    summary["prompt"] = float(np.mean([summary[key] for key in ("background", "side", "ball")]))
    return summary


def identity_against_prompt(generate: Generator, adapters: dict, identities: list, held_out: list, seed: int,
                            options: StudyOptions, log) -> dict:
    """Per setting (method, strength): scores averaged over held-out identities and evaluation scenes."""
    references = reference_images(identities, seed)
    settings = {("prior", None): None}
    for method, knob in (("nested", "token_weight"), ("decoupled_gated", "token_weight"),
                         ("decoupled_ungated", "scale"), ("nested_single_token", "token_weight")):
        for strength in STRENGTHS[knob]:
            settings[(method, strength)] = knob
    settings[("wrong_reference", 1.0)] = "token_weight"
    results = {}
    for (method, strength), knob in settings.items():
        rows = []
        for number, identity in enumerate(held_out):
            given = held_out[(number + 1) % len(held_out)] if method == "wrong_reference" else identity
            for scene_number, scene in enumerate(options.scenes()):
                text, noise = world.caption(SUBJECT_WORD, scene), seed * 1000 + number * 10 + scene_number
                if method == "prior":
                    images = generate.sample(generate.model, generate.prompt(text), noise)
                elif method == "decoupled_ungated":
                    images = generate.decoupled(adapters["decoupled"], references[given.index], text, strength, noise)
                else:
                    adapter = adapters[{"wrong_reference": "nested"}.get(method, method)]
                    images = generate.nested(adapter, [(references[given.index], SUBJECT_WORD, None)], text, strength,
                                             0.0, noise)
                rows.append(single_scores(images, identities, identity, scene, given))
        results[f"{method}@{strength}"] = {"method": method, "knob": knob, "strength": strength, **mean_rows(rows)}
        log(f"  {method} {knob or ''} {strength or ''}: identity {results[f'{method}@{strength}']['identity']:.2f}, "
            f"prompt {results[f'{method}@{strength}']['prompt']:.2f}")
    return results


def delayed_conditioning(generate: Generator, adapters: dict, identities: list, held_out: list, seed: int,
                         options: StudyOptions) -> dict:
    references, results = reference_images(identities, seed), {}
    for start in START_PERCENTS:
        rows = [single_scores(generate.nested(adapters["nested"], [(references[identity.index], SUBJECT_WORD, None)],
                                              world.caption(SUBJECT_WORD, scene), 1.0, start,
                                              seed * 1000 + number * 10 + scene_number),
                              identities, identity, scene, identity)
                for number, identity in enumerate(held_out) for scene_number, scene in enumerate(options.scenes())]
        results[f"start@{start}"] = {"start_percent": start, **mean_rows(rows)}
    return results


def half_masks() -> tuple[torch.Tensor, torch.Tensor]:
    left = torch.zeros(1, world.SIZE, world.SIZE)
    left[..., : world.SIZE // 2] = 1
    return left, 1 - left


def two_subjects(generate: Generator, adapters: dict, identities: list, held_out: list, seed: int) -> dict:
    """Each held-out pair (left 'toy', right 'pet') on two backgrounds, with and without region masks."""
    references, (left_mask, right_mask), results = reference_images(identities, seed), half_masks(), {}
    for method in ("nested", "nested_localization"):
        for masked in (False, True):
            rows = []
            for number, (left, right) in enumerate(zip(held_out, held_out[1:] + held_out[:1])):
                for background in ("red", "blue"):
                    subjects = [(references[left.index], SUBJECT_WORD, left_mask if masked else None),
                                (references[right.index], SECOND_WORD, right_mask if masked else None)]
                    images = generate.nested(adapters[method], subjects,
                                             world.pair_caption(SUBJECT_WORD, SECOND_WORD, background), 1.0, 0.0,
                                             seed * 1000 + number * 10 + len(background))
                    for image in images:
                        score = score_pair(image, identities, left, right)
                        rows.append({"identity_in_place": (score.left_identity_correct + score.right_identity_correct) / 2,
                                     "blended": (score.left_leak + score.right_leak) / 2})
            results[f"{method}{'+masks' if masked else ''}"] = {
                "method": method, "masks": masked, **{key: float(np.mean([row[key] for row in rows])) for key in rows[0]}}
    return results


def image_encoder_identity(clip_vision, held_out: list, views: int = 4) -> dict:
    """Whether the frozen image encoder carries identity for unseen subjects: each held-out identity's reference photos,
    drawn twice over; every photo of the second draw is matched (cosine of the mean penultimate token) to the nearest
    of the first draw's. Chance is 1 / len(held_out)."""
    first, second = (np.random.default_rng([4, draw]) for draw in (0, 1))

    def features(rng) -> torch.Tensor:
        photos = torch.cat([to_image(world.draw_reference(identity, rng)) for identity in held_out for _ in range(views)])
        return torch.nn.functional.normalize(clip_vision.encode_image(photos)["penultimate_hidden_states"].mean(1), dim=-1)

    owners = torch.arange(len(held_out)).repeat_interleave(views)
    nearest = (features(second) @ features(first).T).argmax(dim=1)
    return {"accuracy": float((owners[nearest] == owners).float().mean()), "chance": 1 / len(held_out),
            "photos": len(owners)}


def reference_images(identities: list, seed: int) -> dict[int, np.ndarray]:
    """One reference photo per identity for the evaluation (drawn apart from the training references)."""
    rng = np.random.default_rng([seed, 3])
    return {identity.index: world.draw_reference(identity, rng) for identity in identities}


# ---------------------------------------------------------------- the run
def run(options: StudyOptions, log=say) -> dict:
    from ..encoders.nested_adapter import load_nested_adapter
    from ..train.trainer import BaseModels
    started = time.perf_counter()
    options.output.mkdir(parents=True, exist_ok=True)
    identities = world.identities(options.identities, seed=0)
    held_out = [identities[i] for i in options.held_out]
    training = [identity for identity in identities if identity.index not in options.held_out]
    log(f"world: {len(identities)} identities, held out {list(options.held_out)}")

    validation = validate(identities, seed=0)
    log(f"scorer validation: ground truth {validation.ground_truth}, noise {validation.noise}")
    check_validated(validation)

    clip, vae = text_encoder(options.base.text_residual_scale), pixel_vae()
    clip_vision = CachedImageEncoder(image_encoder())
    encoder_check = image_encoder_identity(clip_vision, held_out)
    log(f"image encoder: nearest reference of the same held-out identity {encoder_check['accuracy']:.2f} "
        f"(chance {encoder_check['chance']:.2f})")
    model = base_model(options.output / "base", training, options.base, clip, vae, log)
    generate = Generator(model, clip, vae, clip_vision, options)

    report = {"options": {**asdict(options), "output": str(options.output)}, "scorer_validation": asdict(validation),
              "image_encoder": encoder_check, "seeds": {}}
    prior = prior_scores(generate, identities, held_out)
    report["prior"] = prior
    log(f"prior: background {prior['background']:.2f}, side {prior['side']:.2f}, ball {prior['ball']:.2f}")
    if min(prior["background"], prior["side"]) < PRIOR_BAR and not options.smoke:
        _write(options.output / "results.json", report)
        raise RuntimeError(f"the base model follows the prompt too weakly to measure a loss of it (background "
                           f"{prior['background']:.2f}, position {prior['side']:.2f}; the study needs {PRIOR_BAR} each): "
                           f"train it longer (--base-steps) and rerun")

    data = options.output / "adapter_data"
    if not (data / "metadata.jsonl").is_file():
        write_adapter_data(data, training, seed=0)
    base = BaseModels(model, clip, vae, clip_vision, "study-base")
    for seed in options.seeds:
        adapters = {method: train_adapter(method, seed, options, base, data, log) for method in ADAPTERS}
        loaded = {method: load_nested_adapter(path) for method, path in adapters.items() if method != "decoupled"}
        loaded["decoupled"] = decoupled_as_nested(adapters["decoupled"], clip)
        loaded["decoupled_gated"] = loaded["decoupled"]
        log(f"seed {seed}: identity against prompt")
        report["seeds"][seed] = {
            "identity_against_prompt": identity_against_prompt(generate, loaded, identities, held_out, seed, options, log),
            "delayed_conditioning": delayed_conditioning(generate, loaded, identities, held_out, seed, options),
            "two_subjects": two_subjects(generate, loaded, identities, held_out, seed)}
        _write(options.output / "results.json", report)
    report["summary"] = summarise(report["seeds"])
    report["minutes"] = (time.perf_counter() - started) / 60
    _write(options.output / "results.json", report)
    with written_beside(options.output / "report.md") as partial:
        partial.write_text(markdown_report(report))
    from .plot import identity_prompt_plot
    identity_prompt_plot(report["summary"]["identity_against_prompt"], options.output / "identity_vs_prompt.png")
    log(f"done in {report['minutes']:.1f} min: {options.output / 'report.md'}")
    return report


def prior_scores(generate: Generator, identities: list, held_out: list) -> dict:
    """The base model alone on every scene (seed 0's noise): how well it obeys the prompt."""
    rows = [single_scores(generate.sample(generate.model, generate.prompt(world.caption(SUBJECT_WORD, scene)), 7 + number),
                          identities, held_out[0], scene, held_out[0])
            for number, scene in enumerate(world.scenes())]
    return mean_rows(rows)


def decoupled_as_nested(path: Path, clip):
    """Method (b)'s IP-Adapter Plus file as the pack's loader makes it a nested adapter (gated use; also the parts the
    ungated baseline reads)."""
    from ..encoders.ipadapter_plus import load_ip_adapter_plus
    from ..nodes.nested_adapter_nodes import ready, word_embeddings
    from ..nodes.nested_import_nodes import with_prompt_word
    return ready(with_prompt_word(load_ip_adapter_plus(path, SUBJECT_WORD, word_embeddings(clip, SUBJECT_WORD)),
                                  SUBJECT_WORD))[0]


def summarise(per_seed: dict) -> dict:
    """Each measure's mean and 95% interval over the seeds."""
    summary = {}
    for part in ("identity_against_prompt", "delayed_conditioning", "two_subjects"):
        settings = per_seed[next(iter(per_seed))][part]
        summary[part] = {}
        for name, first in settings.items():
            summary[part][name] = {key: (interval([per_seed[seed][part][name][key] for seed in per_seed])
                                         if isinstance(value, float) and key not in ("strength", "start_percent") else value)
                                   for key, value in first.items()}
    return summary


def markdown_report(report: dict) -> str:
    summary, options = report["summary"], report["options"]
    lines = [f"# Study results ({'smoke run: findings meaningless' if options['smoke'] else 'full run'})", "",
             f"Seeds {options['seeds']} (training and sampling), held-out identities {options['held_out']}, "
             f"{options['images_per_condition']} images per condition, {options['sampler_steps']} sampler steps, "
             f"{report['minutes']:.1f} min.", "",
             "Prior (no adapter): " + ", ".join(f"{key} {report['prior'][key]:.2f}" for key in ("background", "side", "ball")),
             "", f"Image encoder, nearest reference photo of the same held-out identity: "
                 f"{report['image_encoder']['accuracy']:.2f} (chance {report['image_encoder']['chance']:.2f}).",
             "", "## Identity against prompt adherence", "",
             "| method | knob | strength | identity | prompt | background | position | ball | matches reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in summary["identity_against_prompt"].values():
        lines.append(f"| {entry['method']} | {entry['knob'] or '-'} | {entry['strength'] or '-'} | {shown(entry['identity'])} "
                     f"| {shown(entry['prompt'])} | {shown(entry['background'])} | {shown(entry['side'])} "
                     f"| {shown(entry['ball'])} | {shown(entry['reference_identity'])} |")
    lines += ["", "## Two subjects in one image", "", "| method | masks | identity in place | blended |", "|---|---|---|---|"]
    for entry in summary["two_subjects"].values():
        lines.append(f"| {entry['method']} | {'yes' if entry['masks'] else 'no'} | {shown(entry['identity_in_place'])} "
                     f"| {shown(entry['blended'])} |")
    lines += ["", "## Delayed subject conditioning (nested, token weight 1)", "", "| start_percent | identity | prompt |",
              "|---|---|---|"]
    for entry in summary["delayed_conditioning"].values():
        lines.append(f"| {entry['start_percent']} | {shown(entry['identity'])} | {shown(entry['prompt'])} |")
    return "\n".join(lines) + "\n"


def _write(path: Path, value: dict) -> None:
    """JSON written beside its target and renamed into place."""
    with written_beside(path) as partial:
        partial.write_text(json.dumps(value, indent=1, default=str))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="study_run", help="folder for the caches and the results (default study_run)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (training and sampling)")
    parser.add_argument("--held-out", default="12,13,14,15", help="comma-separated identity numbers never trained on")
    parser.add_argument("--base-steps", type=int, default=BaseRecipe.steps, help="the base model's training steps")
    parser.add_argument("--base-batch-size", type=int, default=BaseRecipe.batch_size)
    parser.add_argument("--adapter-steps", type=int, default=StudyOptions.adapter_steps)
    parser.add_argument("--cfg", type=float, default=StudyOptions.cfg, help="the sampler's guidance scale, every image")
    parser.add_argument("--sampler-steps", type=int, default=StudyOptions.sampler_steps)
    parser.add_argument("--smoke", action="store_true", help="every stage, a few steps each (CI); findings meaningless")
    parser.add_argument("--comfyui", help="the ComfyUI checkout (default: $COMFYUI_PATH)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.smoke:
        options = smoke_options(output)
    else:
        options = StudyOptions(output, seeds=tuple(int(s) for s in args.seeds.split(",")),
                               held_out=tuple(int(s) for s in args.held_out.split(",")),
                               base=BaseRecipe(steps=args.base_steps, batch_size=args.base_batch_size),
                               adapter_steps=args.adapter_steps, cfg=args.cfg, sampler_steps=args.sampler_steps)
    return run(options)
