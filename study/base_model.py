"""The study's base model: ComfyUI's SD1.5 UNet layout at 1/10 width, diffusing the world's 16x16 pixels directly.

- UNet: ComfyUI's SD15 model class and layout (every attn2 layer where SD1.5 has one, 768-wide context) at 32
  channels, 3 input/output channels, with ComfyUI's pixel-space latent format (ChromaRadiance's: RGB in [-1, 1]).
- VAE: ComfyUI's own pixel-space conversion VAE (`{"pixel_space_vae": 1.0}`): a latent is the image itself.
- Text encoder: SD1.5's CLIP ViT-L text model, image encoder: CLIP ViT-L/14 vision, both ComfyUI's classes with
  seeded random weights, frozen. Nothing here is trained but the UNet, on the world's captioned images.
Each part is rebuilt exactly from its seed; the trained UNet is cached in the study's folder.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..encoders.kill_safe import written_beside
from . import world

UNET_CONFIG = {"use_checkpoint": False, "image_size": 32, "in_channels": 3, "out_channels": 3, "model_channels": 32,
               "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
               "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
               "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "context_dim": 768,
               "num_heads": 8, "use_linear_in_transformer": False, "use_temporal_attention": False,
               "use_temporal_resblock": False}
SUBJECT_WORD = "toy"
SECOND_WORD = "pet"  # the right-hand subject's word in two-subject images
IMAGE_ENCODER_SIZE = 112  # 7x the world's 16 pixels, a quarter of ViT-L/14's usual tokens: 65 instead of 257


@dataclass(frozen=True)
class BaseRecipe:
    """Everything the base model is rebuilt from."""
    seed: int = 0
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    views_per_scene: int = 2       # training images per (identity, scene)
    text_residual_scale: float = 0.1  # the text encoder's residual branches: see text_encoder

    def name(self) -> str:
        return (f"base_seed{self.seed}_steps{self.steps}_batch{self.batch_size}_lr{self.learning_rate:g}"
                f"_views{self.views_per_scene}_text{self.text_residual_scale:g}")


def _seeded_(module: torch.nn.Module, seed: int, residual_scale: float = 1.0) -> None:
    """Fill every parameter from one seed: norms ~1, biases and vectors ~0.02, weights ~ 1/sqrt(fan-in), and the
    transformer's residual-branch outputs (`out_proj`, `fc2`) times `residual_scale`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim <= 1:
                values = 1.0 + 0.05 * values if "norm" in name or "ln" in name else 0.02 * values
            elif "embedding" in name:
                values = values * 0.5  # token and position embeddings: distinct words stay distinct through the layers
            else:
                values = values / math.sqrt(parameter[0].numel())
                if name.endswith(("out_proj.weight", "fc2.weight")):
                    values = values * residual_scale
            parameter.copy_(values.to(parameter.dtype))


def text_encoder(residual_scale: float, seed: int = 1):
    """SD1.5's CLIP text encoder (ComfyUI's CLIP object) with seeded random weights.

    At full scale twelve random layers wash the words out: two captions that differ in one word came out at cosine
    0.996, the word's own token 5.5 apart in norm 39, and a base model trained 400 steps on them followed its prompt's
    background in 34% of images (chance 25%). Residual branches at 0.1 keep each word's token 24 apart."""
    import comfy.sd
    import comfy.supported_models
    clip = comfy.sd.CLIP(target=comfy.supported_models.SD15(UNET_CONFIG).clip_target(),
                         model_options={"dtype": torch.float32})
    _seeded_(clip.cond_stage_model, seed, residual_scale)
    clip.cond_stage_model.requires_grad_(False)  # frozen: no call outside ComfyUI's executor builds a graph through it
    return clip


def image_encoder(seed: int = 2):
    """CLIP ViT-L/14 vision (ComfyUI's ClipVisionModel, its own config) with seeded random weights, at 112 pixels."""
    import comfy.clip_vision
    config = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json").read_text())
    config["image_size"] = IMAGE_ENCODER_SIZE
    clip_vision = comfy.clip_vision.ClipVisionModel(config)
    _seeded_(clip_vision.model, seed)
    clip_vision.model.requires_grad_(False)  # frozen, as the text encoder
    return clip_vision


def pixel_vae():
    """ComfyUI's pixel-space VAE: encode maps RGB in [0, 1] to latents in [-1, 1], decode back."""
    import comfy.sd
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def unet(seed: int, state_dict: dict | None = None):
    """The SD1.5-layout UNet as a ComfyUI MODEL: seeded random weights, or the given ones."""
    import comfy.latent_formats
    import comfy.model_patcher
    import comfy.supported_models
    model = comfy.supported_models.SD15(UNET_CONFIG).get_model({}, "")
    model.latent_format = comfy.latent_formats.ChromaRadiance()
    if state_dict is None:
        _seeded_(model.diffusion_model, seed)
    else:
        model.diffusion_model.load_state_dict(state_dict)
    model.diffusion_model.float().requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def training_images(identities: list, recipe: BaseRecipe) -> tuple[torch.Tensor, list[str]]:
    """Every training identity in every scene and, beside the next identity, on every background ('toy' left, 'pet'
    right), `views_per_scene` views each: images (N, S, S, 3) in [0, 1], captions."""
    rng = np.random.default_rng([recipe.seed, 1])
    images, captions = [], []
    for identity, neighbour in zip(identities, identities[1:] + identities[:1]):
        for _ in range(recipe.views_per_scene):
            for scene in world.scenes():
                images.append(world.draw(identity, scene, rng)[0])
                captions.append(world.caption(SUBJECT_WORD, scene))
            for background in world.BACKGROUNDS:
                images.append(world.draw_pair(identity, neighbour, background, rng)[0])
                captions.append(world.pair_caption(SUBJECT_WORD, SECOND_WORD, background))
    return torch.from_numpy(np.stack(images)).float() / 255, captions


def train_unet(model, clip, vae, images: torch.Tensor, captions: list[str], recipe: BaseRecipe, log) -> list[float]:
    """Minibatch Adam on the denoising loss of ComfyUI's model sampling (the pack's trainer's objective), cosine decay."""
    from ..train.objective import noised, prediction_target
    contexts = {text: clip.encode_from_tokens(clip.tokenize(text)).float() for text in sorted(set(captions))}
    latents = model.model.process_latent_in(vae.encode(images).float())
    context = torch.cat([contexts[text] for text in captions])
    network, sampling = model.model.diffusion_model, model.model.model_sampling
    network.requires_grad_(True).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / recipe.steps)))
    generator, losses = torch.Generator().manual_seed(recipe.seed), []
    for step in range(recipe.steps):
        rows = torch.randint(len(latents), (recipe.batch_size,), generator=generator)
        sigma, noisy = noised(sampling, latents[rows], generator)
        output = network(sampling.calculate_input(sigma.reshape(-1, 1, 1, 1), noisy), sampling.timestep(sigma),
                         context=context[rows])
        loss = (output - prediction_target(sampling, sigma, latents[rows], noisy)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            log(f"  base step {step + 1}/{recipe.steps}: loss {np.mean(losses[-100:]):.4f}")
    network.requires_grad_(False).eval()
    return losses


def base_model(folder: Path, identities: list, recipe: BaseRecipe, clip, vae, log):
    """The trained UNet from the cache, else trained now on `clip`'s captions (the recipe's text encoder) and cached
    (written beside, renamed into place)."""
    import comfy.utils
    import safetensors.torch
    path = folder / f"{recipe.name()}.safetensors"
    if path.is_file():
        log(f"base model: {path} (cached)")
        return unet(recipe.seed, comfy.utils.load_torch_file(str(path)))
    model = unet(recipe.seed)
    log(f"base model: training {recipe.name()} on {len(identities)} identities")
    images, captions = training_images(identities, recipe)
    train_unet(model, clip, vae, images, captions, recipe, log)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.model.diffusion_model.state_dict().items()}
    with written_beside(path) as partial:
        safetensors.torch.save_file(state, str(partial), metadata={"recipe": json.dumps(recipe.__dict__)})
    return model
