"""Subject attention maps: record each subject token's cross-attention while sampling, then draw and mask it."""
import torch

from ..attention.attention_maps import maps_to_masks, render_heatmap_with_legend
from .input_checks import checked_inputs
from .naming import COMPOSITION_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .schedule_range import schedule_range_inputs
from .subject_patch import AttentionRecording, PatchedSubject, add_subject_patch
from .subjects import bindings_of


LAYER_BLOCKS = {"all": frozenset({"input", "middle", "output"}), "input (down)": frozenset({"input"}),
                "middle": frozenset({"middle"}), "output (up)": frozenset({"output"})}


def subject_label(subject, index: int) -> str:
    return subject.word or f"subject {index + 1}"


class RecordSubjectAttention:
    DESCRIPTION = ("Records, while the sampler runs, where each subject's word is attended in the chosen layers and "
                   "part of the schedule. Connect its MODEL to the sampler and its recording to 'Subject Attention "
                   "Maps'. Without this node nothing is recorded and nothing costs extra.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "attention map", "debug"]
    FUNCTION = "record"
    RETURN_TYPES = ("MODEL", "SUBJECT_ATTENTION")
    RETURN_NAMES = ("model", "recording")
    OUTPUT_TOOLTIPS = ("A copy of the model that records while it samples: connect it to the sampler.",
                       "What that sampler recorded, filled as it runs: connect it to 'Subject Attention Maps'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model you sample with (patched or not); it is cloned, never changed."}),
            "positive": ("CONDITIONING", {"tooltip": "The subject encode node's output (also the sampler's positive)."}),
            "layers": (list(LAYER_BLOCKS), {"default": "all", "tooltip": "Which UNet blocks' cross-attention to average."}),
            **schedule_range_inputs("recording starts", "recording stops"),
        }}

    @checked_inputs(("start_percent", "end_percent"))
    def record(self, model, positive, layers, start_percent, end_percent):
        bindings = bindings_of(positive)
        if not bindings:
            raise ValueError("this conditioning binds no subject: connect the output of a subject encode node")
        sources = list(dict.fromkeys(subject for subject, _ in bindings))
        sampling = model.get_model_object("model_sampling")
        recording = AttentionRecording(sources, [subject_label(s, i) for i, s in enumerate(sources)], LAYER_BLOCKS[layers],
                                       sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent))
        recorded = [PatchedSubject(signature, subject) for subject, signature in bindings]
        return (add_subject_patch(model, recorded, recording), recording)


class SubjectAttentionMaps:
    DESCRIPTION = ("Draws the recorded attention of each subject's word over the generated image, one colour per "
                   "subject with its word in a legend, and outputs one MASK per subject (image-major: image 1's "
                   "subjects, then image 2's), ready to feed back as regional masks.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "attention map", "heatmap", "debug"]
    FUNCTION = "draw"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("heatmap", "masks")
    OUTPUT_TOOLTIPS = ("The image with each subject's attention in its own colour, and a legend of the words below it.",
                       "One mask per subject and image (image 1's subjects, then image 2's), at the image's size: where "
                       "each subject landed, usable as a subject's region.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "recording": ("SUBJECT_ATTENTION", {"tooltip": "From 'Record Subject Attention'."}),
            "image": ("IMAGE", {"tooltip": "The image the recorded sampler generated (after VAE Decode)."}),
            "opacity": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "How strongly the colours cover the image where attention peaks, 0 to 1 "
                                             "(0 = the image alone)."}),
            "mask_threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "Masks are 1 where the normalised map exceeds this, 0 to 1; 0 "
                                                    "gives soft masks (the normalised map itself)."}),
        }}

    @checked_inputs()
    def draw(self, recording, image, opacity, mask_threshold):
        if not recording.recorder.count:
            raise ValueError("no attention was recorded: connect the MODEL output of 'Record Subject Attention' to "
                             "the sampler that made this image, and check that its start/end cover some steps")
        maps = recording.recorder.maps()
        if maps.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"the recording holds {maps.shape[0]} images' maps but {image.shape[0]} images were given: "
                             f"connect the images decoded from the recorded sampler")
        maps = maps.to(image.device).expand(image.shape[0], -1, -1, -1)
        heatmap = render_heatmap_with_legend(image, maps, recording.words, alpha=opacity)
        masks = maps_to_masks(maps, mask_threshold or None, resolution=tuple(image.shape[1:3]))
        return (heatmap.to(torch.float32), masks)


NODE_CLASS_MAPPINGS = {"RecordSubjectAttention": RecordSubjectAttention, "SubjectAttentionMaps": SubjectAttentionMaps}
NODE_DISPLAY_NAME_MAPPINGS = {"RecordSubjectAttention": "Record Subject Attention",
                              "SubjectAttentionMaps": "Subject Attention Maps"}
