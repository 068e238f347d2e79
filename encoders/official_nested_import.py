"""Import the official Nested Attention demo checkpoint (HF Space orpatashnik/NestedAttentionEncoder, SDXL) into this
pack's adapter format.

What was verified, and what is assumed. The Space's files (nested_attention_processor.py, nested_attention_pipeline.py,
resampler.py) were NOT available to read when this was written; nothing here is checked against the real file.
Known (METHODS.md §2): SDXL base; a module called a resampler; a placeholder token added to both SDXL text encoders
with its embedding copied from an initializer word (so the embedding need not be stored: the caller supplies it).
Assumed layout, after the IP-Adapter-Plus resampler the file name suggests:
  <p>latents                     (1, M, width)       learned queries
  <p>proj_in.{weight,bias}       (width, W_vision)
  <p>layers.<i>.0.norm1.*        LayerNorm of image tokens     <p>layers.<i>.0.norm2.*  LayerNorm of the queries
  <p>layers.<i>.0.to_q.weight, to_kv.weight, to_out.weight   (no biases; attention over [image; queries])
  <p>layers.<i>.1.0.* / 1.1.weight / 1.3.weight             feed-forward LayerNorm, Linear, (GELU), Linear
  <p>proj_out.{weight,bias}, <p>norm_out.*                   output = norm_out(proj_out(queries))
  (<p> is whatever prefix precedes `latents`; head size assumed 64, as in IP-Adapter-Plus.)
  <diffusers attn2 name>[.processor].to_k_<s>.weight / to_v_<s>.weight, s in nest|nested|ip: A_k, A_v per layer.
Any key outside these patterns is refused with the list of unknown keys, so a wrong assumption fails loudly.
"""
import re
from pathlib import Path

import torch

from .checkpoint_io import UnreadableFile, read_state_dict, shape_differences
from .nested_adapter import NestedAdapter
from .subject_resampler import ResamplerConfig
from .unet_layers import from_diffusers_name, layer_key

ASSUMED_HEAD_SIZE = 64
IMPORT_FIX = ("give the official demo checkpoint (HF Space orpatashnik/NestedAttentionEncoder), copied or downloaded "
              "again if it was damaged")
_PROJECTION = re.compile(r"^(?:.*?\.)?((?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+"
                         r"\.attn2)(?:\.processor)?\.to_([kv])_(?:nest|nested|ip)\.weight$")
_RESAMPLER = {  # official name (after the prefix) -> ours (under `resampler.`); <i> is the block index
    "latents": "queries", "proj_in.weight": "proj_in.weight", "proj_in.bias": "proj_in.bias",
    "proj_out.weight": "proj_out.weight", "proj_out.bias": "proj_out.bias",
    "norm_out.weight": "norm_out.weight", "norm_out.bias": "norm_out.bias",
}
_BLOCK = {
    "0.norm1.weight": "0.norm_image.weight", "0.norm1.bias": "0.norm_image.bias",
    "0.norm2.weight": "0.norm_queries.weight", "0.norm2.bias": "0.norm_queries.bias",
    "0.to_q.weight": "0.to_q.weight", "0.to_kv.weight": "0.to_kv.weight", "0.to_out.weight": "0.to_out.weight",
    "1.0.weight": "1.0.weight", "1.0.bias": "1.0.bias", "1.1.weight": "1.1.weight", "1.3.weight": "1.3.weight",
}


def _rename(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official keys -> this format's state-dict keys; returns the renamed dict and the keys no pattern matched."""
    latents = [key for key in state_dict if key == "latents" or key.endswith(".latents")]
    if len(latents) != 1:
        raise ValueError(f"expected exactly one resampler 'latents' tensor, found {latents or 'none'}")
    prefix = latents[0][:-len("latents")]
    renamed, unknown = {}, []
    for key, tensor in state_dict.items():
        local = key[len(prefix):] if key.startswith(prefix) else None
        block = re.match(r"^layers\.(\d+)\.(.+)$", local) if local is not None else None
        projection = _PROJECTION.match(key)
        if local in _RESAMPLER:
            renamed[f"resampler.{_RESAMPLER[local]}"] = tensor
        elif block is not None and block.group(2) in _BLOCK:
            renamed[f"resampler.blocks.{block.group(1)}.{_BLOCK[block.group(2)]}"] = tensor
        elif projection is not None:
            layer = layer_key(from_diffusers_name(projection.group(1)))
            renamed[f"projections.maps.{layer}.to_{projection.group(2)}.weight"] = tensor
        else:
            unknown.append(key)
    return renamed, unknown


def import_official_nested(state_dict: dict[str, torch.Tensor], initializer_word: str,
                           initializer_embeddings: dict[str, torch.Tensor], subject_domain: str = "person",
                           placeholder_word: str = "<person>", special_token_weight: float = 1.0) -> NestedAdapter:
    """Build a NestedAdapter (sdxl) from the official checkpoint's tensors, under the layout assumed above; every size
    is read from the tensors (depth from the blocks present) and every tensor's shape is checked before loading.
    `initializer_embeddings`: the initializer word's input embedding in the "l" (768) and "g" (1280) text encoders
    (the demo copies it into the new token at load time, so the checkpoint is not expected to hold it)."""
    renamed, unknown = _rename(state_dict)
    if unknown:
        raise ValueError(f"{len(unknown)} keys do not fit the assumed official layout (see "
                         f"encoders/official_nested_import.py): {', '.join(sorted(unknown)[:12])}")
    shapes = {key: tuple(tensor.shape) for key, tensor in renamed.items()}
    width = shapes["resampler.queries"][-1] if shapes["resampler.queries"] else 0  # a scalar is refused by from_shapes
    encoder = ResamplerConfig.from_shapes(shapes, heads=max(width // ASSUMED_HEAD_SIZE, 1), norm_after_projection=True,
                                          prefix="resampler.")
    with torch.device("meta"):  # no allocation: every tensor is taken from the checkpoint
        adapter = NestedAdapter("sdxl", encoder, subject_domain, initializer_word, placeholder_word,
                                special_token_weight,
                                {"source": "orpatashnik/NestedAttentionEncoder, imported under an assumed layout"})
    renamed["resampler.base_token"] = torch.zeros(encoder.output_width)  # the official output has no base token
    renamed.update({f"placeholder_embeddings.{name}": tensor.reshape(-1) for name, tensor in initializer_embeddings.items()})
    problems = shape_differences({key: tuple(value.shape) for key, value in adapter.state_dict().items()},
                                 {key: tuple(tensor.shape) for key, tensor in renamed.items()})
    if problems:
        raise ValueError(f"official checkpoint does not fill this format: {'; '.join(problems)}")
    adapter.load_state_dict(renamed, assign=True)
    return adapter


def import_official_nested_file(path: str | Path, initializer_word: str, initializer_embeddings: dict[str, torch.Tensor],
                                **options) -> NestedAdapter:
    """`import_official_nested` on a file (safetensors, or a weights-only pickle), refused with the file's name."""
    state_dict = read_state_dict(path, IMPORT_FIX)
    try:
        return import_official_nested(state_dict, initializer_word, initializer_embeddings, **options)
    except ValueError as error:  # the one place the import's structural problems get the file's name and the fix
        raise UnreadableFile(path, str(error), IMPORT_FIX) from None
