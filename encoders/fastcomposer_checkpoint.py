"""The official FastComposer checkpoint: its layout, its split into standard parts, and a safetensors copy.

The released `pytorch_model.bin` is the state dict of the whole training module (docs/methods.md §1). This
module only renames keys into the layouts ComfyUI's own loaders read (diffusers UNet and VAE, HF CLIP
text and vision towers); it copies no tensor.

Conversion, so the pickle is read only once (run from the pack's folder):
    python -m encoders.fastcomposer_checkpoint pytorch_model.bin fastcomposer.safetensors
"""
import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_io import read_state_dict
from .kill_safe import written_beside

FASTCOMPOSER_FIX = ("download pytorch_model.bin again from the Hugging Face repository mit-han-lab/fastcomposer into "
                    "models/fastcomposer (a .safetensors copy is made with python -m encoders.fastcomposer_checkpoint)")
PREFIXES = {
    "unet": "unet.",
    "text_encoder": "text_encoder.",
    "vae": "vae.",
    "vision": "image_encoder.",
    "fusion": "postfuse_module.",
}

# A few keys whose presence and shape identify the official file (SD1.5 UNet, CLIP-L text, ViT-L/14 vision).
SIGNATURE = {
    "unet.conv_in.weight": (320, 4, 3, 3),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "text_encoder.embeddings.token_embedding.weight": (49408, 768),
    "image_encoder.vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
    "image_encoder.visual_projection.weight": (768, 1024),
    "vae.decoder.conv_out.weight": (3, 128, 3, 3),
    "postfuse_module.mlp1.fc1.weight": (768, 1536),
}


@dataclass
class FastComposerParts:
    unet: dict[str, torch.Tensor]          # diffusers UNet2DConditionModel keys
    text_encoder: dict[str, torch.Tensor]  # HF CLIPTextModel keys (`text_model.` ...)
    vae: dict[str, torch.Tensor]           # diffusers AutoencoderKL keys (old attention names kept)
    vision: dict[str, torch.Tensor]        # HF CLIPVisionModelWithProjection keys
    fusion: dict[str, torch.Tensor]        # FastComposerFusion keys


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    prefixes = sorted({key.split(".", 1)[0] for key in state_dict})
    return f"{len(state_dict)} tensors with top-level prefixes {', '.join(prefixes[:8])}"


def check_fastcomposer(state_dict: dict[str, torch.Tensor], name: str = "this file") -> None:
    """Raise a ValueError that says what was found when the dict is not the official FastComposer layout."""
    if any(key.startswith("model.diffusion_model.") for key in state_dict):
        raise ValueError(f"{name} is an ordinary Stable Diffusion checkpoint, not FastComposer: load it with "
                         f"'Load Checkpoint', and put FastComposer's pytorch_model.bin in models/fastcomposer")
    problems = []
    for key, shape in SIGNATURE.items():
        if key not in state_dict:
            problems.append(f"missing {key}")
        elif tuple(state_dict[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(state_dict[key].shape)}, expected {shape}")
    if problems:
        raise ValueError(f"{name} is not a FastComposer checkpoint (SD1.5 + CLIP ViT-L/14 + postfuse module): "
                         f"{'; '.join(problems[:3])}. Found {describe_state_dict(state_dict)}; {FASTCOMPOSER_FIX}")


def split_fastcomposer(state_dict: dict[str, torch.Tensor], name: str = "this file") -> FastComposerParts:
    """Split the official state dict into standard layouts; position_ids buffers are dropped (they are constants)."""
    check_fastcomposer(state_dict, name)
    parts = {part: {} for part in PREFIXES}
    for key, tensor in state_dict.items():
        part = next((p for p, prefix in PREFIXES.items() if key.startswith(prefix)), None)
        if part is None:
            raise ValueError(f"{name}: unexpected key {key}; expected only prefixes {', '.join(PREFIXES.values())}")
        if key.endswith("embeddings.position_ids"):
            continue
        local_key = key[len(PREFIXES[part]):]
        if part == "text_encoder":
            local_key = "text_model." + local_key
        parts[part][local_key] = tensor
    return FastComposerParts(**parts)


def convert_to_safetensors(source: str | Path, destination: str | Path) -> Path:
    """Write the same content as one .safetensors file (identical keys, shapes, dtypes and values)."""
    source, destination = Path(source), Path(destination)
    if destination.suffix != ".safetensors":
        raise ValueError(f"the destination must end in .safetensors, got {destination.name}")
    state_dict = read_state_dict(source, FASTCOMPOSER_FIX)
    check_fastcomposer(state_dict, source.name)
    with written_beside(destination) as partial:
        save_file(unshared(state_dict), partial, metadata={"format": "fastcomposer", "converted_from": source.name})
    return destination


def unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores every tensor on its own: a tensor on a storage an earlier one uses (tied weights, views that
    torch.save kept shared) is copied, every other one only made contiguous."""
    storages, tensors = set(), {}
    for key, tensor in state_dict.items():
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone(memory_format=torch.contiguous_format) if storage in storages else tensor.contiguous()
        storages.add(storage)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert FastComposer's pytorch_model.bin into one .safetensors file.")
    parser.add_argument("source", help="the official pytorch_model.bin")
    parser.add_argument("destination", nargs="?", help="output .safetensors (default: beside the source)")
    args = parser.parse_args()
    destination = args.destination or str(Path(args.source).with_name("fastcomposer.safetensors"))
    print(f"wrote {convert_to_safetensors(args.source, destination)}")


if __name__ == "__main__":
    main()
