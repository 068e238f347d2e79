"""FastComposer Encode: a prompt plus subject images -> the positive CONDITIONING, with delayed subject conditioning."""
import torch

import comfy.model_management

from ..encoders.fastcomposer_fusion import FastComposerFusion
from ..encoders.fastcomposer_preprocess import preprocess_subject_images
from ..encoders.subject_prompt import (SUBJECT_MARKER, mark_subject_words, prompt_with_sentinels, remove_sentinels,
                                       split_subject_words)
from .input_checks import checked_inputs
from .naming import FASTCOMPOSER_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .subjects import BINDINGS_KEY, Subject

MAX_SUBJECTS = 4


def sd15_tokenizer(clip):
    """The CLIP-L tokenizer of an SD1.5 CLIP, or a clear error for any other text encoder."""
    keys = set(clip.tokenize("").keys())
    if keys != {"l"}:
        family = "SDXL (CLIP-L + CLIP-G)" if keys == {"g", "l"} else f"one with encoders {sorted(keys)}"
        raise ValueError(f"FastComposer is an SD1.5 method, but this CLIP is {family}: "
                         f"connect the CLIP output of 'Load FastComposer'")
    return clip.tokenizer.clip_l


@torch.no_grad()  # the executor runs nodes under inference_mode; direct callers (scripts, tests) must not build graphs
def subject_embeddings(clip_vision, subjects: list[torch.Tensor]) -> torch.Tensor:
    """One projected CLIP image embedding per subject; several images of one subject are averaged (ours)."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    embeddings = []
    for images in subjects:
        pixels = preprocess_subject_images(images).to(clip_vision.load_device)
        projected = clip_vision.model(pixel_values=pixels, intermediate_output=-2)[2]
        embeddings.append(projected.float().mean(dim=0).cpu())
    return torch.stack(embeddings)


def schedule_segments(subjects: list[Subject], text_only_fraction: float) -> list[tuple[float, float, tuple[int, ...]]]:
    """(start, end, indices of the subjects fused there) over the schedule; delayed conditioning and each
    subject's own start/end and weight (0 = the word alone) decide which subjects are fused when."""
    cuts = sorted({0.0, 1.0, text_only_fraction, *(s.start_percent for s in subjects), *(s.end_percent for s in subjects)})
    segments = []
    for start, end in zip(cuts, cuts[1:]):
        fused = tuple(index for index, subject in enumerate(subjects) if start >= text_only_fraction
                      and subject.start_percent <= start and end <= subject.end_percent and subject.weight > 0)
        if segments and segments[-1][2] == fused:
            segments[-1] = (segments[-1][0], end, fused)
        else:
            segments.append((start, end, fused))
    return segments


def encode_fastcomposer(clip, clip_vision, fusion: FastComposerFusion, text: str, subject_words: str,
                        subjects: list[Subject], text_only_fraction: float) -> list:
    tokenizer = sd15_tokenizer(clip)
    words = split_subject_words(subject_words)
    if not words and SUBJECT_MARKER not in text and subjects and all(subject.word for subject in subjects):
        words = [subject.word for subject in subjects]  # a subject list binds its own words
    if words:
        text = mark_subject_words(text, words)
    text, marker_count = prompt_with_sentinels(text)
    if marker_count != len(subjects):
        raise ValueError(f"the prompt binds {marker_count} subject(s) ({SUBJECT_MARKER} markers or subject words) "
                         f"but {len(subjects)} subject(s) are connected; make the two counts equal")
    tokens = clip.tokenize(text, return_word_ids=True)
    marked = remove_sentinels(tokens["l"], sentinel_token=tokenizer.end_token, pad_token=tokenizer.pad_token)
    clean_tokens = {"l": [[(token, weight) for token, weight, _ in chunk] for chunk in marked.chunks]}
    text_states, pooled = clip.encode_from_tokens(clean_tokens, return_pooled=True)
    if text_states.shape[-1] != fusion.embed_dim:
        raise ValueError(f"text states are {text_states.shape[-1]}-wide but the fusion module expects {fusion.embed_dim}")
    if not subjects:
        return [[text_states, {"pooled_output": pooled}]]

    embeddings = subject_embeddings(clip_vision, [subject.images for subject in subjects])
    positions = marked.subject_positions
    with torch.no_grad():  # every subject fused once; each schedule segment takes the rows it needs
        fused = fusion(text_states.float(), torch.tensor(positions), embeddings).to(text_states.dtype)
    conditioning = []
    for start, end, fused_subjects in schedule_segments(subjects, text_only_fraction):
        states = text_states
        if fused_subjects:
            states = text_states.clone()
            for index in fused_subjects:
                position, weight = positions[index], subjects[index].weight
                # lerp is exact at weight 1, but skipping it keeps the reference's values obviously unchanged
                states[:, position] = fused[:, position] if weight == 1.0 else \
                    torch.lerp(text_states[:, position], fused[:, position], weight)
        options = {"pooled_output": pooled,
                   BINDINGS_KEY: tuple((subject, states[0, position].clone()) for subject, position in zip(subjects, positions))}
        if (start, end) != (0.0, 1.0):
            options.update(start_percent=start, end_percent=end)
        conditioning.append([states, options])
    return conditioning


class FastComposerEncode:
    DESCRIPTION = ("Encodes a prompt with up to four subjects for FastComposer. Mark each subject's word with "
                   f"{SUBJECT_MARKER} right after it ('a man {SUBJECT_MARKER} and a woman {SUBJECT_MARKER}'), or list "
                   "the words in subject_words instead; subject 1 binds the first marked word, and so on. The subject "
                   "images are fused into those words. A subject list from 'Add Subject' binds its own words, and its "
                   "masks act through 'Apply Subject Masks' (the MODEL of 'Load FastComposer' refuses to sample a mask "
                   "it does not apply). Use it as the positive conditioning; encode the negative prompt with an "
                   "ordinary CLIP Text Encode.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "fastcomposer", "prompt", "text encode", "multi-subject"]
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("positive",)
    OUTPUT_TOOLTIPS = ("Positive conditioning: text-only for the first part of the schedule, then with the subjects fused in.",)

    @classmethod
    def INPUT_TYPES(cls):
        subject_inputs = {
            f"subject_{index}": ("IMAGE", {"tooltip": f"Photo(s) of subject {index}, bound to the prompt's {index}. "
                                                      "subject word. Several images of one subject are averaged."})
            for index in range(1, MAX_SUBJECTS + 1)
        }
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP output of 'Load FastComposer'."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP_VISION output of 'Load FastComposer'."}),
                "fastcomposer": ("FASTCOMPOSER", {"tooltip": "The fastcomposer output of 'Load FastComposer': the "
                                                             "fusion module that writes each subject's image embedding "
                                                             "into its word."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "default": f"a man {SUBJECT_MARKER} and a woman {SUBJECT_MARKER} reading a book together",
                                    "tooltip": f"The prompt. Write {SUBJECT_MARKER} right after each subject's word."}),
                "subject_words": ("STRING", {"default": "",
                                             "tooltip": "Instead of markers: the subject words, comma-separated, in "
                                                        "subject order (e.g. 'man, woman'). Each binds its first "
                                                        "unused whole-word occurrence in the prompt."}),
                "text_only_fraction": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                                 "tooltip": "Delayed subject conditioning, 0 to 1: this first part of "
                                                            "the schedule uses the prompt without subjects, so the layout "
                                                            "follows the text; the rest has them fused in. 0.2 is the "
                                                            "reference's 10 of 50 steps; lower gives more identity, higher "
                                                            "more prompt-following; 0 fuses from the first step."}),
            },
            "optional": {
                "subjects": ("SUBJECTS", {"tooltip": "A subject list ('Add Subject'), instead of the subject_N images: "
                                                     "each subject binds its own word, weight, start/end and mask."}),
                **subject_inputs,
            },
        }

    @checked_inputs()
    def encode(self, clip, clip_vision, fastcomposer, text, subject_words, text_only_fraction, subjects=None,
               **subject_images):
        inputs = [subject_images.get(f"subject_{index}") for index in range(1, MAX_SUBJECTS + 1)]
        images = [image for image in inputs if image is not None]
        if subjects is not None and images:
            raise ValueError("connect either a subject list or the subject_N images, not both")
        if None in inputs[:len(images)]:
            raise ValueError(f"subject_{inputs.index(None) + 1} is empty but a later subject input is connected; "
                             f"connect subjects in order from subject_1")
        subject_list = list(subjects) if subjects is not None else [Subject("", image) for image in images]
        return (encode_fastcomposer(clip, clip_vision, fastcomposer, text, subject_words, subject_list, text_only_fraction),)


NODE_CLASS_MAPPINGS = {"FastComposerEncode": FastComposerEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"FastComposerEncode": "FastComposer Encode"}
