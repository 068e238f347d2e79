"""Regional subject masks as nodes: draw a box mask, and apply subject masks to a MODEL (FastComposer lists).

A FastComposer subject's mask acts only in a MODEL patched by 'Apply Subject Masks'. So that a mask never does nothing
in silence, the MODEL of 'Load FastComposer' carries a check made when sampling starts (`guard_subject_masks`): a
positive conditioning with a masked FastComposer subject that the sampled MODEL does not apply is refused, before the
first step. Nested Attention subjects are not concerned: 'Apply Nested Attention' applies their masks itself.
"""
import comfy.patcher_extension
import torch

from ..attention.subject_masks import region_mask
from .input_checks import checked_inputs
from .naming import COMPOSITION_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .subject_patch import PATCH_KEY, PatchedSubject, add_subject_patch
from .subjects import BINDINGS_KEY, bindings_of

MASK_GUARD_KEY = "subject_personalization_mask_guard"  # the OUTER_SAMPLE wrapper of guard_subject_masks


def guard_subject_masks(model) -> None:
    """Install on `model` (in place: the loader's own new MODEL) the check `refuse_unapplied_masks`."""
    comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, MASK_GUARD_KEY,
                                                 refuse_unapplied_masks, model.model_options, is_model_options=True)


def refuse_unapplied_masks(executor, noise: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Once per sampling run, before the first step: refuse positive conditionings whose masked FastComposer subjects
    the sampled MODEL does not apply."""
    guider = executor.class_obj
    conds = getattr(guider, "conds", None) or {}  # every guider of ComfyUI's has them; another pack's may not
    patch = getattr(guider, "model_options", {}).get("transformer_options", {}).get(PATCH_KEY)
    applied = {id(patched.source) for patched in patch.all_subjects() if patched.mask is not None} if patch else set()
    unapplied = {}  # by identity, in order
    for cond in conds.get("positive", ()):
        for subject, _ in cond.get(BINDINGS_KEY, ()):
            if subject.mask is not None and subject.adapter is None and id(subject) not in applied:
                unapplied[id(subject)] = subject
    if unapplied:
        words = ", ".join(f"'{subject.word}'" for subject in unapplied.values())
        what, it = ("masks of subjects", "them") if len(unapplied) > 1 else ("mask of subject", "it")
        raise ValueError(f"the {what} {words} would do nothing: the MODEL this sampler uses does not apply {it} (a "
                         f"FastComposer subject's mask acts only through 'Apply Subject Masks'). Pass the MODEL "
                         f"through 'Apply Subject Masks', given this sampler's positive conditioning, on its way to "
                         f"the sampler; or disconnect the mask from 'Add Subject'")
    return executor(noise, *args, **kwargs)


class SubjectRegionMask:
    DESCRIPTION = ("A rectangular MASK for a subject's region, given as fractions of the image (0 = left/top edge, "
                   "1 = right/bottom edge). Use the size of the image you generate, or any size of the same shape.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "region", "mask", "layout"]
    FUNCTION = "mask"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("The region: 1 inside the rectangle, 0 outside; connect it to a subject's mask input.",)

    @classmethod
    def INPUT_TYPES(cls):
        side = {"default": 512, "min": 8, "max": 8192, "step": 8}
        fraction = lambda default, tip: ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tip})
        return {"required": {
            "width": ("INT", {**side, "tooltip": "Mask width in pixels, 8 to 8192: the generated image's width (or "
                                                 "that of any size with its aspect ratio)."}),
            "height": ("INT", {**side, "tooltip": "Mask height in pixels, 8 to 8192: the generated image's height (or "
                                                  "that of any size with its aspect ratio)."}),
            "left": fraction(0.0, "Left edge of the region as a fraction of the width, 0 to 1 (0 = the image's left edge)."),
            "top": fraction(0.0, "Top edge of the region as a fraction of the height, 0 to 1 (0 = the image's top edge)."),
            "right": fraction(0.5, "Right edge of the region as a fraction of the width, 0 to 1 (1 = the image's right "
                                   "edge); above left."),
            "bottom": fraction(1.0, "Bottom edge of the region as a fraction of the height, 0 to 1 (1 = the image's "
                                    "bottom edge); above top."),
        }}

    @checked_inputs(("left", "right"), ("top", "bottom"))
    def mask(self, width, height, left, top, right, bottom):
        return (region_mask(height, width, left, top, right, bottom)[None],)


class ApplySubjectMasks:
    DESCRIPTION = ("Patches a copy of the MODEL so that each subject's word is attended only inside that subject's "
                   "mask (from 'Add Subject'), at every cross-attention layer: the way to place several FastComposer "
                   "subjects without their identities blending. Nested Attention subjects need not pass through here: "
                   "'Apply Nested Attention' applies their masks itself. Subjects without a mask are untouched.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "regional", "mask", "layout", "multi-subject"]
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched copy of the model in which each subject's word is attended only inside its mask: "
                       "connect it to the sampler (or to 'Record Subject Attention').",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model you sample with; it is cloned, never changed."}),
            "positive": ("CONDITIONING", {"tooltip": "The subject encode node's output (also the sampler's positive)."}),
        }}

    def apply(self, model, positive):
        bindings = bindings_of(positive)
        if not bindings:
            raise ValueError("this conditioning binds no subject: connect the output of 'FastComposer Encode' "
                             "(with a subject list) or 'Nested Attention Encode'")
        masked = [PatchedSubject(signature, subject, mask=subject.mask) for subject, signature in bindings
                  if subject.mask is not None and subject.adapter is None]
        if not masked and not any(subject.mask is not None for subject, _ in bindings):
            raise ValueError("no subject in this conditioning has a mask: connect a MASK to 'Add Subject'")
        return (add_subject_patch(model, masked) if masked else model,)


NODE_CLASS_MAPPINGS = {"SubjectRegionMask": SubjectRegionMask, "ApplySubjectMasks": ApplySubjectMasks}
NODE_DISPLAY_NAME_MAPPINGS = {"SubjectRegionMask": "Subject Region Mask", "ApplySubjectMasks": "Apply Subject Masks"}
