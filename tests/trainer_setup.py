"""A tiny training world for the trainer tests: an SD1.5-layout UNet at 1/10 width and procedural subjects."""
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 64
SUBJECTS = {"red disc": (220, 40, 40), "green square": (40, 200, 60), "blue cross": (40, 80, 230)}
VIEWS = 4
NAMES = {"red disc": "apple", "green square": "box", "blue cross": "star"}  # one-token words the base model learns
# The seeded random VAE makes latents of standard deviation ~0.67; this scale brings them to ~1 in the UNet's space,
# the job SD1.5's 0.18215 does for its real VAE.
LATENT_SCALE = 1.5


def tiny_unet_config(full_model) -> dict:
    """ComfyUI's SD1.5 UNet layout (every attn2 layer where SD1.5 has one) at 32 channels instead of 320."""
    return {**full_model.model.model_config.unet_config, "model_channels": 32}


@torch.no_grad()
def tiny_sd15_model(unet_config: dict, seed: int = 0, state_dict: dict | None = None):
    """An SD1.5-class ComfyUI MODEL of that layout: seeded random weights, or the given ones."""
    import comfy.latent_formats
    import comfy.model_patcher
    import comfy.supported_models
    unet = comfy.supported_models.SD15(unet_config).get_model({}, "")
    unet.latent_format = comfy.latent_formats.SD15(scale_factor=LATENT_SCALE)
    if state_dict is not None:
        unet.load_state_dict(state_dict)
    else:
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in unet.named_parameters():
            if parameter.ndim <= 1:
                parameter.copy_(torch.ones(parameter.shape) if "norm" in name else
                                torch.randn(parameter.shape, generator=generator) * 0.02)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter[0].numel()))
    return comfy.model_patcher.ModelPatcher(unet, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _draw(shape: str, colour, centre, radius, rng) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    dy, dx = (y - centre[0]) / radius, (x - centre[1]) / radius
    inside = {"red disc": dy ** 2 + dx ** 2 <= 1, "green square": (abs(dy) <= 0.8) & (abs(dx) <= 0.8),
              "blue cross": ((abs(dy) <= 0.3) & (abs(dx) <= 1)) | ((abs(dx) <= 0.3) & (abs(dy) <= 1))}[shape]
    background = 110 + rng.integers(-20, 20, size=(SIZE, SIZE, 1)) + np.zeros((1, 1, 3))
    image = np.where(inside[..., None], np.array(colour)[None, None], background).astype(np.uint8)
    return image, (inside * 255).astype(np.uint8)


def write_dataset(folder: Path, seed: int = 0) -> dict[str, list[int]]:
    """Procedural subjects, several views each, as a training folder; returns each subject's example indices."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "references"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    lines, indices = [], {name: [] for name in SUBJECTS}
    for number, (name, colour) in enumerate(SUBJECTS.items()):
        for view in range(VIEWS):
            image, mask = _draw(name, colour, rng.uniform(20, 44, 2), rng.uniform(12, 18), rng)
            reference, _ = _draw(name, colour, (32, 32), 20, rng)
            stem = f"{number}_{view}"
            Image.fromarray(image).save(folder / "images" / f"{stem}.png")
            Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")
            Image.fromarray(reference).save(folder / "references" / f"{stem}.png")
            subject = {"word": "toy", "mask": f"masks/{stem}.png"}
            if view != VIEWS - 1:  # the last view's reference is cut from the image itself (subject preparation)
                subject["references"] = [f"references/{stem}.png"]
            indices[name].append(len(lines))
            lines.append({"image": f"images/{stem}.png", "caption": "a photo of a toy on a table", "subjects": [subject]})
    # Two subjects in one picture, each with its word.
    left, left_mask = _draw("red disc", SUBJECTS["red disc"], (32, 16), 12, rng)
    right, right_mask = _draw("blue cross", SUBJECTS["blue cross"], (32, 48), 12, rng)
    pair = np.where(left_mask[..., None] > 0, left, right)
    Image.fromarray(pair).save(folder / "images" / "pair.png")
    Image.fromarray(left_mask).save(folder / "masks" / "pair_left.png")
    Image.fromarray(right_mask).save(folder / "masks" / "pair_right.png")
    lines.append({"image": "images/pair.png", "caption": "a toy next to a ball",
                  "subjects": [{"word": "toy", "references": ["references/0_0.png"], "mask": "masks/pair_left.png"},
                               {"word": "ball", "references": ["references/2_0.png"], "mask": "masks/pair_right.png"}]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return indices


def pretrain_base(model, clip, latents_by_subject: dict[str, list[torch.Tensor]], steps: int, seed: int = 0) -> None:
    """Teach the tiny UNet the toys by name ("a photo of an apple on a table"...), as a real base model knows words;
    the adapter then has to bring a toy's identity through the subject token instead of its name.
    Full-batch Adam on every (VAE latent, caption) pair."""
    from subject_personalization.train.objective import noised, prediction_target
    contexts = {name: clip.encode_from_tokens(clip.tokenize(f"a photo of a {NAMES[name]} on a table"))[0].float()
                for name in latents_by_subject}
    pairs = [(latent, contexts[name]) for name, latents in latents_by_subject.items() for latent in latents]
    unet, sampling = model.model.diffusion_model, model.model.model_sampling
    latent = model.model.process_latent_in(torch.stack([pair[0] for pair in pairs]))
    context = torch.stack([pair[1] for pair in pairs])
    unet.requires_grad_(True)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sigma, noisy = noised(sampling, latent, generator)
        output = unet(sampling.calculate_input(sigma.reshape(-1, 1, 1, 1), noisy), sampling.timestep(sigma), context=context)
        loss = (output - prediction_target(sampling, sigma, latent, noisy)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.requires_grad_(False)
