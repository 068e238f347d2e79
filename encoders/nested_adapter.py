"""The Nested Attention adapter checkpoint: subject encoder + nested projections + placeholder token, in one file.

File format: safetensors. Tensors are the `NestedAdapter` state dict (`resampler.*`, `projections.maps.<layer>.to_{k,v}
.weight`, `placeholder_embeddings.{l,g}`). Metadata (all strings; structured values are JSON):
  format, format_version     "nested_attention_adapter", "1"
  base_family, context_width "sd15" | "sdxl", "768" | "2048"
  layers                     [{"key", "inner_dim", "heads"}] of every attn2 layer (see unet_layers.py)
  encoder                    ResamplerConfig as a dict
  clip_vision                {"name": "ViT-L/14" | "ViT-H/14" | "ViT-bigG/14", "hidden_width": 1024 | 1280 | 1664,
                              "hidden_state": "penultimate" | "last",
                              "trained_layers": N}: the adapter carries its own copies (`vision_layers.*`) of the
                              N CLIP vision layers that end at hidden_state, and is fed the hidden state before them
  subject_domain, initializer_word, placeholder_word, special_token_weight
  provenance                 free dict: dataset, steps, base checkpoint hash, ...
"""
import json
import math
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .checkpoint_io import UnreadableFile, read_safetensors, read_safetensors_header, shape_differences, weights_format
from .kill_safe import written_beside
from .nested_projections import NestedProjections
from .subject_resampler import ResamplerConfig, SubjectResampler
from .unet_layers import CONTEXT_WIDTH, CrossAttentionLayer, check_family, cross_attention_layers
from .vision_layers import VisionLayer, run_vision_layers, stored_vision_layers

FORMAT_NAME = "nested_attention_adapter"
FORMAT_VERSION = "1"
CLIP_VISION = {1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"}  # by hidden width
VISION_HIDDEN_STATES = ("penultimate", "last")  # ComfyUI's penultimate_hidden_states / last_hidden_state
TEXT_ENCODER_WIDTHS = {"sd15": {"l": 768}, "sdxl": {"l": 768, "g": 1280}}
# The resampler's internal width per family when the trainer does not override it.
DEFAULT_ENCODER = {"sd15": {"width": 768, "heads": 12}, "sdxl": {"width": 1280, "heads": 20}}
ADAPTER_DTYPES = ("F16", "BF16", "F32", "F64")  # an adapter's tensors become parameters: floating point only
ADAPTER_FIX = (f"copy or download the adapter again, or make one with the trainer (python -m train); an adapter is a "
               f".safetensors file with '{FORMAT_NAME}' metadata (the official demo checkpoint is converted with "
               f"encoders/official_nested_import.py)")


class NestedAdapter(nn.Module):
    def __init__(self, base_family: str, encoder: ResamplerConfig, subject_domain: str, initializer_word: str,
                 placeholder_word: str = "<subject>", special_token_weight: float = 1.0,
                 provenance: dict | None = None, vision_hidden_state: str = "penultimate", name: str = "(unsaved)",
                 layers: list[CrossAttentionLayer] | None = None, vision_layers: int = 0):
        super().__init__()
        check_family(base_family)
        if encoder.output_width != CONTEXT_WIDTH[base_family]:
            raise ValueError(f"encoder output width {encoder.output_width} differs from the {base_family} "
                             f"context width {CONTEXT_WIDTH[base_family]}")
        if encoder.vision_width not in CLIP_VISION:
            raise ValueError(f"vision width {encoder.vision_width} is not a known CLIP vision model "
                             f"({', '.join(f'{w} {n}' for w, n in CLIP_VISION.items())})")
        if vision_hidden_state not in VISION_HIDDEN_STATES:
            raise ValueError(f"vision_hidden_state must be one of {VISION_HIDDEN_STATES}, got {vision_hidden_state!r}")
        if not 0 < special_token_weight < math.inf:  # also refuses NaN
            raise ValueError(f"special_token_weight must be a finite number > 0 (the weight on the subject token's "
                             f"attention; 1 = unchanged), got {special_token_weight}")
        self.base_family = base_family
        self.vision_hidden_state = vision_hidden_state  # which CLIP_VISION output the encoder was trained on
        self.subject_domain = subject_domain
        self.initializer_word = initializer_word
        self.placeholder_word = placeholder_word
        self.special_token_weight = special_token_weight
        self.provenance = dict(provenance or {})
        self.name = name
        # The one prompt word the subject token may replace, when a loader node took the word as an input: the token is
        # that word's embedding, so it would draw that word in another's place. None: any word (a trained adapter's
        # token learnt to stand in for its captions' subject words). Not saved with the adapter.
        self.prompt_word: str | None = None
        # The family's attn2 layers; a UNet of the same layout but other widths (a small test UNet) gives its own.
        self.layers = cross_attention_layers(base_family) if layers is None else list(layers)
        if [layer.key for layer in self.layers] != [layer.key for layer in cross_attention_layers(base_family)]:
            raise ValueError(f"the layer table does not match the {base_family} UNet's attn2 layers")
        self.vision_layers = nn.ModuleList(VisionLayer(encoder.vision_width) for _ in range(vision_layers))
        self.resampler = SubjectResampler(encoder)
        self.projections = NestedProjections(self.layers, self.context_width)
        # The subject token s*: one input-embedding vector per text encoder.
        self.placeholder_embeddings = nn.ParameterDict(
            {encoder_name: nn.Parameter(torch.zeros(width)) for encoder_name, width in TEXT_ENCODER_WIDTHS[base_family].items()})

    @property
    def context_width(self) -> int:
        return CONTEXT_WIDTH[self.base_family]

    @property
    def vision_width(self) -> int:
        return self.resampler.config.vision_width

    def subject_tokens(self, vision_hidden: torch.Tensor) -> torch.Tensor:
        """CLIP vision hidden states (B, [n,] tokens, W), taken `len(vision_layers)` layers before `vision_hidden_state`
        -> subject tokens (B, M, D)."""
        return self.resampler(run_vision_layers(self.vision_layers, vision_hidden))

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "base_family": self.base_family, "context_width": str(self.context_width),
            "layers": json.dumps([{"key": l.key, "inner_dim": l.inner_dim, "heads": l.heads} for l in self.layers]),
            "encoder": json.dumps(self.resampler.config.to_dict()),
            "clip_vision": json.dumps({"name": CLIP_VISION[self.vision_width], "hidden_width": self.vision_width,
                                       "hidden_state": self.vision_hidden_state,
                                       "trained_layers": len(self.vision_layers)}),
            "subject_domain": self.subject_domain, "initializer_word": self.initializer_word,
            "placeholder_word": self.placeholder_word, "special_token_weight": repr(float(self.special_token_weight)),
            "provenance": json.dumps(self.provenance),
        }


def save_nested_adapter(path: str | Path, adapter: NestedAdapter) -> None:
    """The adapter file, written beside `path` and renamed into place: a kill never leaves part of one there."""
    tensors = {key: tensor.detach().contiguous() for key, tensor in adapter.state_dict().items()}
    with written_beside(path) as partial:
        save_file(tensors, str(partial), metadata=adapter.metadata())


def _field(metadata: dict[str, str], name: str, *kinds: type):
    """A metadata field parsed as JSON (safetensors metadata values are strings), of one of the given types."""
    if name not in metadata:
        raise ValueError(f"its metadata has no '{name}' field")
    try:
        value = json.loads(metadata[name])
    except json.JSONDecodeError:
        raise ValueError(f"metadata field '{name}' is not valid JSON: {metadata[name][:80]!r}") from None
    if type(value) not in kinds:
        raise ValueError(f"metadata field '{name}' should be a {' or '.join(kind.__name__ for kind in kinds)}, "
                         f"got {type(value).__name__}")
    return value


def _text(metadata: dict[str, str], name: str) -> str:
    if name not in metadata:
        raise ValueError(f"its metadata has no '{name}' field")
    return metadata[name]


def _positive(entry: dict, name: str, where: str) -> int:
    value = entry.get(name)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")
    return value


def _layer_table(metadata: dict[str, str], base_family: str, shapes: dict[str, tuple[int, ...]]) -> list[CrossAttentionLayer]:
    """The `layers` field, each entry an attn2 layer of the family with its projection tensors, and every projection
    tensor's layer listed."""
    family = {layer.key: layer for layer in cross_attention_layers(base_family)}
    layers = []
    for number, entry in enumerate(_field(metadata, "layers", list)):
        where = f"layers[{number}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise ValueError(f"{where} should be an object with a string 'key', got {str(entry)[:60]}")
        if entry["key"] not in family:
            raise ValueError(f"{where}: {entry['key']!r} is not an attn2 layer of the {base_family} UNet")
        inner_dim, heads = _positive(entry, "inner_dim", where), _positive(entry, "heads", where)
        if inner_dim % heads:
            raise ValueError(f"{where}: inner_dim {inner_dim} is not divisible by heads {heads}")
        layers.append(CrossAttentionLayer(entry["key"], family[entry["key"]].block, inner_dim, heads))
    listed = [layer.key for layer in layers]
    stored = {key.split(".")[2] for key in shapes if key.startswith("projections.maps.")}
    without_tensors, unlisted = [key for key in listed if key not in stored], sorted(stored - set(listed))
    if without_tensors:
        raise ValueError(f"layers lists {', '.join(without_tensors)} but the file has no projection tensors for it")
    if unlisted:
        raise ValueError(f"the file has projection tensors for {', '.join(unlisted)}, which layers does not list")
    if listed != list(family):
        raise ValueError(f"layers lists {len(listed)} layers, not the {len(family)} attn2 layers of the {base_family} "
                         f"UNet in order")
    return layers


def _checked_encoder(metadata: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> ResamplerConfig:
    """The resampler config its tensors give; every size the `encoder` field states must agree with it."""
    stated = _field(metadata, "encoder", dict)
    unknown = sorted(set(stated) - {field.name for field in fields(ResamplerConfig)})
    if unknown:
        raise ValueError(f"encoder.{unknown[0]} is not a resampler setting")
    derived = ResamplerConfig.from_shapes(
        shapes, heads=stated.get("heads", ResamplerConfig.heads),
        norm_after_projection=stated.get("norm_after_projection", ResamplerConfig.norm_after_projection),
        prefix="resampler.")
    for name, value in derived.to_dict().items():
        if name in stated and (type(stated[name]) is not type(value) or stated[name] != value):
            raise ValueError(f"encoder.{name} is {stated[name]!r} in its metadata, but its tensors give {value!r}")
    return derived


def _adapter_from(metadata: dict[str, str], shapes: dict[str, tuple[int, ...]], name: str) -> NestedAdapter:
    """The adapter the metadata describes, built on the meta device once every size in the metadata is found to agree
    with the tensors present (so nothing is built for a size only the metadata claims); raises ValueError naming the
    field or tensor."""
    base_family = _text(metadata, "base_family")
    check_family(base_family)
    if metadata.get("context_width", str(CONTEXT_WIDTH[base_family])) != str(CONTEXT_WIDTH[base_family]):
        raise ValueError(f"context_width is {metadata['context_width']!r}, but a {base_family} context is "
                         f"{CONTEXT_WIDTH[base_family]} wide")
    layers = _layer_table(metadata, base_family, shapes)
    encoder = _checked_encoder(metadata, shapes)
    clip_vision = _field(metadata, "clip_vision", dict)
    if clip_vision.get("hidden_state") not in VISION_HIDDEN_STATES:
        raise ValueError(f"clip_vision.hidden_state must be one of {VISION_HIDDEN_STATES}, "
                         f"got {clip_vision.get('hidden_state')!r}")
    if clip_vision.get("hidden_width", encoder.vision_width) != encoder.vision_width:
        raise ValueError(f"clip_vision.hidden_width is {clip_vision['hidden_width']!r} in its metadata, but its "
                         f"tensors read {encoder.vision_width}-wide CLIP vision tokens")
    vision_layers = stored_vision_layers(shapes, "vision_layers.", encoder.vision_width)
    if clip_vision.get("trained_layers", 0) != vision_layers:
        raise ValueError(f"clip_vision.trained_layers is {clip_vision['trained_layers']!r} in its metadata, but the "
                         f"file holds {vision_layers} vision layers")
    with torch.device("meta"):  # no allocation or random init: every tensor comes from the file
        adapter = NestedAdapter(
            base_family, encoder, _text(metadata, "subject_domain"), _text(metadata, "initializer_word"),
            _text(metadata, "placeholder_word"), float(_field(metadata, "special_token_weight", float, int)),
            _field(metadata, "provenance", dict), clip_vision["hidden_state"], name=name, layers=layers,
            vision_layers=vision_layers)
    problems = shape_differences({key: tuple(value.shape) for key, value in adapter.state_dict().items()}, shapes)
    if problems:
        raise ValueError(f"its tensors do not match its metadata: {'; '.join(problems)}")
    return adapter


def is_adapter_file(path: str | Path, fix: str) -> bool:
    """Whether the file is one of this pack's adapters (safetensors with its format metadata), as its content says
    whatever its name: a pickle is not one; a file that is neither, or safetensors whose header cannot be read, is
    refused (UnreadableFile) with `fix`."""
    return weights_format(path, fix) == "safetensors" and \
        read_safetensors_header(path, fix).metadata.get("format") == FORMAT_NAME


def load_nested_adapter(path: str | Path) -> NestedAdapter:
    """An adapter file, refused (UnreadableFile) unless its header, metadata and tensors all agree."""
    path = Path(path)
    header = read_safetensors_header(path, ADAPTER_FIX)
    metadata = header.metadata
    if metadata.get("format") != FORMAT_NAME:
        found = f"format {metadata['format']!r}" if "format" in metadata else \
            f"metadata keys {sorted(metadata) or 'none'} and {len(header.shapes)} tensors"
        raise UnreadableFile(path, f"it is not a nested attention adapter: found {found}, expected format "
                                   f"'{FORMAT_NAME}'", ADAPTER_FIX)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UnreadableFile(path, f"it has {FORMAT_NAME} version {metadata.get('format_version')!r}; this pack reads "
                                   f"version {FORMAT_VERSION}", ADAPTER_FIX)
    non_float = sorted(key for key, dtype in header.dtypes.items() if dtype not in ADAPTER_DTYPES)
    if non_float:
        raise UnreadableFile(path, f"tensor {non_float[0]} is {header.dtypes[non_float[0]]}, an adapter holds only "
                                   f"floating-point tensors", ADAPTER_FIX)
    try:
        adapter = _adapter_from(metadata, header.shapes, path.stem)
    except ValueError as error:  # the one place an adapter's structural problems get the file's name and the fix
        raise UnreadableFile(path, str(error), ADAPTER_FIX) from None
    adapter.load_state_dict(read_safetensors(path, ADAPTER_FIX)[1], assign=True)  # assign: keep the stored dtypes
    return adapter


def placeholder_state(base_family: str, initializer_embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subject token's input embedding per text encoder, as the adapter's `placeholder_embeddings.<l|g>` tensors;
    ValueError unless there is one embedding of the right width per text encoder of the family."""
    check_family(base_family)
    widths = TEXT_ENCODER_WIDTHS[base_family]
    if set(initializer_embeddings) != set(widths):
        raise ValueError(f"{base_family} needs initializer embeddings for text encoders {sorted(widths)}, "
                         f"got {sorted(initializer_embeddings)}")
    for name, width in widths.items():
        if initializer_embeddings[name].numel() != width:
            raise ValueError(f"the initializer embedding for text encoder {name} has "
                             f"{initializer_embeddings[name].numel()} values, expected {width}")
    return {f"placeholder_embeddings.{name}": initializer_embeddings[name].reshape(width) for name, width in widths.items()}


def assembled_adapter(base_family: str, encoder: ResamplerConfig, state: dict[str, torch.Tensor],
                      layers: list[CrossAttentionLayer], **options) -> NestedAdapter:
    """A NestedAdapter holding exactly `state`'s tensors (dtypes kept, nothing copied), built on the meta device once
    every tensor's name and shape is found to fit (for importers: an imported file fills all of it); `options`: the
    NestedAdapter's other arguments. ValueError listing the tensors that do not fit."""
    with torch.device("meta"):  # no allocation or random init: every tensor comes from `state`
        adapter = NestedAdapter(base_family, encoder, layers=layers, **options)
    problems = shape_differences({key: tuple(value.shape) for key, value in adapter.state_dict().items()},
                                 {key: tuple(tensor.shape) for key, tensor in state.items()})
    if problems:
        raise ValueError(f"its tensors do not fill a nested adapter: {'; '.join(problems)}")
    adapter.load_state_dict(state, assign=True)
    return adapter


@torch.no_grad()
def new_nested_adapter(base_family: str, vision_width: int, subject_domain: str, initializer_word: str,
                       initializer_embeddings: dict[str, torch.Tensor], initializer_context: torch.Tensor,
                       base_to_k: dict[str, torch.Tensor], base_to_v: dict[str, torch.Tensor],
                       placeholder_word: str = "<subject>", vision_hidden_state: str = "penultimate", seed: int = 0,
                       layers: list[CrossAttentionLayer] | None = None,
                       base_vision_layers: list[dict[str, torch.Tensor]] = (), **encoder_overrides) -> NestedAdapter:
    """The trainer's starting point, as close to the base model as possible: every subject token equals
    `initializer_context` (the initializer word's context vector, width D) and A_k, A_v are the base to_k, to_v,
    so the nested value of s* is the base model's value of the initializer word. `base_vision_layers`: state dicts
    of the CLIP vision layers that end at `vision_hidden_state`, copied in for fine-tuning."""
    placeholders = placeholder_state(base_family, initializer_embeddings)
    encoder = ResamplerConfig(**{"vision_width": vision_width, "output_width": CONTEXT_WIDTH[base_family],
                                 **DEFAULT_ENCODER[base_family], **encoder_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = NestedAdapter(base_family, encoder, subject_domain, initializer_word, placeholder_word,
                                vision_hidden_state=vision_hidden_state, layers=layers,
                                vision_layers=len(base_vision_layers))
    for layer, state in zip(adapter.vision_layers, base_vision_layers):
        layer.load_state_dict(state)
    resampler = adapter.resampler
    # Zero the last layers that produce tokens, so every token starts exactly at base_token.
    nn.init.zeros_(resampler.proj_out.weight)
    nn.init.zeros_(resampler.proj_out.bias)
    if encoder.identity_width is not None:
        nn.init.zeros_(resampler.identity[-1].weight)
        nn.init.zeros_(resampler.identity[-1].bias)
    if initializer_context.numel() != encoder.output_width:
        raise ValueError(f"initializer_context has {initializer_context.numel()} values, expected the "
                         f"{base_family} context width {encoder.output_width}")
    resampler.base_token.copy_(initializer_context.reshape(-1))
    adapter.projections.init_from_base(base_to_k, base_to_v)
    for key, embedding in placeholders.items():
        adapter.get_parameter(key).copy_(embedding)
    return adapter


def check_compatible(adapter: NestedAdapter, base_family: str, context_width: int, vision_width: int) -> None:
    """Raise a ValueError naming both sides when the adapter does not fit the MODEL or the CLIP vision output."""
    if adapter.base_family != base_family or adapter.context_width != context_width:
        raise ValueError(f"adapter {adapter.name} was trained for {adapter.base_family} (context "
                         f"{adapter.context_width}) but the MODEL is {base_family} (context {context_width})")
    if adapter.vision_width != vision_width:
        got = CLIP_VISION.get(vision_width, "an unknown CLIP vision model")
        raise ValueError(f"adapter {adapter.name} expects {CLIP_VISION[adapter.vision_width]} "
                         f"({adapter.vision_width}-wide tokens), got {vision_width}-wide tokens ({got}): "
                         f"load the matching CLIP vision model")


def check_layers(adapter: NestedAdapter, model_layers: list[CrossAttentionLayer]) -> None:
    """Refuse an adapter made for a UNet whose attn2 layers have other widths than this MODEL's."""
    theirs = [(layer.key, layer.inner_dim) for layer in adapter.layers]
    ours = [(layer.key, layer.inner_dim) for layer in model_layers]
    if theirs != ours:
        first = next((a, b) for a, b in zip(theirs, ours) if a != b) if len(theirs) == len(ours) else (theirs, ours)
        raise ValueError(f"adapter {adapter.name} was made for a UNet whose attn2 layers differ from this MODEL's "
                         f"(first difference, adapter vs model: {first}); use an adapter made for this model")
