"""Subject preparation as nodes: crop a pet or object to its mask on a plain background; detect and align a face."""
import logging

import torch.nn.functional as F

from ..encoders.subject_preparation import INSIGHTFACE_MODEL_FILES, prepare_faces, prepare_with_mask
from .input_checks import checked_inputs
from .insightface_models import face_analysis
from .naming import PERSONALIZATION_ALIASES, PREPARATION_CATEGORY as CATEGORY

BACKGROUNDS = {"black": "black", "white": "white", "gray": "gray", "keep photo": None}
FACE_BOX_MARGIN = 0.25  # room around a face box: hair and chin, about what the ArcFace template keeps


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


class PrepareFace:
    DESCRIPTION = ("Finds a face in each photo with insightface and outputs it aligned and cropped the way face "
                   "encoders expect. Needs `pip install insightface onnxruntime` (0.7.3 or 2.x) and the antelopev2 or "
                   "buffalo_l files in models/insightface/models/<name>/, where InstantID and PuLID keep them. Without "
                   "them it crops face_box instead, when given; every other node works without insightface.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "face", "insightface", "crop", "align"]
    FUNCTION = "prepare"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The faces, one per photo, aligned to the ArcFace template and cropped square (without "
                       "insightface: the face box's square): use them as a subject's photos.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Photos with a face; each gives one aligned face."}),
            "model": (list(INSIGHTFACE_MODEL_FILES), {"default": "antelopev2",
                                                      "tooltip": "insightface model pack, in "
                                                                 "models/insightface/models/<name>/."}),
            "face_index": ("INT", {"default": -1, "min": -1, "max": 63,
                                   "tooltip": "Which face of each photo, -1 to 63: -1 = the largest, 0, 1, ... = "
                                              "counted from the left."}),
            "size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8,
                             "tooltip": "Side of the aligned square crop in pixels, 64 to 2048."}),
        }, "optional": {
            "face_box": ("MASK", {"tooltip": "Where the face is (white), as fractions of the photo: cropped square with a "
                                             "quarter of its size around it and the photo kept, when insightface or "
                                             "the model pack is missing. Without it, a missing one stops the node, "
                                             "naming it."}),
        }}

    @checked_inputs()
    def prepare(self, image, model, face_index, size, face_box=None):
        try:
            analysis = face_analysis(model)
        except (ImportError, FileNotFoundError) as missing:
            if face_box is None:
                raise
            logging.warning(f"Prepare Face: cropping face_box instead of detecting the face: {missing}")
            box = face_box if face_box.ndim == 3 else face_box[None]
            if box.shape[-2:] != image.shape[1:3]:  # a box made at another size: read as fractions of the photo
                box = F.interpolate(box[:, None].float(), size=tuple(image.shape[1:3]), mode="nearest")[:, 0]
            return (prepare_with_mask(image, box, size, FACE_BOX_MARGIN, None)[0],)
        faces, _ = prepare_faces(analysis, image, None if face_index < 0 else face_index, size)
        return (faces,)


NODE_CLASS_MAPPINGS = {"PrepareSubjectWithMask": PrepareSubjectWithMask, "PrepareFace": PrepareFace}
NODE_DISPLAY_NAME_MAPPINGS = {"PrepareSubjectWithMask": "Prepare Subject (mask)", "PrepareFace": "Prepare Face (insightface)"}
