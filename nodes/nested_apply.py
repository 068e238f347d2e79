"""Apply Nested Attention: patch every cross-attention layer of a cloned MODEL for the bound subjects."""
import torch

from ..encoders.nested_adapter import check_compatible, check_layers
from ..encoders.unet_layers import CONTEXT_WIDTH
from .base_model import model_cross_attention_layers, model_family
from .input_checks import checked_inputs
from .naming import NESTED_ATTENTION_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .schedule_range import schedule_range_inputs
from .subject_patch import PatchedSubject, add_subject_patch
from .subjects import bindings_of


def patched_subjects(model, conditioning, strength: float, start_percent: float, end_percent: float) -> list[PatchedSubject]:
    family, layers = model_family(model), model_cross_attention_layers(model)
    sampling = model.get_model_object("model_sampling")
    subjects = []
    for subject, signature in bindings_of(conditioning):
        if subject.adapter is None:
            continue
        check_compatible(subject.adapter, family, CONTEXT_WIDTH[family], subject.adapter.vision_width)
        check_layers(subject.adapter, layers)
        with torch.no_grad():  # K~ and V~ depend only on the images: computed once here, not per step
            nested = {key: (keys[0], values[0]) for key, (keys, values)
                      in subject.adapter.projections.project(subject.tokens.to(next(subject.adapter.parameters()))).items()}
        start, end = max(start_percent, subject.start_percent), min(end_percent, subject.end_percent)
        token_weight = subject.adapter.special_token_weight if subject.token_weight is None else subject.token_weight
        subjects.append(PatchedSubject(signature, subject, strength * subject.weight, sampling.percent_to_sigma(start),
                                       sampling.percent_to_sigma(end), nested, subject.mask, token_weight))
    if not subjects:
        raise ValueError("this conditioning binds no Nested Attention subject; connect the output of "
                         "'Nested Attention Encode'")
    return subjects


class ApplyNestedAttention:
    DESCRIPTION = ("Patches a copy of the MODEL so that each subject bound in the positive conditioning gets its "
                   "Nested Attention value in every cross-attention layer (SD1.5: 16, SDXL: 70); a subject's mask "
                   "restricts where its word and nested value act. The negative prompt is never changed; strength 0 "
                   "without masks gives the unpatched model.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "nested attention", "ip-adapter", "ipadapter", "face"]
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched copy of the model: connect it to the sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 or SDXL model you sample with (the one the adapters are for); "
                                           "it is cloned, never changed."}),
            "positive": ("CONDITIONING", {"tooltip": "The output of 'Nested Attention Encode' (also the sampler's positive)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                   "tooltip": "How far each subject's nested value replaces its word's value, 0 to 2: "
                                              "0 gives the base model, 1 replaces it, above 1 extrapolates. Each "
                                              "subject's weight multiplies it."}),
            **schedule_range_inputs("the subjects start acting (each subject's own range applies too)",
                                    "the subjects stop acting"),
        }}

    @checked_inputs(("start_percent", "end_percent"))
    def apply(self, model, positive, strength, start_percent, end_percent):
        return (add_subject_patch(model, patched_subjects(model, positive, strength, start_percent, end_percent)),)


NODE_CLASS_MAPPINGS = {"ApplyNestedAttention": ApplyNestedAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"ApplyNestedAttention": "Apply Nested Attention"}
