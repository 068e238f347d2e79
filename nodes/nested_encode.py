"""Nested Attention Encode: bind each subject to its word, as the subject token s*, and encode the prompt."""
from dataclasses import replace

import torch

from ..encoders.subject_prompt import mark_subject_words, prompt_with_sentinels, remove_sentinels
from .base_model import clip_tokenizers
from .naming import NESTED_ATTENTION_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .nested_adapter_nodes import single_token_ids
from .nested_subject import encode_subject_tokens
from .subjects import BINDINGS_KEY


def bound_token_positions(clip, text: str, words: list[str]) -> tuple[dict, list[int]]:
    """Tokenize with each subject word marked; returns the clean token chunks per encoder and the positions."""
    marked_text, _ = prompt_with_sentinels(mark_subject_words(text, words))
    tokens = clip.tokenize(marked_text, return_word_ids=True)
    chunks, positions = {}, None
    for key, tokenizer in clip_tokenizers(clip).items():
        marked = remove_sentinels(tokens[key], sentinel_token=tokenizer.end_token, pad_token=tokenizer.pad_token)
        if positions is not None and marked.subject_positions != positions:
            raise ValueError("the text encoders tokenized the prompt differently; cannot bind subjects")
        chunks[key], positions = marked.chunks, marked.subject_positions
    return chunks, positions


def check_prompt_words(clip, subjects, chunks: dict, positions: list[int]) -> None:
    """Refuse a subject whose adapter is bound to one prompt word (`NestedAdapter.prompt_word`: the IP-Adapter and
    official loaders) but whose prompt token is another word's: the token would be drawn as the adapter's word. A
    subject word of several tokens binds its last one, so it must end in the adapter's word ('old woman': 'woman')."""
    for subject, position in zip(subjects, positions):
        word = None if subject.adapter is None else subject.adapter.prompt_word
        if word is None:
            continue
        for key, token_id in single_token_ids(clip, word).items():
            chunk_length = len(chunks[key][0])
            bound = chunks[key][position // chunk_length][position % chunk_length][0]
            if not (isinstance(bound, int) and bound == token_id):  # an `embedding:` name gives a tensor here
                raise ValueError(f"subject '{subject.word}' and its adapter {subject.adapter.name} disagree on the "
                                 f"subject word: the adapter was loaded with '{word}', whose embedding replaces the "
                                 f"prompt's '{subject.word}', so the image would show '{word}' where the prompt says "
                                 f"'{subject.word}'. Set one word in the adapter's loader and in the subject node: "
                                 f"'{subject.word}' in both, or '{word}' in both and in the prompt (a phrase binds its "
                                 f"last word, so it must end in the loader's word, e.g. 'old {word}')")


def encode_subject_prompt(clip, subjects, text: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The prompt's context (1, T, D) with each subject's word as its adapter's subject token s*, the pooled
    output, and each subject's token position."""
    encoders = sorted(clip_tokenizers(clip))
    for subject in subjects:
        if subject.adapter is not None and sorted(subject.adapter.placeholder_embeddings) != encoders:
            raise ValueError(f"adapter {subject.adapter.name} is for {subject.adapter.base_family} (text encoders "
                             f"{sorted(subject.adapter.placeholder_embeddings)}) but this CLIP has text encoders {encoders}: "
                             f"use the CLIP of the model the adapter was made for")
    chunks, positions = bound_token_positions(clip, text, [subject.word for subject in subjects])
    check_prompt_words(clip, subjects, chunks, positions)
    token_pairs = {key: [[(token, weight) for token, weight, _ in chunk] for chunk in key_chunks]
                   for key, key_chunks in chunks.items()}
    for subject, position in zip(subjects, positions):
        if subject.adapter is None:
            continue
        for key, key_chunks in token_pairs.items():
            chunk_length = len(key_chunks[0])
            chunk, index = key_chunks[position // chunk_length], position % chunk_length
            # s* is a new token: the subject word's last token gets the adapter's own input embedding.
            chunk[index] = (subject.adapter.placeholder_embeddings[key].detach().float().cpu(), chunk[index][1])
    cond, pooled = clip.encode_from_tokens(token_pairs, return_pooled=True)
    return cond, pooled, positions


def encode_with_subjects(clip, subjects, text: str) -> list:
    cond, pooled, positions = encode_subject_prompt(clip, subjects, text)
    signatures = [cond[0, position].clone() for position in positions]
    if len({tuple(signature.tolist()) for signature in signatures}) != len(signatures):
        raise ValueError("two subjects ended up with identical token states; give them different words or adapters")
    return [[cond, {"pooled_output": pooled, BINDINGS_KEY: tuple(zip(subjects, signatures))}]]


class NestedAttentionEncode:
    DESCRIPTION = ("Encodes the prompt with each subject bound to its word as the subject token. Connect the output "
                   "both to 'Apply Nested Attention' and to the sampler's positive input. Encode the negative prompt "
                   "with an ordinary CLIP Text Encode.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "nested attention", "prompt", "text encode"]
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("positive",)
    OUTPUT_TOOLTIPS = ("Positive conditioning with each subject's word as its subject token: connect it to 'Apply "
                       "Nested Attention' and to the sampler's positive input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder of the model you sample with (SD1.5 or SDXL, as the "
                                             "adapters are)."}),
                "subjects": ("SUBJECTS", {"tooltip": "The subject list ('Nested Attention Subject' or 'Add Subject'): "
                                                     "each subject binds to its word in the prompt."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "default": "a photo of a person walking a dog on the beach",
                                    "tooltip": "The prompt. Each subject's word must appear in it, in subject order "
                                               "for repeated words."}),
            },
            "optional": {
                "nested_adapter": ("NESTED_ADAPTER", {"tooltip": "For subjects from 'Add Subject', which carry no "
                                                                 "adapter: encode them with this one."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model of nested_adapter."}),
            },
        }

    def encode(self, clip, subjects, text, nested_adapter=None, clip_vision=None):
        if not subjects:
            raise ValueError("the subject list is empty; connect a 'Nested Attention Subject' or 'Add Subject'")
        return (encode_with_subjects(clip, with_adapter(subjects, nested_adapter, clip_vision), text),)


def with_adapter(subjects, adapter, clip_vision) -> list:
    """Subjects without an adapter of their own (from 'Add Subject') encoded with the given one."""
    missing = [subject.word for subject in subjects if subject.adapter is None]
    if missing and (adapter is None or clip_vision is None):
        raise ValueError(f"subject(s) {', '.join(missing)} carry no Nested Attention adapter: connect nested_adapter "
                         f"and clip_vision to this node, or build them with 'Nested Attention Subject'")
    return [subject if subject.adapter is not None else
            replace(subject, adapter=adapter, tokens=encode_subject_tokens(adapter, clip_vision, subject.images))
            for subject in subjects]


NODE_CLASS_MAPPINGS = {"NestedAttentionEncode": NestedAttentionEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"NestedAttentionEncode": "Nested Attention Encode"}
