"""Load a Nested Attention adapter, or create a fresh one for a base model (the trainer's starting point)."""
from pathlib import Path

import torch

import folder_paths

from ..encoders.nested_adapter import NestedAdapter, load_nested_adapter, new_nested_adapter, save_nested_adapter
from .base_model import attn2_weights, clip_tokenizers, model_cross_attention_layers, model_family
from .input_checks import checked_inputs
from .naming import NESTED_ATTENTION_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES

HIDDEN_STATE_INDEX = {"penultimate": -2, "last": -1}  # as ComfyUI's CLIP encoder counts intermediate outputs

VISION_MODELS = {"ViT-L/14": 1024, "ViT-H/14": 1280}
DOMAINS = ["person", "pet", "object", "other"]
ADAPTER_SUFFIX = ".safetensors"  # how adapters are saved, and the only suffix the adapter loader lists


def single_token_ids(clip, word: str) -> dict[str, int]:
    """The word's token id per text encoder; ValueError unless it is one token in each."""
    token_ids = {}
    for key, tokenizer in clip_tokenizers(clip).items():
        ids = tokenizer.tokenizer(word)["input_ids"][1:-1]
        if len(ids) != 1:
            raise ValueError(f"the initializer word {word!r} is {len(ids)} tokens for CLIP-{key.upper()}; choose a "
                             f"single-token word such as 'person', 'dog' or 'cat'")
        token_ids[key] = ids[0]
    return token_ids


def word_embeddings(clip, word: str) -> dict[str, torch.Tensor]:
    """A single-token word's input embedding per text encoder (nothing is encoded)."""
    return {key: getattr(clip.cond_stage_model, f"clip_{key}").transformer.get_input_embeddings().weight[token_id]
            .detach().float().cpu() for key, token_id in single_token_ids(clip, word).items()}


def initializer_vectors(clip, word: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The word's input embedding per text encoder, and its context vector when encoded on its own."""
    embeddings = word_embeddings(clip, word)
    context, _ = clip.encode_from_tokens(clip.tokenize(word), return_pooled=True)
    return embeddings, context[0, 1].float().cpu()  # position 1: the word right after the start token


def fresh_adapter(model, clip, initializer_word: str, vision_model: str, subject_domain: str, seed: int = 0,
                  clip_vision=None, vision_layers: int = 0, **encoder_overrides) -> NestedAdapter:
    """A new adapter for this MODEL and CLIP (encoder_overrides: the resampler's tokens, depth, width...), with copies
    of CLIP_VISION's last `vision_layers` layers before its penultimate hidden state when asked (for fine-tuning)."""
    layers = model_cross_attention_layers(model)
    embeddings, context = initializer_vectors(clip, initializer_word)
    return new_nested_adapter(model_family(model), VISION_MODELS[vision_model], subject_domain, initializer_word,
                              embeddings, context, attn2_weights(model, layers, "to_k"), attn2_weights(model, layers, "to_v"),
                              seed=seed, layers=layers, base_vision_layers=last_vision_layers(clip_vision, vision_layers),
                              **encoder_overrides)


def last_vision_layers(clip_vision, count: int, hidden_state: str = "penultimate") -> list[dict[str, torch.Tensor]]:
    """State dicts (float32, CPU) of the `count` CLIP vision layers that end at that hidden state."""
    if count == 0:
        return []
    if clip_vision is None:
        raise ValueError("fine-tuning CLIP vision layers needs the CLIP_VISION model to copy them from")
    encoder_layers = clip_vision.model.vision_model.encoder.layers
    end = len(encoder_layers) + HIDDEN_STATE_INDEX[hidden_state] + 1
    if not 0 < count < end:
        raise ValueError(f"can fine-tune 1 to {end - 1} CLIP vision layers before the {hidden_state} hidden state, "
                         f"not {count}")
    return [{key: value.detach().float().cpu().clone() for key, value in layer.state_dict().items()}
            for layer in encoder_layers[end - count:end]]


def ready(adapter: NestedAdapter) -> tuple[NestedAdapter]:
    """As every adapter loader gives it: float32, in eval mode, no gradients."""
    return (adapter.float().eval().requires_grad_(False),)


class NestedAttentionLoader:
    DESCRIPTION = ("Loads a Nested Attention adapter (.safetensors in models/nested_attention): the subject encoder, "
                   "the per-layer nested key/value maps and the subject token, for one base family and domain.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "nested attention", "adapter", "loader"]
    FUNCTION = "load"
    RETURN_TYPES = ("NESTED_ADAPTER",)
    RETURN_NAMES = ("nested_adapter",)
    OUTPUT_TOOLTIPS = ("The adapter: connect it to 'Nested Attention Subject' (or to the nested_adapter input of "
                       "'Nested Attention Encode').",)

    @classmethod
    def INPUT_TYPES(cls):
        adapters = [name for name in folder_paths.get_filename_list("nested_attention")
                    if name.lower().endswith(ADAPTER_SUFFIX)]  # the folder also holds the official checkpoint's pickles
        return {"required": {"adapter": (adapters, {"tooltip": "An adapter file (.safetensors) from "
                                                               "models/nested_attention."})}}

    def load(self, adapter: str):
        return ready(load_nested_adapter(folder_paths.get_full_path_or_raise("nested_attention", adapter)))


class NestedAttentionNewAdapter:
    DESCRIPTION = ("Creates a freshly initialised Nested Attention adapter for this MODEL and CLIP and saves it in "
                   "models/nested_attention. It starts as close to the base model as possible (the subject token "
                   "behaves like the initializer word): the starting point for training, and a self-check.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "nested attention", "new adapter", "train"]
    FUNCTION = "create"
    RETURN_TYPES = ("NESTED_ADAPTER",)
    RETURN_NAMES = ("nested_adapter",)
    OUTPUT_TOOLTIPS = ("The new adapter, also saved as models/nested_attention/<filename>.safetensors: untrained, its "
                       "subject token renders the initializer word; train it with the pack's trainer.",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.5 or SDXL model the adapter is for."}),
            "clip": ("CLIP", {"tooltip": "That model's text encoder(s)."}),
            "initializer_word": ("STRING", {"default": "person", "tooltip": "A single-token word the subject token starts from."}),
            "subject_domain": (DOMAINS, {"tooltip": "What kind of subject the adapter is for."}),
            "vision_model": (list(VISION_MODELS), {"tooltip": "The CLIP vision model whose tokens the encoder reads."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                             "tooltip": "Seed of the random initialisation, 0 to 2147483647: the same seed, MODEL and "
                                        "CLIP give the same adapter."}),
            "filename": ("STRING", {"default": "nested_new_adapter",
                                    "tooltip": "Saved as models/nested_attention/<filename>.safetensors: a plain name, "
                                               "no folders."}),
            "overwrite": ("BOOLEAN", {"default": False,
                                      "tooltip": "Replace a file of that name. Off: a name that is taken stops the "
                                                 "node, and the file stays as it is."}),
        }}

    @checked_inputs()
    def create(self, model, clip, initializer_word, subject_domain, vision_model, seed, filename, overwrite=False):
        path = new_adapter_path(folder_paths.get_folder_paths("nested_attention")[0], filename, overwrite)
        adapter = fresh_adapter(model, clip, initializer_word.strip(), vision_model, subject_domain, seed)
        save_nested_adapter(path, adapter)
        adapter.name = Path(path).stem
        return (adapter.eval().requires_grad_(False),)


def new_adapter_path(folder: str, filename: str, overwrite: bool) -> str:
    """<folder>/<filename>.safetensors, refused before anything is made if the name would leave the folder or, unless
    `overwrite`, is taken."""
    name = filename.strip().removesuffix(ADAPTER_SUFFIX)
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"filename {filename!r} is not a plain file name: the adapter is saved in {folder}; give a "
                         f"name without folders, such as 'my_subject_adapter'")
    path = Path(folder) / f"{name}{ADAPTER_SUFFIX}"
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists and overwrite is off: choose another filename, or turn overwrite on to "
                         f"replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


NODE_CLASS_MAPPINGS = {"NestedAttentionLoader": NestedAttentionLoader, "NestedAttentionNewAdapter": NestedAttentionNewAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {"NestedAttentionLoader": "Load Nested Attention Adapter",
                              "NestedAttentionNewAdapter": "Create Nested Attention Adapter"}
