"""Import the official Nested Attention demo checkpoint (HF Space orpatashnik/NestedAttentionEncoder, SDXL) into this
pack's adapter format, under an ASSUMED layout, from the file in one step, or once on the command line (run from the
pack's folder):

    python -m encoders.official_nested_import SOURCE [DEST.safetensors] --base SDXL_CHECKPOINT [--initializer-word person]

What was verified, and what is assumed (docs/official_import.md). The Space's files (nested_attention_processor.py,
nested_attention_pipeline.py, resampler.py) were NOT available to read when this was written; the layouts below are
the pack's assumption and nothing here is checked against the real file. Known: SDXL base; a module called a
resampler; a placeholder token added to both SDXL text encoders with its embedding copied from an initializer word (so
the embedding need not be stored: the caller supplies it, or the command line reads it from the SDXL checkpoint).
Accepted layouts, every plausible one, as one state dict:
  - a safetensors file with flat keys, or a weights-only pickle that is a flat dict or a dict of dicts of tensors
    ({"image_proj": {...}, "ip_adapter": {...}} is read as image_proj.<key>, ip_adapter.<key>); which of the two a
    file is, its first bytes decide, not its name (a download renamed .safetensors may be a pickle);
  - the resampler in IP-Adapter's naming (ipadapter_plus.py lists it), under whatever prefix precedes `latents`,
    its attention width free (heads = attention width / 64), with IP-Adapter's optional `pos_emb` and
    `to_latents_from_mean_pooled_seq`; output = norm_out(proj_out(queries)), no base token;
  - per attn2 layer A_k, A_v as to_{k,v}_<s>.weight, s in nest | nested | ip, addressed either by diffusers module
    name, `[<p>.]<diffusers attn2 name>[.processor].to_k_<s>[.0].weight` (.0: diffusers' per-adapter ModuleList), or by
    IP-Adapter's number, `[<p>.]<i>.to_k_<s>.weight` with i odd in 1..139 (unet_layers.ip_adapter_layers).
Every layer width and resampler size comes from the tensors. Any other key is refused with the list of such keys.
"""
import argparse
import os
import re
from pathlib import Path

import torch

from .checkpoint_io import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, UnreadableFile, flat_state_dict, listed_keys,
                            read_safetensors, read_state_dict)
from .ipadapter_plus import ip_resampler_config, resampler_key
from .nested_adapter import NestedAdapter, assembled_adapter, placeholder_state, save_nested_adapter
from .unet_layers import from_diffusers_name, ip_adapter_layers, layer_key, layers_with_widths

IMPORT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES  # the names a checkpoint is listed under; content decides
IMPORT_FIX = ("give the official demo checkpoint (HF Space orpatashnik/NestedAttentionEncoder), copied or downloaded "
              "again if it was damaged")
# A file that reads fine but fits no layout is most likely intact: the layouts are the pack's assumption.
LAYOUT_FIX = ("the layouts this import accepts are assumed (listed in encoders/official_nested_import.py): the authors' "
              "file has not been checked against them; if this file is their demo checkpoint, it is not damaged, its "
              "layout is new to the pack: report the keys above in the pack's issues")
EXPECTED_LAYOUT = ("a resampler in IP-Adapter's naming (latents, proj_in, layers.<i>, proj_out, norm_out) and, per "
                   "attn2 layer, to_k_nest and to_v_nest weights (or _nested, _ip) named by diffusers module or "
                   "IP-Adapter number")
BASE_FIX = "give the SDXL base checkpoint (.safetensors) the adapter is for, as ComfyUI's Load Checkpoint reads it"
SDXL_TOKEN_EMBEDDINGS = {  # text encoder -> its input embedding table in an SDXL checkpoint
    "l": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "g": "conditioner.embedders.1.model.token_embedding.weight",
}
_SUFFIX = r"\.to_([kv])_(?:nest|nested|ip)"
_BY_NAME = re.compile(r"^(?:.*?\.)?((?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+"
                      rf"\.attn2)(?:\.processor)?{_SUFFIX}(?:\.0)?\.weight$")
_BY_NUMBER = re.compile(rf"^(?:.*\.)?(\d+){_SUFFIX}\.weight$")


class NotNestedCheckpoint(ValueError):
    """A file with nothing of a Nested Attention checkpoint in it: another kind of file, not a new layout."""


def _target(key: str, resampler_prefix: str, numbered: dict) -> str | None:
    """The adapter key an official key fills, or None when no accepted layout names it."""
    if key.startswith(resampler_prefix) and (local := resampler_key(key[len(resampler_prefix):])) is not None:
        return local
    by_name, by_number = _BY_NAME.match(key), _BY_NUMBER.match(key)
    if by_name is not None:
        return f"projections.maps.{layer_key(from_diffusers_name(by_name.group(1)))}.to_{by_name.group(2)}.weight"
    if by_number is not None and int(by_number.group(1)) in numbered:
        return f"projections.maps.{numbered[int(by_number.group(1))].key}.to_{by_number.group(2)}.weight"
    return None


def _rename(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official keys -> this format's state-dict keys; returns the renamed dict and the keys no pattern matched."""
    latents = [key for key in state_dict if key == "latents" or key.endswith(".latents")]
    if not latents and not any(_BY_NAME.match(key) or _BY_NUMBER.match(key) for key in state_dict):
        raise NotNestedCheckpoint(f"it is not a Nested Attention checkpoint: none of its {len(state_dict)} keys "
                                  f"({listed_keys(list(state_dict))}) is a resampler's or a nested attention map's; "
                                  f"expected {EXPECTED_LAYOUT}")
    if len(latents) != 1:
        raise ValueError(f"expected exactly one resampler 'latents' tensor, found {latents or 'none'} among its keys "
                         f"({listed_keys(list(state_dict))})")
    prefix, numbered = latents[0][:-len("latents")], ip_adapter_layers("sdxl")
    renamed, sources, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        target = _target(key, prefix, numbered)
        if target is None:
            unknown.append(key)
        elif target in sources:
            raise ValueError(f"keys {sources[target]} and {key} both give {target}")
        else:
            renamed[target], sources[target] = tensor, key
    return renamed, unknown


def import_official_nested(state_dict: dict, initializer_word: str, initializer_embeddings: dict[str, torch.Tensor],
                           subject_domain: str = "person", placeholder_word: str = "<person>",
                           special_token_weight: float = 1.0) -> NestedAdapter:
    """Build a NestedAdapter (sdxl) from the official checkpoint's tensors (a flat dict, or a dict of dicts of tensors),
    in any of the assumed layouts the module docstring lists; every size is read from the tensors (depth from the
    blocks present, each layer's width from its maps) and every tensor's shape is checked before loading; dtypes are
    kept.
    `initializer_embeddings`: the initializer word's input embedding in the "l" (768) and "g" (1280) text encoders
    (the demo copies it into the new token at load time, so the checkpoint is not expected to hold it)."""
    renamed, unknown = _rename(flat_state_dict(state_dict, grouped=True))
    if unknown:
        raise ValueError(f"{len(unknown)} keys fit no layout the official import accepts (see "
                         f"encoders/official_nested_import.py): {listed_keys(unknown)}; expected {EXPECTED_LAYOUT}")
    encoder = ip_resampler_config(renamed)
    widths = {key.split(".")[2]: tensor.shape[0] for key, tensor in renamed.items()
              if key.startswith("projections.maps.") and key.endswith(".to_k.weight") and tensor.ndim == 2}
    renamed["resampler.base_token"] = torch.zeros(encoder.output_width, dtype=renamed["resampler.queries"].dtype)
    renamed.update(placeholder_state("sdxl", initializer_embeddings))
    return assembled_adapter("sdxl", encoder, renamed, layers_with_widths("sdxl", widths), subject_domain=subject_domain,
                             initializer_word=initializer_word, placeholder_word=placeholder_word,
                             special_token_weight=special_token_weight,
                             provenance={"source": "orpatashnik/NestedAttentionEncoder, imported under an assumed layout"})


def import_official_nested_file(path: str | Path, initializer_word: str, initializer_embeddings: dict[str, torch.Tensor],
                                **options) -> NestedAdapter:
    """`import_official_nested` on a file (safetensors, or a weights-only pickle, as its content says whatever its
    name), refused with the file's name; the adapter is named after the file and records it in its provenance."""
    path = Path(path)
    state_dict = read_state_dict(path, IMPORT_FIX, grouped=True, by_content=True)
    try:
        adapter = import_official_nested(state_dict, initializer_word, initializer_embeddings, **options)
    except ValueError as error:  # the one place the import's structural problems get the file's name and the fix
        raise UnreadableFile(path, str(error), IMPORT_FIX if isinstance(error, NotNestedCheckpoint) else LAYOUT_FIX) \
            from None
    adapter.name = path.stem
    adapter.provenance["source_file"] = path.name
    return adapter


def sdxl_word_embeddings(checkpoint: str | Path, word: str,
                         tokenizer_folder: str | Path | None) -> dict[str, torch.Tensor]:
    """A single-token word's input embedding in both text encoders of an SDXL checkpoint: {"l": (768,), "g": (1280,)},
    float32. The word is tokenized as ComfyUI does, with transformers' CLIPTokenizer on ComfyUI's sd1_tokenizer
    folder (both SDXL text encoders share that vocabulary)."""
    from transformers import CLIPTokenizer  # ComfyUI's own tokenizer library; only this command line needs it
    if tokenizer_folder is None:
        raise ValueError("no ComfyUI was found above the pack: give ComfyUI's comfy/sd1_tokenizer folder with --tokenizer")
    if not all((Path(tokenizer_folder) / name).is_file() for name in ("vocab.json", "merges.txt")):
        raise ValueError(f"{tokenizer_folder} holds no CLIP tokenizer (vocab.json, merges.txt): give ComfyUI's "
                         f"comfy/sd1_tokenizer folder with --tokenizer")
    ids = CLIPTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)(word)["input_ids"][1:-1]
    if len(ids) != 1:
        raise ValueError(f"the initializer word {word!r} is {len(ids)} tokens; choose a single-token word such as "
                         f"'person', 'man' or 'dog'")
    _, tables = read_safetensors(checkpoint, BASE_FIX, keys=list(SDXL_TOKEN_EMBEDDINGS.values()))
    for key, table in tables.items():
        if table.ndim != 2 or table.shape[0] <= ids[0]:
            raise UnreadableFile(checkpoint, f"its {key} of shape {tuple(table.shape)} is no token embedding table "
                                             f"holding token {ids[0]}", BASE_FIX)
    return {name: tables[key][ids[0]].float() for name, key in SDXL_TOKEN_EMBEDDINGS.items()}


def comfyui_tokenizer_folder() -> Path | None:
    """ComfyUI's comfy/sd1_tokenizer above the pack as the user reached it: first the shell's working directory as it
    was typed (a pack linked into custom_nodes resolves to its clone, outside ComfyUI), then this file's own path."""
    starts = [Path(os.environ["PWD"])] if os.environ.get("PWD") else []
    for start in (*starts, Path(__file__).absolute().parent):
        for folder in (start, *start.parents):
            if (folder / "comfy" / "sd1_tokenizer" / "vocab.json").is_file():
                return folder / "comfy" / "sd1_tokenizer"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert the official Nested Attention demo checkpoint (SDXL) into "
                                                 "this pack's adapter format (models/nested_attention).")
    parser.add_argument("source", help="the official checkpoint: safetensors, or a PyTorch pickle read weights-only "
                                        "(the file's content decides, not its suffix)")
    parser.add_argument("destination", nargs="?", help="output .safetensors (default: beside the source)")
    parser.add_argument("--base", required=True, help="the SDXL checkpoint (.safetensors) whose text encoders give the "
                                                      "initializer word's embeddings")
    parser.add_argument("--initializer-word", default="person", help="the word the subject token was copied from")
    parser.add_argument("--subject-domain", default="person")
    parser.add_argument("--placeholder-word", default="<person>")
    parser.add_argument("--tokenizer", default=comfyui_tokenizer_folder(),
                        help="ComfyUI's CLIP tokenizer folder, comfy/sd1_tokenizer (default: the one of the ComfyUI "
                             "this pack is in, %(default)s)")
    args = parser.parse_args()
    source = Path(args.source)
    destination = Path(args.destination or source.with_name(f"{source.stem}_nested_attention.safetensors"))
    if destination.suffix != ".safetensors":
        parser.error(f"the destination must end in .safetensors, got {destination.name}")
    try:
        embeddings = sdxl_word_embeddings(args.base, args.initializer_word, args.tokenizer)
        adapter = import_official_nested_file(source, args.initializer_word, embeddings,
                                              subject_domain=args.subject_domain, placeholder_word=args.placeholder_word)
    except (ValueError, OSError) as error:  # a refusal already says what to do; no traceback for the user
        parser.exit(1, f"{error}\n")
    save_nested_adapter(destination, adapter)
    print(f"wrote {destination}")


if __name__ == "__main__":
    main()
