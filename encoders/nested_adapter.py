"""The Nested Attention adapter checkpoint: subject encoder + nested projections + placeholder token, in one file.

File format: safetensors. Tensors are the `NestedAdapter` state dict (`resampler.*`, `projections.maps.<layer>.to_{k,v}
.weight`, `placeholder_embeddings.{l,g}`). Metadata (all strings; structured values are JSON):
  format, format_version     "nested_attention_adapter", "1"
  base_family, context_width "sd15" | "sdxl", "768" | "2048"
  layers                     [{"key", "inner_dim", "heads"}] of every attn2 layer (see unet_layers.py)
  encoder                    ResamplerConfig as a dict
  clip_vision                {"name": "ViT-L/14", "hidden_width": 1024, "hidden_state": "penultimate" | "last",
                              "trained_layers": N}: the adapter carries its own copies (`vision_layers.*`) of the
                              N CLIP vision layers that end at hidden_state, and is fed the hidden state before them
  subject_domain, initializer_word, placeholder_word, special_token_weight
  provenance                 free dict: dataset, steps, base checkpoint hash, ...
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint_io import looks_like_pickle
from .nested_projections import NestedProjections
from .subject_resampler import ResamplerConfig, SubjectResampler
from .unet_layers import CONTEXT_WIDTH, CrossAttentionLayer, check_family, cross_attention_layers
from .vision_layers import VisionLayer, run_vision_layers

FORMAT_NAME = "nested_attention_adapter"
FORMAT_VERSION = "1"
CLIP_VISION = {1024: "ViT-L/14", 1280: "ViT-H/14"}
VISION_HIDDEN_STATES = ("penultimate", "last")  # ComfyUI's penultimate_hidden_states / last_hidden_state
TEXT_ENCODER_WIDTHS = {"sd15": {"l": 768}, "sdxl": {"l": 768, "g": 1280}}
# The resampler's internal width per family when the trainer does not override it.
DEFAULT_ENCODER = {"sd15": {"width": 768, "heads": 12}, "sdxl": {"width": 1280, "heads": 20}}


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
        self.base_family = base_family
        self.vision_hidden_state = vision_hidden_state  # which CLIP_VISION output the encoder was trained on
        self.subject_domain = subject_domain
        self.initializer_word = initializer_word
        self.placeholder_word = placeholder_word
        self.special_token_weight = special_token_weight
        self.provenance = dict(provenance or {})
        self.name = name
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
    tensors = {key: tensor.detach().contiguous() for key, tensor in adapter.state_dict().items()}
    save_file(tensors, str(path), metadata=adapter.metadata())


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if looks_like_pickle(path):
        raise ValueError(f"{path.name} is a PyTorch pickle; a nested attention adapter is read only from a "
                         f".safetensors file with '{FORMAT_NAME}' metadata (pickles can run code when loaded)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path.name} is not a safetensors file ({error}); expected a nested attention "
                         f"adapter (.safetensors with '{FORMAT_NAME}' metadata)") from error


def load_nested_adapter(path: str | Path) -> NestedAdapter:
    path = Path(path)
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT_NAME:
        found = f"format {metadata['format']!r}" if "format" in metadata else \
            f"metadata keys {sorted(metadata) or 'none'} and {len(tensors)} tensors"
        raise ValueError(f"{path.name} is not a nested attention adapter: found {found}, expected format "
                         f"'{FORMAT_NAME}' (the official demo checkpoint must be converted first: "
                         f"encoders/official_nested_import.py)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path.name} has {FORMAT_NAME} version {metadata.get('format_version')!r}; "
                         f"this pack reads version {FORMAT_VERSION}")
    blocks = {layer.key: layer.block for layer in cross_attention_layers(metadata["base_family"])}
    try:
        layers = [CrossAttentionLayer(entry["key"], blocks[entry["key"]], entry["inner_dim"], entry["heads"])
                  for entry in json.loads(metadata["layers"])]
    except KeyError as error:
        raise ValueError(f"{path.name}: layer {error} is not an attn2 layer of the {metadata['base_family']} UNet") from None
    clip_vision = json.loads(metadata["clip_vision"])
    with torch.device("meta"):  # no allocation or random init: every tensor comes from the file
        try:
            adapter = NestedAdapter(
                metadata["base_family"], ResamplerConfig.from_dict(json.loads(metadata["encoder"])),
                metadata["subject_domain"], metadata["initializer_word"], metadata["placeholder_word"],
                float(metadata["special_token_weight"]), json.loads(metadata["provenance"]),
                clip_vision["hidden_state"], name=path.stem, layers=layers,
                vision_layers=clip_vision.get("trained_layers", 0))
        except ValueError as error:
            raise ValueError(f"{path.name}: {error}") from None
    try:
        adapter.load_state_dict(tensors, assign=True)  # assign: keep the stored tensors (and dtype) as they are
    except RuntimeError as error:
        raise ValueError(f"{path.name}: its tensors do not match its own metadata ({error})") from error
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
    check_family(base_family)
    widths = TEXT_ENCODER_WIDTHS[base_family]
    if set(initializer_embeddings) != set(widths):
        raise ValueError(f"{base_family} needs initializer embeddings for text encoders {sorted(widths)}, "
                         f"got {sorted(initializer_embeddings)}")
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
    for encoder_name, width in widths.items():
        adapter.placeholder_embeddings[encoder_name].copy_(initializer_embeddings[encoder_name].reshape(width))
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
