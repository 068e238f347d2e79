"""Validation images during training, rendered through the same nodes and patch that inference uses."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..encoders.kill_safe import kill_point, written_beside
from ..nodes.nested_apply import ApplyNestedAttention
from ..nodes.nested_encode import NestedAttentionEncode
from ..nodes.nested_subject import NestedAttentionSubject
from .dataset import read_image, square_resize


def empty_prompt(clip) -> list:
    """The unconditional (negative) conditioning: the empty prompt."""
    empty, empty_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    return [[empty, {"pooled_output": empty_pooled}]]


@torch.no_grad()
def reference_subjects(adapter, clip_vision, reference: torch.Tensor, word: str) -> list:
    """A SUBJECTS list holding the subject in `reference` (1, H, W, 3) bound to `word`: Nested Attention Subject."""
    return NestedAttentionSubject().encode(adapter, clip_vision, reference, word, 1.0, 0.0, 1.0)[0]


@torch.no_grad()
def generate_latent(base, subjects: list, prompt: str, negative: list, side: int, seed: int, steps: int,
                    cfg: float = 5.0) -> torch.Tensor:
    """Sample one latent (1, C, side, side) with these subjects:
    Nested Attention Encode -> Apply Nested Attention -> ComfyUI's sampler."""
    import comfy.sample
    (positive,) = NestedAttentionEncode().encode(base.clip, subjects, prompt)
    (model,) = ApplyNestedAttention().apply(base.model, positive, 1.0, 0.0, 1.0)
    latent = torch.zeros(1, base.model.model.latent_format.latent_channels, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               seed=seed, disable_pbar=True)


@torch.no_grad()
def render_validation(trainer) -> Path:
    """One row per validation item: the reference, then the generated image; saved as validation/step_N.png."""
    config, base = trainer.config, trainer.base
    adapter = trainer.inference_adapter()
    was_training = adapter.training
    adapter.eval()
    negative = empty_prompt(base.clip)
    rows = []
    try:
        for number, item in enumerate(config.validation):
            reference = read_image(Path(config.data) / item["reference"])[None]
            subjects = reference_subjects(adapter, base.clip_vision, reference, item["word"])
            samples = generate_latent(base, subjects, item["prompt"], negative, config.resolution // 8,
                                      config.seed + number, config.validation_steps)
            image = base.vae.decode(samples)[0].float().cpu()
            rows.append(torch.cat([square_resize(reference[0], image.shape[0]), image], dim=1))
    finally:
        adapter.train(was_training)
    grid = torch.cat(rows, dim=0).clamp(0, 1)
    path = Path(config.output) / "validation" / f"step_{trainer.step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    kill_point(f"validation@{trainer.step}")
    with written_beside(path) as partial:
        Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(partial, format="PNG")
    return path
