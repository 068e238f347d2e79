"""Nested adapters from weights that exist today: IP-Adapter Plus files, and the authors' official SDXL checkpoint
under an assumed layout (docs/official_import.md)."""
import folder_paths

from ..encoders.ipadapter_plus import load_ip_adapter_plus
from ..encoders.nested_adapter import NestedAdapter, is_adapter_file
from ..encoders.official_nested_import import IMPORT_FIX, IMPORT_SUFFIXES, import_official_nested_file
from .base_model import clip_tokenizers
from .naming import NESTED_ATTENTION_CATEGORY as CATEGORY, PERSONALIZATION_ALIASES
from .nested_adapter_nodes import ready, word_embeddings

WORD_TOOLTIP = ("The subject word, one token of the CLIP vocabulary ('person', 'woman', 'dog'): its input embedding "
                "becomes the subject token's. Give the subject ('Nested Attention Subject') the same word, or a phrase "
                "whose last word it is ('old woman'); 'Nested Attention Encode' refuses any other word, which would be "
                "drawn as this one.")


class NestedAttentionIPAdapterLoader:
    DESCRIPTION = ("Loads an IP-Adapter Plus file (models/ipadapter: ip-adapter-plus_sd15, ip-adapter-plus-face_sd15, "
                   "ip-adapter-plus_sdxl_vit-h, ip-adapter-plus-face_sdxl_vit-h) as a Nested Attention adapter: its "
                   "resampler becomes the subject encoder and its per-layer to_k_ip/to_v_ip maps the nested keys and "
                   "values. Use it with the CLIP ViT-H/14 vision model. IP-Adapter Plus weights were trained for "
                   "IP-Adapter's ungated injection (the image added to every region); here they are used gated by the "
                   "subject word (the image enters only where the word is attended). The quality of that combination "
                   "is not measured here. Other IP-Adapter variants (plain, Full Face, FaceID) are refused with the "
                   "reason.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "ip-adapter", "ipadapter", "ip-adapter plus", "face", "loader"]
    FUNCTION = "load"
    RETURN_TYPES = ("NESTED_ADAPTER",)
    RETURN_NAMES = ("nested_adapter",)
    OUTPUT_TOOLTIPS = ("The IP-Adapter Plus weights as a Nested Attention adapter whose subject token starts from the "
                       "word: connect it to 'Nested Attention Subject'.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ipadapter": (folder_paths.get_filename_list("ipadapter"),
                          {"tooltip": "An IP-Adapter Plus file from models/ipadapter (.safetensors or .bin)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP of the checkpoint you generate with (SD1.5 for the _sd15 files, SDXL "
                                         "for the _sdxl files): it gives the word's embedding."}),
            "word": ("STRING", {"default": "person", "tooltip": WORD_TOOLTIP}),
        }}

    def load(self, ipadapter: str, clip, word: str):
        word = word.strip()
        embeddings = word_embeddings(clip, word)
        path = folder_paths.get_full_path_or_raise("ipadapter", ipadapter)
        return ready(with_prompt_word(load_ip_adapter_plus(path, word, embeddings), word))


class NestedAttentionOfficialLoader:
    DESCRIPTION = ("Imports the authors' Nested Attention demo checkpoint (SDXL; Hugging Face Space "
                   "orpatashnik/NestedAttentionEncoder) from models/nested_attention, in one step, as a Nested Attention "
                   "adapter. Its layout is undocumented and the import has NOT been checked against the real file: "
                   "every plausible layout is accepted and any other key is refused, listed. To convert it once instead "
                   "of at every load: python -m encoders.official_nested_import <checkpoint> <out>.safetensors --base "
                   "<SDXL checkpoint>, from the pack's folder (docs/official_import.md), then load the result with "
                   "'Load Nested Attention Adapter'.")
    CATEGORY = CATEGORY
    SEARCH_ALIASES = [*PERSONALIZATION_ALIASES, "nested attention", "official", "sdxl", "import"]
    FUNCTION = "load"
    RETURN_TYPES = ("NESTED_ADAPTER",)
    RETURN_NAMES = ("nested_adapter",)
    OUTPUT_TOOLTIPS = ("The official checkpoint, imported under an assumed layout, as a Nested Attention adapter (SDXL): "
                       "connect it to 'Nested Attention Subject'.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": ([name for name in folder_paths.get_filename_list("nested_attention")
                            if name.lower().endswith(IMPORT_SUFFIXES)],
                           {"tooltip": f"The official demo checkpoint, put in models/nested_attention: safetensors or "
                                       f"a PyTorch pickle ({', '.join(IMPORT_SUFFIXES)}), told apart by content."}),
            "clip": ("CLIP", {"tooltip": "The SDXL checkpoint's CLIP: it gives the initializer word's embeddings."}),
            "initializer_word": ("STRING", {"default": "person", "tooltip": WORD_TOOLTIP}),
        }}

    def load(self, checkpoint: str, clip, initializer_word: str):
        path = folder_paths.get_full_path_or_raise("nested_attention", checkpoint)
        if sorted(clip_tokenizers(clip)) != ["g", "l"]:
            raise ValueError(f"the official Nested Attention checkpoint is for SDXL, but this CLIP has text encoders "
                             f"{sorted(clip_tokenizers(clip))}: connect the CLIP of an SDXL checkpoint")
        if is_adapter_file(path, IMPORT_FIX):
            raise ValueError(f"{checkpoint} is already a Nested Attention adapter of this pack: load it with 'Load "
                             f"Nested Attention Adapter'")
        word = initializer_word.strip()
        embeddings = word_embeddings(clip, word)
        return ready(with_prompt_word(import_official_nested_file(path, word, embeddings), word))


def with_prompt_word(adapter: NestedAdapter, word: str) -> NestedAdapter:
    """The adapter, bound to the one prompt word its token was made from here (checked by 'Nested Attention Encode')."""
    adapter.prompt_word = word
    return adapter


NODE_CLASS_MAPPINGS = {"NestedAttentionIPAdapterLoader": NestedAttentionIPAdapterLoader,
                       "NestedAttentionOfficialLoader": NestedAttentionOfficialLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"NestedAttentionIPAdapterLoader": "Load IP-Adapter Plus as Nested Adapter",
                              "NestedAttentionOfficialLoader": "Import Nested Attention Checkpoint (official SDXL)"}
