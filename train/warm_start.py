"""The adapter a run starts from: fresh (it behaves like the initializer word), or the weights of `init_from`.

`init_from` is an IP-Adapter Plus file (docs/methods.md §2.5: its resampler and per-layer to_k_ip/to_v_ip maps are a nested
adapter's encoder and projections) or an adapter file of this pack. Training then starts from those weights: the
resampler (with its base token), the per-layer projections and any fine-tuned CLIP vision layers. The file's sizes
define the resampler, so the config's `encoder` overrides must agree with them, and the file's CLIP vision model must
be the config's `vision_model`; anything else is refused, naming the option to change. The subject token's embedding
stays this run's initializer word's (the cached prompt encodings depend on it), as in a fresh start. With
`train_vision_layers` set and a file that carries no CLIP vision layers, copies of the base CLIP vision model's last
layers are added, which reproduce its hidden state, so the first step still computes what the file computes.
"""
from pathlib import Path

import torch
from torch import nn

from ..encoders.ipadapter_plus import load_ip_adapter_plus
from ..encoders.nested_adapter import CLIP_VISION, NestedAdapter, check_layers, is_adapter_file, load_nested_adapter
from ..encoders.vision_layers import VisionLayer
from ..nodes.base_model import model_cross_attention_layers, model_family
from ..nodes.nested_adapter_nodes import fresh_adapter, initializer_vectors, last_vision_layers
from .config import TrainConfig

INIT_FIX = ("set init_from to an IP-Adapter Plus file (models/ipadapter/) or an adapter file of this pack "
            "(models/nested_attention/), or leave it empty for a fresh start")


def starting_adapter(config: TrainConfig, base) -> NestedAdapter:
    """A fresh adapter for the base model, or `config.init_from`'s weights checked against the run (see module)."""
    if not config.init_from:
        return fresh_adapter(base.model, base.clip, config.initializer_word, config.vision_model, config.subject_domain,
                             config.seed, base.clip_vision, config.train_vision_layers, **config.encoder)
    return warm_start_adapter(config, base)


@torch.no_grad()
def warm_start_adapter(config: TrainConfig, base) -> NestedAdapter:
    path = Path(config.init_from)
    embeddings, _ = initializer_vectors(base.clip, config.initializer_word)
    if is_adapter_file(path, INIT_FIX):
        adapter = load_nested_adapter(path)
    else:
        adapter = load_ip_adapter_plus(path, config.initializer_word, embeddings, config.subject_domain)
    start = f"init_from {path.name}"
    family = model_family(base.model)
    if adapter.base_family != family:
        raise ValueError(f"{start} is for {adapter.base_family}, but the checkpoint is {family}: give a starting file "
                         f"for {family}, or the {adapter.base_family} checkpoint")
    try:
        check_layers(adapter, model_cross_attention_layers(base.model))
    except ValueError as error:
        raise ValueError(f"{start}: {error}") from None
    vision = CLIP_VISION[adapter.vision_width]
    if config.vision_model != vision:
        raise ValueError(f"{start} reads {vision} tokens, but the config says vision_model = {config.vision_model!r}: "
                         f"set vision_model = {vision!r} and clip_vision to that CLIP vision model")
    encoder = adapter.resampler.config
    for name, value in config.encoder.items():
        if not hasattr(encoder, name) or getattr(encoder, name) != value:
            held = f"has encoder.{name} = {getattr(encoder, name)!r}" if hasattr(encoder, name) else \
                f"has no encoder setting {name!r}"
            raise ValueError(f"{start} {held}, but the config sets it to {value!r}: the file's resampler defines the "
                             f"encoder, so remove encoder.{name} from the config (or set it to the file's value)")
    carried = len(adapter.vision_layers)
    if carried and carried != config.train_vision_layers:
        raise ValueError(f"{start} carries {carried} fine-tuned CLIP vision layers: set train_vision_layers = {carried}")
    if not carried and config.train_vision_layers:
        adapter.vision_layers = nn.ModuleList(VisionLayer(adapter.vision_width) for _ in range(config.train_vision_layers))
        for layer, state in zip(adapter.vision_layers, last_vision_layers(base.clip_vision, config.train_vision_layers)):
            layer.load_state_dict(state)
    for key, embedding in embeddings.items():  # this run's subject token, whatever the file's was
        adapter.placeholder_embeddings[key] = nn.Parameter(embedding.clone(), requires_grad=False)
    adapter.initializer_word, adapter.subject_domain = config.initializer_word, config.subject_domain
    return adapter
