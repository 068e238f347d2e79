"""Nested Attention Subject: photos of one subject -> its encoder tokens, appended to a SUBJECTS list."""
from dataclasses import replace

import comfy.model_management
import torch
from comfy.clip_model import clip_preprocess

from ..encoders.nested_adapter import CLIP_VISION
from .input_checks import checked_inputs
from .naming import NESTED_ATTENTION_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .nested_adapter_nodes import HIDDEN_STATE_INDEX
from .subjects import MASK_INPUTS, SUBJECT_INPUTS, append_subject, checked_subject, with_mask

CLIP_VISION_OUTPUTS = {"penultimate": "penultimate_hidden_states", "last": "last_hidden_state"}
ADAPTERS_OWN = "adapter's own"
TOKEN_WEIGHT_SOURCE_INPUT = ([ADAPTERS_OWN, "token_weight below"], {
    "default": ADAPTERS_OWN,
    "tooltip": "Where the weight on the subject word's attention comes from: the adapter file's own "
               "(special_token_weight: 1.0 for IP-Adapter files and this pack's adapters), or token_weight below."})
TOKEN_WEIGHT_INPUT = ("FLOAT", {"default": 1.0, "min": 0.05, "max": 10.0, "step": 0.05,
                                "tooltip": "Used when token_weight_source is 'token_weight below'. Weight on the subject "
                                           "word's attention, 0.05 to 10: it multiplies the word's attention in every "
                                           "cross-attention layer before the attention is renormalised (above 1 the "
                                           "image comes in more, below 1 less; 1 leaves it)."})


@torch.no_grad()  # the executor runs nodes under inference_mode; direct callers (scripts, tests) must not build graphs
def encode_subject_tokens(adapter, clip_vision, images: torch.Tensor) -> torch.Tensor:
    """(n, H, W, C) photos of one subject -> the adapter's encoder tokens (1, M, D), averaged over the photos."""
    hidden = vision_hidden_states(clip_vision, images, adapter.vision_hidden_state, len(adapter.vision_layers))
    if hidden.shape[-1] != adapter.vision_width:
        got = CLIP_VISION.get(hidden.shape[-1], "an unknown CLIP vision model")
        raise ValueError(f"adapter {adapter.name} expects {CLIP_VISION[adapter.vision_width]} tokens "
                         f"({adapter.vision_width} wide) but this CLIP_VISION gives {hidden.shape[-1]}-wide tokens "
                         f"({got}): load the matching CLIP vision model")
    parameter = next(adapter.parameters())
    return adapter.subject_tokens(hidden.to(parameter)[None]).float().cpu()


def vision_hidden_states(clip_vision, images: torch.Tensor, hidden_state: str, layers_before: int = 0) -> torch.Tensor:
    """ComfyUI's CLIP vision hidden state `hidden_state` ("penultimate" | "last") of the photos, or the one
    `layers_before` layers earlier (the input of an adapter's own copies of the layers in between)."""
    if layers_before == 0:
        return clip_vision.encode_image(images)[CLIP_VISION_OUTPUTS[hidden_state]]
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    pixels = clip_preprocess(images.to(clip_vision.load_device), size=clip_vision.image_size, mean=clip_vision.image_mean,
                             std=clip_vision.image_std, crop=True).float()
    layer = HIDDEN_STATE_INDEX[hidden_state] - layers_before
    return clip_vision.model(pixel_values=pixels, intermediate_output=layer)[1].to(
        comfy.model_management.intermediate_device())


class NestedAttentionSubject:
    DESCRIPTION = ("Encodes photos of one subject (a person, a pet, an object) with a Nested Attention adapter and adds "
                   "it to a subject list. The subject binds to its word in the prompt of 'Nested Attention Encode'. "
                   "Chain several of these (each may use its own adapter) for several subjects.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "nested attention", "reference image", "face", "ip-adapter"]
    FUNCTION = "encode"
    RETURN_TYPES = ("SUBJECTS",)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("The subject list with this subject appended: chain the next subject's node, or connect it to "
                       "'Nested Attention Encode'.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "nested_adapter": ("NESTED_ADAPTER", {"tooltip": "The adapter that encodes this subject's photos (from "
                                                                 "a Nested Attention loader); each subject may have "
                                                                 "its own."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter was trained with."}),
                "image": ("IMAGE", {"tooltip": "One or more photos of the subject; their encodings are averaged."}),
                **SUBJECT_INPUTS,
            },
            "optional": {**MASK_INPUTS, "token_weight_source": TOKEN_WEIGHT_SOURCE_INPUT,
                         "token_weight": TOKEN_WEIGHT_INPUT},
        }

    @checked_inputs(("start_percent", "end_percent"))
    def encode(self, nested_adapter, clip_vision, image, word, weight, start_percent, end_percent, subjects=None,
               mask=None, mask_feather=0, token_weight_source=ADAPTERS_OWN, token_weight=1.0):
        subject = checked_subject(word, image, weight, start_percent, end_percent)
        subject = replace(subject, adapter=nested_adapter, tokens=encode_subject_tokens(nested_adapter, clip_vision, image),
                          token_weight=None if token_weight_source == ADAPTERS_OWN else token_weight)
        return (append_subject(subjects, with_mask(subject, mask, mask_feather)),)


NODE_CLASS_MAPPINGS = {"NestedAttentionSubject": NestedAttentionSubject}
NODE_DISPLAY_NAME_MAPPINGS = {"NestedAttentionSubject": "Nested Attention Subject"}
