"""Files that a kill at any moment cannot leave half-written, and the named moments where tests kill to prove it.

`written_beside(target)`: the content goes to `<target name>.partial` in the target's folder, is flushed to the disk,
and is renamed onto the target (a rename within one folder is atomic on POSIX and on Windows). A reader, a later run
or a kill at any moment finds the old file or the new one under the target's name, never part of one; `.partial` is
no suffix that any loader lists or globs. A write that raises removes its partial file; one that is killed leaves it,
and the next write of the same target replaces it.

`kill_point(name)`: the process kills itself (SIGKILL, no clean-up of any kind) at the moment `name` when the
environment variable SUBJECT_PERSONALIZATION_KILL_AT says `name`, or `name/rank<N>` for the process of that rank
under torchrun. With SUBJECT_PERSONALIZATION_KILL_RECORD set to a path, it kills only while that file does not exist,
and writes the moment's name there first: once per run however often torchrun restarts it, and on the record. Unset
(always, outside the tests), a point costs one lookup in the environment. The points are:
- `write:<file name>` in every `written_beside`, after the content is on disk under the partial name: the partial
  file is cut to half its length first, as a kill during the write leaves it;
- the trainer's `checkpoint-start@<step>`, `checkpoint-between@<step>` (adapter file in place, training state not),
  `step@<step>` (gradients computed, weights not updated) and `validation@<step>` (images sampled, grid not written).
"""
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

KILL_AT = "SUBJECT_PERSONALIZATION_KILL_AT"
KILL_RECORD = "SUBJECT_PERSONALIZATION_KILL_RECORD"


def kill_point(name: str, partial: Path | None = None) -> None:
    """Kill this process here if the environment names this moment (module docstring); `partial`: cut it to half first."""
    chosen = os.environ.get(KILL_AT)
    if chosen is None or chosen not in (name, f"{name}/rank{os.environ.get('RANK', '0')}"):
        return
    record = os.environ.get(KILL_RECORD)
    if record:
        if os.path.exists(record):
            return
        Path(record).write_text(chosen)
    if partial is not None:
        os.truncate(partial, partial.stat().st_size // 2)
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # Windows has no SIGKILL; TERMINATE is as hard


@contextmanager
def written_beside(path: str | Path) -> Iterator[Path]:
    """The partial file to write `path`'s new content to; renamed onto `path` when the block ends, removed if it
    raises."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.partial")
    try:
        yield partial
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())  # the bytes on the disk before the name points at them
        kill_point(f"write:{path.name}", partial)
        os.replace(partial, path)
        _flush_folder(path.parent)
    finally:
        partial.unlink(missing_ok=True)


def _flush_folder(folder: Path) -> None:
    """The rename itself on the disk (POSIX; Windows cannot open a folder, and commits renames with the file system's
    journal)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
