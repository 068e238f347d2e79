"""A checkpoint's files on disk: which checkpoint a run resumes from, and the training state it reads back.

A checkpoint is three files, each written beside its name and renamed into place (encoders/kill_safe.py), in this
order: the adapter `step_N.safetensors`, its training state `step_N.state.pt`, and `step_N.manifest.json`, which
records both files' sizes and SHA-256. The manifest is written last, so a checkpoint counts as written once it is
there: a kill before it leaves a checkpoint that `latest_complete_checkpoint` skips, and a file changed after it (a
copy cut short, a disk error) no longer matches it.
"""
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..encoders.checkpoint_io import UnreadableFile, read_json, read_pickle, shape_differences
from ..encoders.kill_safe import written_beside

STATE_KEYS = ("step", "adapter", "optimizer", "scheduler", "scaler", "ema")
RESUME_FIX = "resume from an earlier checkpoint of this run (its .state.pt beside it), or start the run again"


def state_file(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".state.pt")


def manifest_file(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".manifest.json")


def _file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(checkpoint: Path, step: int) -> None:
    """The checkpoint's last file: its step, and the size and hash of its adapter file and training state."""
    files = {path.name: _file_record(path) for path in (checkpoint, state_file(checkpoint))}
    with written_beside(manifest_file(checkpoint)) as partial:
        partial.write_text(json.dumps({"step": step, "files": files}, indent=1))


def incomplete(checkpoint: Path) -> str | None:
    """Why the checkpoint cannot be resumed from as it is on disk, or None when its manifest vouches for its files."""
    manifest = manifest_file(checkpoint)
    if not manifest.is_file():
        return (f"it has no {manifest.name}: its writing was interrupted (or an earlier version of the pack, which "
                f"wrote none, wrote it: give its path to --resume)")
    try:
        listed = read_json(manifest)
    except UnreadableFile as error:
        return f"its {manifest.name} is unreadable: {error.problem}"
    expected_names = {checkpoint.name, state_file(checkpoint).name}
    if not (isinstance(listed, dict) and isinstance(listed.get("files"), dict) and set(listed["files"]) == expected_names):
        return f"its {manifest.name} does not list {' and '.join(sorted(expected_names))}"
    for name, expected in listed["files"].items():
        path = checkpoint.parent / name
        if not path.is_file():
            return f"{name} is missing"
        if _file_record(path) != expected:
            return f"{name} is not the file its manifest recorded (changed or cut short after it was written)"
    return None


def latest_complete_checkpoint(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in folder that is complete, and for each newer one skipped, its name and why."""
    skipped = []
    for checkpoint in sorted(folder.glob("step_*.safetensors"), reverse=True):
        problem = incomplete(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"{checkpoint.name}: {problem}")
    return None, skipped


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
