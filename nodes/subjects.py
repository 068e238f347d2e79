"""SUBJECTS: the list of personal subjects a graph composes, whichever method renders them.

Each subject carries its reference images, the word of the prompt it binds to, an optional region mask,
its weight and the part of the schedule it acts on. A method adds what it computed from the images
(Nested Attention: the adapter and its encoder tokens). Encode nodes record, in the CONDITIONING they
output, which subject each token state ("signature") belongs to; patch nodes read it back with `bindings_of`.
"""
from dataclasses import dataclass, replace

import torch

from ..attention.subject_masks import as_single_mask, feather_mask
from .input_checks import checked_inputs
from .naming import PACK_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .schedule_range import schedule_range_inputs

BINDINGS_KEY = "subject_bindings"  # in a CONDITIONING's dict: ((Subject, signature), ...)


@dataclass(frozen=True, eq=False)  # compared by identity: one object per subject of the graph
class Subject:
    word: str                              # the prompt word that carries the subject (its last token)
    images: torch.Tensor                   # ComfyUI IMAGE batch: one subject, one or more photos
    mask: torch.Tensor | None = None       # (H, W) in [0, 1], feathered: where the subject may appear; None = anywhere
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    adapter: object | None = None          # NestedAdapter, for Nested Attention
    tokens: torch.Tensor | None = None     # the adapter's encoder output for these images, (1, M, D)
    token_weight: float | None = None      # Nested Attention: weight on the word's attention; None = the adapter's own


def append_subject(subjects: tuple[Subject, ...] | None, subject: Subject) -> tuple[Subject, ...]:
    """Subjects bind in list order; the same word twice binds its first and second occurrence."""
    return tuple(subjects or ()) + (subject,)


def with_mask(subject: Subject, mask: torch.Tensor | None, feather: int = 0) -> Subject:
    return subject if mask is None else replace(subject, mask=feather_mask(as_single_mask(mask), feather))


def checked_subject(word: str, images: torch.Tensor, weight: float, start_percent: float, end_percent: float) -> Subject:
    """A subject from a node's inputs, which `checked_inputs` has checked; the word is checked here."""
    word = word.strip()
    if not word:
        raise ValueError("the subject's word is empty: give the word of the prompt that stands for it, e.g. 'person'")
    return Subject(word, images, None, weight, start_percent, end_percent)


def bindings_of(conditioning) -> list:
    """Every (subject, signature) bound in a CONDITIONING, once each."""
    seen, bindings = set(), []
    for _, options in conditioning:
        for subject, signature in options.get(BINDINGS_KEY, ()):
            if id(signature) not in seen:
                seen.add(id(signature))
                bindings.append((subject, signature))
    return bindings


SUBJECT_INPUTS = {
    "word": ("STRING", {"default": "person", "tooltip": "The prompt word that stands for this subject, e.g. 'man', "
                        "'dog'. Its first occurrence not taken by an earlier subject is bound."}),
    "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                         "tooltip": "How strongly this subject's photos act, 0 to 2: 0 = the word alone, 1 = as "
                                    "trained, above 1 stronger."}),
    **schedule_range_inputs("this subject starts acting", "this subject stops acting"),
}
MASK_INPUTS = {
    "subjects": ("SUBJECTS", {"tooltip": "A subject list to append this subject to."}),
    "mask": ("MASK", {"tooltip": "Where this subject may appear, at the generated image's aspect ratio (white = "
                      "here). Its word is attended only there, at every attention resolution, in a MODEL patched "
                      "by 'Apply Nested Attention' (Nested Attention) or 'Apply Subject Masks' (FastComposer: the "
                      "MODEL of 'Load FastComposer' refuses to sample a mask it does not apply)."}),
    "mask_feather": ("INT", {"default": 0, "min": 0, "max": 256, "step": 1,
                             "tooltip": "Softens the mask's edge over this many pixels of the mask, 0 to 256 (0 = "
                                        "a hard edge)."}),
}


class AddSubject:
    DESCRIPTION = ("Adds one personal subject (photos of a person, a pet or an object) to a subject list, bound to "
                   "its word in the prompt, with an optional region mask. The list works with both methods: "
                   "'FastComposer Encode' and 'Nested Attention Encode'. Chain one node per subject.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "reference image", "multi-subject"]
    FUNCTION = "add"
    RETURN_TYPES = ("SUBJECTS",)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("The subject list with this subject appended: chain the next 'Add Subject', or connect it to the "
                       "subjects input of an encode node.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "One or more photos of the subject (averaged)."}),
                             **SUBJECT_INPUTS},
                "optional": MASK_INPUTS}

    @checked_inputs(("start_percent", "end_percent"))
    def add(self, image, word, weight, start_percent, end_percent, subjects=None, mask=None, mask_feather=0):
        subject = checked_subject(word, image, weight, start_percent, end_percent)
        return (append_subject(subjects, with_mask(subject, mask, mask_feather)),)


NODE_CLASS_MAPPINGS = {"AddSubject": AddSubject}
NODE_DISPLAY_NAME_MAPPINGS = {"AddSubject": "Add Subject"}
