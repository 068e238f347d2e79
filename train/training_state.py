"""The training state a checkpoint carries beside it (`step_N.state.pt`): what resuming reads back, checked first."""
from pathlib import Path

import torch
from torch import nn

from ..encoders.checkpoint_io import UnreadableFile, read_pickle, shape_differences

STATE_KEYS = ("step", "adapter", "optimizer", "scheduler", "scaler", "ema")
RESUME_FIX = "resume from an earlier checkpoint of this run (its .state.pt beside it), or start the run again"


def state_file(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".state.pt")


def read_training_state(path: Path, adapter: nn.Module) -> dict:
    """The state written with a checkpoint, read weights-only: every entry present and of its kind, the step a count,
    the adapter's tensors those of this run's adapter, the optimizer's state in torch's layout."""
    state = read_pickle(path, RESUME_FIX)
    if not isinstance(state, dict):
        raise UnreadableFile(path, f"it holds a {type(state).__name__}, expected a dict of training state", RESUME_FIX)
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise UnreadableFile(path, f"it lacks {', '.join(missing)}: it is not a training state", RESUME_FIX)
    if not (type(state["step"]) is int and state["step"] >= 0):
        raise UnreadableFile(path, f"its step is {state['step']!r}, not a count of steps", RESUME_FIX)
    weights = state["adapter"]
    if not (isinstance(weights, dict) and all(isinstance(value, torch.Tensor) for value in weights.values())):
        raise UnreadableFile(path, "its adapter entry is not a dict of tensors", RESUME_FIX)
    problems = shape_differences({f"adapter.{key}": tuple(value.shape) for key, value in adapter.state_dict().items()},
                                 {f"adapter.{key}": tuple(value.shape) for key, value in weights.items()})
    if problems:
        raise UnreadableFile(path, f"it was written for another adapter than this run's: {'; '.join(problems)}",
                             RESUME_FIX)
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise UnreadableFile(path, "its optimizer entry is not an optimizer state (state, param_groups)", RESUME_FIX)
    for key in ("scheduler", "scaler"):
        if not isinstance(state[key], dict):
            raise UnreadableFile(path, f"its {key} entry is a {type(state[key]).__name__}, expected a dict", RESUME_FIX)
    if not (state["ema"] is None or isinstance(state["ema"], dict)):
        raise UnreadableFile(path, f"its ema entry is a {type(state['ema']).__name__}, expected a dict or None",
                             RESUME_FIX)
    return state
