"""Validation images during training, rendered through the same nodes and patch that inference uses."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..nodes.nested_apply import ApplyNestedAttention
from ..nodes.nested_encode import NestedAttentionEncode
from ..nodes.nested_subject import NestedAttentionSubject
from .dataset import read_image, square_resize


@torch.no_grad()
def render_validation(trainer) -> Path:
    """One row per validation item: the reference, then the generated image; saved as validation/step_N.png."""
    import comfy.sample
    config, base = trainer.config, trainer.base
    adapter = trainer.inference_adapter()
    was_training = adapter.training
    adapter.eval()
    empty, empty_pooled = base.clip.encode_from_tokens(base.clip.tokenize(""), return_pooled=True)
    negative = [[empty, {"pooled_output": empty_pooled}]]
    rows = []
    try:
        for number, item in enumerate(config.validation):
            reference = read_image(Path(config.data) / item["reference"])[None]
            (subjects,) = NestedAttentionSubject().encode(adapter, base.clip_vision, reference, item["word"], 1.0, 0.0, 1.0)
            (positive,) = NestedAttentionEncode().encode(base.clip, subjects, item["prompt"])
            (model,) = ApplyNestedAttention().apply(base.model, positive, 1.0, 0.0, 1.0)
            side = config.resolution // 8
            latent = torch.zeros(1, base.model.model.latent_format.latent_channels, side, side)
            noise = comfy.sample.prepare_noise(latent, config.seed + number)
            samples = comfy.sample.sample(model, noise, config.validation_steps, 5.0, "euler", "normal", positive,
                                          negative, latent, seed=config.seed + number, disable_pbar=True)
            image = base.vae.decode(samples)[0].float().cpu()
            rows.append(torch.cat([square_resize(reference[0], image.shape[0]), image], dim=1))
    finally:
        adapter.train(was_training)
    grid = torch.cat(rows, dim=0).clamp(0, 1)
    path = Path(config.output) / "validation" / f"step_{trainer.step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(path)
    return path
