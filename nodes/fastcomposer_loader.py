"""Load FastComposer: the official checkpoint as ComfyUI's own MODEL, CLIP, VAE and CLIP_VISION, plus the fusion module."""
import torch

import comfy.clip_vision
import comfy.sd
import comfy.utils
import folder_paths

from ..encoders.checkpoint_io import UnreadableFile, read_state_dict
from ..encoders.fastcomposer_checkpoint import FASTCOMPOSER_FIX, split_fastcomposer
from ..encoders.fastcomposer_fusion import FastComposerFusion
from .naming import FASTCOMPOSER_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .subject_regions import guard_subject_masks



def load_fastcomposer(path: str):
    """Build each part from views of one state dict, dropping each part as soon as it is loaded."""
    progress = comfy.utils.ProgressBar(5)
    parts = split_fastcomposer(read_state_dict(path, FASTCOMPOSER_FIX), name=path)

    model = comfy.sd.load_diffusion_model_state_dict(parts.unet)
    if model is None:
        raise UnreadableFile(path, "ComfyUI did not recognise its UNet as SD1.5", FASTCOMPOSER_FIX)
    parts.unet = None
    guard_subject_masks(model)  # a masked subject sampled without 'Apply Subject Masks' is refused, not ignored
    progress.update(1)

    # The release's text tower has no projection; identity makes ComfyUI's pooled output the reference's
    # pooler_output instead of leaving an uninitialised weight.
    width = parts.text_encoder["text_model.final_layer_norm.weight"].shape[0]
    parts.text_encoder["text_projection.weight"] = torch.eye(width)
    clip = comfy.sd.load_text_encoder_state_dicts([parts.text_encoder], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  embedding_directory=folder_paths.get_folder_paths("embeddings"))
    parts.text_encoder = None
    progress.update(1)

    vae = comfy.sd.VAE(sd=parts.vae)
    vae.throw_exception_if_invalid()
    parts.vae = None
    progress.update(1)

    clip_vision = comfy.clip_vision.load_clipvision_from_sd(parts.vision)
    if clip_vision is None:
        raise UnreadableFile(path, "ComfyUI did not recognise its image encoder as a CLIP vision tower", FASTCOMPOSER_FIX)
    parts.vision = None
    progress.update(1)

    fusion = FastComposerFusion()
    fusion.load_state_dict({key: tensor.float() for key, tensor in parts.fusion.items()})
    fusion.eval().requires_grad_(False)
    progress.update(1)
    return model, clip, vae, clip_vision, fusion


class FastComposerLoader:
    DESCRIPTION = ("Loads the official FastComposer checkpoint (pytorch_model.bin, or its .safetensors conversion) from "
                   "models/fastcomposer. Gives the fine-tuned SD1.5 UNet, text encoder, VAE and CLIP vision tower as "
                   "ordinary ComfyUI models, and the fusion module for 'FastComposer Encode'.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "fastcomposer", "loader", "multi-subject"]
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CLIP_VISION", "FASTCOMPOSER")
    RETURN_NAMES = ("model", "clip", "vae", "clip_vision", "fastcomposer")
    OUTPUT_TOOLTIPS = (
        "The fine-tuned SD1.5 UNet: sample with it.",
        "The fine-tuned text encoder: use it for the negative prompt too.",
        "The SD1.5 VAE.",
        "The fine-tuned CLIP ViT-L/14 vision tower that embeds subject images.",
        "The fusion module that writes subject embeddings into subject words.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (folder_paths.get_filename_list("fastcomposer"), {
                "tooltip": "The file from models/fastcomposer. A .bin is read with weights-only unpickling; "
                           "convert it once to .safetensors to load faster."}),
        }}

    def load(self, checkpoint: str):
        return load_fastcomposer(folder_paths.get_full_path_or_raise("fastcomposer", checkpoint))


NODE_CLASS_MAPPINGS = {"FastComposerLoader": FastComposerLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"FastComposerLoader": "Load FastComposer"}
