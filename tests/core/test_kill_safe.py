"""encoders/kill_safe.py: a write killed at any moment leaves the old file whole under its name, and the kill points
fire only where the environment names them (each test kills a process of its own)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from subject_personalization.encoders.kill_safe import KILL_AT, KILL_RECORD, kill_point, written_beside

# A process that writes `new` over the target through written_beside, as the pack's writers do.
WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import conftest
from subject_personalization.encoders.kill_safe import written_beside
with written_beside(Path(sys.argv[1])) as partial:
    partial.write_bytes(sys.argv[2].encode() * 1000)
"""


def write_in_a_process(target: Path, content: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER.format(tests=str(Path(__file__).resolve().parents[1])),
                           str(target), content], env={**os.environ, **environment}, capture_output=True, text=True,
                          timeout=120)


def test_a_write_killed_before_its_rename_leaves_the_old_file_and_the_next_write_replaces_both(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"old" * 1000)
    killed = write_in_a_process(target, "new", **{KILL_AT: "write:adapter.safetensors"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert target.read_bytes() == b"old" * 1000
    partial = tmp_path / "adapter.safetensors.partial"
    assert partial.read_bytes() == b"new" * 500, "the partial file is cut to half, as a kill during the write leaves it"
    assert write_in_a_process(target, "new").returncode == 0
    assert target.read_bytes() == b"new" * 1000 and not partial.exists()


def test_a_kill_point_fires_once_per_record_and_only_for_its_rank(tmp_path):
    target, record = tmp_path / "loss.csv", tmp_path / "killed"
    target.write_bytes(b"old")
    for rank, fired in (("1", False), ("0", True)):
        done = write_in_a_process(target, "x", RANK=rank, **{KILL_AT: "write:loss.csv/rank0", KILL_RECORD: str(record)})
        assert (done.returncode == -signal.SIGKILL) == fired and (target.read_bytes() == b"old") == fired
        target.write_bytes(b"old")
    assert record.read_text() == "write:loss.csv/rank0"
    done = write_in_a_process(target, "y", RANK="0", **{KILL_AT: "write:loss.csv/rank0", KILL_RECORD: str(record)})
    assert done.returncode == 0 and target.read_bytes() == b"y" * 1000, "once recorded, the point lets the run go on"


def test_a_write_that_raises_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with written_beside(target) as partial:
            partial.write_text("new, half")
            raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_without_the_environment_a_kill_point_does_nothing(monkeypatch):
    monkeypatch.delenv(KILL_AT, raising=False)
    kill_point("step@1")
    monkeypatch.setenv(KILL_AT, "step@2")
    kill_point("step@1")
