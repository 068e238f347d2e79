"""Subject preparation as nodes: crop a pet or object to its mask on a plain background; detect and align a face."""
from functools import lru_cache
from pathlib import Path

import folder_paths

from ..encoders.subject_preparation import INSIGHTFACE_MODEL_FILES, load_face_analysis, prepare_faces, prepare_with_mask
from .input_checks import checked_inputs
from .naming import PREPARATION_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES


BACKGROUNDS = {"black": "black", "white": "white", "gray": "gray", "keep photo": None}


class PrepareSubjectWithMask:
    DESCRIPTION = ("Turns photos of a pet or an object into subject references: the subject (white in the mask) is "
                   "kept, the rest becomes a plain background (FastComposer was trained on subjects on a plain "
                   "background), and the photo is cropped square around it. For a box, make the mask with "
                   "'Subject Region Mask' at the photo's size.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "crop", "mask", "reference image"]
    FUNCTION = "prepare"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The subject on a plain background, cropped square: use it as a subject's photo.",
                       "The subject's mask, cropped the same way.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Photos of the subject (a pet, an object); each is cut out with the mask."}),
            "mask": ("MASK", {"tooltip": "The subject, white; one mask for all photos or one per photo."}),
            "size": ("INT", {"default": 224, "min": 16, "max": 2048, "step": 8,
                             "tooltip": "Side of the square output in pixels, 16 to 2048."}),
            "margin": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 2.0, "step": 0.05,
                                 "tooltip": "Extra room around the subject as a fraction of its size, 0 to 2 (0 = a "
                                            "tight crop)."}),
            "background": (list(BACKGROUNDS), {"default": "black", "tooltip": "What replaces everything outside the mask."}),
        }}

    @checked_inputs()
    def prepare(self, image, mask, size, margin, background):
        return prepare_with_mask(image, mask, size, margin, BACKGROUNDS[background])


@lru_cache(maxsize=2)
def face_analysis(root: str, name: str):
    return load_face_analysis(root, name)


def insightface_root() -> Path:
    return Path(folder_paths.get_folder_paths("insightface")[0])


class PrepareFace:
    DESCRIPTION = ("Finds a face in each photo with insightface, and outputs it aligned and cropped the way face "
                   "encoders expect. Needs `pip install insightface onnxruntime` and the antelopev2 or buffalo_l model "
                   "files in models/insightface/models/<name>/. Every other node works without it.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "face", "insightface", "crop", "align"]
    FUNCTION = "prepare"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The faces, one per photo, aligned to the ArcFace template and cropped square: use them as a "
                       "subject's photos.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Photos with a face; each gives one aligned face."}),
            "model": (list(INSIGHTFACE_MODEL_FILES), {"default": "antelopev2",
                                                      "tooltip": "insightface model pack, in models/insightface/models/."}),
            "face_index": ("INT", {"default": -1, "min": -1, "max": 63,
                                   "tooltip": "Which face of each photo, -1 to 63: -1 = the largest, 0, 1, ... = "
                                              "counted from the left."}),
            "size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8,
                             "tooltip": "Side of the aligned square crop in pixels, 64 to 2048."}),
        }}

    @checked_inputs()
    def prepare(self, image, model, face_index, size):
        analysis = face_analysis(str(insightface_root()), model)
        faces, _ = prepare_faces(analysis, image, None if face_index < 0 else face_index, size)
        return (faces,)


NODE_CLASS_MAPPINGS = {"PrepareSubjectWithMask": PrepareSubjectWithMask, "PrepareFace": PrepareFace}
NODE_DISPLAY_NAME_MAPPINGS = {"PrepareSubjectWithMask": "Prepare Subject (mask)", "PrepareFace": "Prepare Face (insightface)"}
