"""Training configuration: one dataclass, read from a TOML or JSON file, overridable from the command line."""
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..encoders.checkpoint_io import UnreadableFile, read_json, read_toml

ATTENTION_FORMS = ("nested", "decoupled")  # train/objective.py: the subject gated by its token, or IP-Adapter's ungated
CONFIG_FIX = "correct the file: TOML (.toml) or JSON (any other name); train/config.py lists the options"


@dataclass
class TrainConfig:
    data: str = ""                          # dataset folder holding metadata.jsonl (see docs/training.md)
    output: str = "nested_attention_run"    # run folder: checkpoints, loss log, validation grids, encodings cache
    encodings: str = ""                     # where the encoder outputs are cached ("" = <output>/encodings)
    checkpoint: str = ""                    # base model: a ComfyUI checkpoint file (SD1.5 or SDXL), frozen
    clip_vision: str = ""                   # CLIP vision file (ViT-L/14 or ViT-H/14), frozen
    initializer_word: str = "person"        # the subject token starts as this word
    subject_domain: str = "person"
    vision_model: str = "ViT-L/14"
    encoder: dict = field(default_factory=dict)   # resampler overrides: num_queries, depth, width, heads
    init_from: str = ""                     # start from an IP-Adapter Plus file or an adapter file ("" = fresh)
    train_vision_layers: int = 0            # fine-tune copies of the last N CLIP vision layers (kept in the adapter)
    vision_learning_rate: float = 1e-5      # their learning rate (they start trained; the rest starts fresh)
    resolution: int = 512
    batch_size: int = 4                     # per process
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_steps: int = 10000
    seed: int = 0
    mixed_precision: str = "no"             # no | bf16 | fp16
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0                  # 0: no EMA; e.g. 0.999
    attention: str = "nested"               # nested | decoupled: IP-Adapter's ungated form, saved as IP-Adapter Plus
    subject_dropout: float = 0.1            # per subject, for classifier-free guidance on the subject
    localization_weight: float = 0.0        # FastComposer's balanced localisation loss (needs masks); 1e-3 in the paper
    masked_loss_probability: float = 0.0    # chance per image that the denoising loss counts only subject pixels
    reference_background: str = "black"     # derived references: the subject on this plain background
    checkpoint_every: int = 1000
    log_every: int = 10
    validate_every: int = 0                 # 0: no validation
    validation: list = field(default_factory=list)  # [{prompt, word, reference}], rendered through the nodes' patch
    validation_steps: int = 20
    device: str = ""                        # "" = cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"attention must be {' or '.join(ATTENTION_FORMS)}, got {self.attention!r}")
        if self.attention == "decoupled" and self.localization_weight > 0:
            raise ValueError(f"localization_weight is {self.localization_weight}, but attention = 'decoupled' adds the "
                             f"subject to every query: no subject token's attention to localise; set "
                             f"localization_weight = 0, or attention = 'nested'")
        if self.attention == "decoupled" and self.train_vision_layers:
            raise ValueError(f"train_vision_layers is {self.train_vision_layers}, but attention = 'decoupled' writes "
                             f"IP-Adapter Plus files, which hold no CLIP vision layers: set train_vision_layers = 0, or "
                             f"attention = 'nested'")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The file's values (TOML or JSON), then `key=value` overrides (values parsed as JSON when they can be)."""
    values = {}
    if path:
        values = read_toml(path, CONFIG_FIX) if str(path).endswith(".toml") else read_json(path, CONFIG_FIX)
        if not isinstance(values, dict):
            raise UnreadableFile(path, f"it holds a {type(values).__name__}, expected a table of options", CONFIG_FIX)
        if not values:  # an empty or all-comment file: every default, silently, is never what was meant
            raise UnreadableFile(path, "it sets no option", "write in it the options the run needs (data, checkpoint, "
                                                            "clip_vision at least; train/config.py lists them), or "
                                                            "leave out --config and give them with --set")
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator:
            raise ValueError(f"override {override!r} is not key=value")
        try:
            values[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            values[key.strip()] = value
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values)


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
