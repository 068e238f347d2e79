"""The README's two fresh-machine commands, read from the README and run exactly as written, relative paths included.

They run from a copy of the pack with `../ComfyUI` beside it: a copy of the ComfyUI under test whose `.venv` is this
environment, which is what a first run of the set-up command leaves behind (CI's own set-up makes that first run from
the source archive). So each command sets up what is missing, reusing the rest, and then does its job: the main job's
self-check, and the tests. The tests' command runs the whole suite as written; PYTEST_ADDOPTS, pytest's own way of
adding options, narrows it to one host test, since this test is itself part of that suite.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostenv import require_comfyui

COMFYUI_PATH = Path(require_comfyui())
PACK_ROOT = Path(__file__).resolve().parents[2]
SECTION = "## On a fresh machine: two commands"
ONE_HOST_TEST = "test_comfyui_reads_the_supported_range_from_pyproject"
# What a ComfyUI folder holds at its top besides its source: a user's data and environment, and this pack's link.
NOT_SOURCE = {".venv", ".git", "custom_nodes", "models", "input", "output", "temp", "user"}


def readme_commands() -> list[str]:
    """The command lines of the first code block under the fresh-machine heading."""
    text = (PACK_ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def pack_files() -> list[str]:
    """The pack's files as a clone has them (and the ones not yet committed)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PACK_ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (PACK_ROOT / name).is_file()]


@pytest.fixture(scope="module")
def fresh_machine(tmp_path_factory) -> Path:
    """<tmp>/subject-personalization (the pack) beside <tmp>/ComfyUI (set up once, its .venv this environment)."""
    root = tmp_path_factory.mktemp("fresh_machine")
    pack = root / "subject-personalization"
    for name in pack_files():
        (pack / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACK_ROOT / name, pack / name)
    comfyui = root / "ComfyUI"
    shutil.copytree(COMFYUI_PATH, comfyui, ignore=lambda folder, names: [
        name for name in names if name == "__pycache__" or (Path(folder) == COMFYUI_PATH and name in NOT_SOURCE)])
    (comfyui / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return pack


def run_as_written(command: str, pack: Path, **environment: str) -> subprocess.CompletedProcess:
    scratch = pack.parent / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "COMFYUI_PATH"}  # the command sets it
    return subprocess.run(["bash", "-c", command], cwd=pack, capture_output=True, text=True, timeout=1500,
                          stdin=subprocess.DEVNULL, env={**env, "TMPDIR": str(scratch), **environment})


def test_the_readme_gives_two_commands_that_set_up_and_then_run():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert all(command.startswith("tools/setup_comfyui.sh ../ComfyUI") for command in commands), commands
    assert "tools/run_workflow.py workflows/" in commands[0] and "-m pytest tests" in commands[1]


def test_the_main_job_command_runs_its_self_check_headless(fresh_machine):
    done = run_as_written(readme_commands()[0], fresh_machine)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    assert "ComfyUI already in" in done.stdout and "is ready in" in done.stdout, done.stdout[-3000:]
    assert (fresh_machine.parent / "ComfyUI" / "custom_nodes" / fresh_machine.name).resolve() == fresh_machine
    assert "SELF-CHECK on seeded random weights (not installed: models/fastcomposer/pytorch_model.bin)" in done.stdout
    from PIL import Image
    images = sorted((fresh_machine / "output").glob("selfcheck_*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (64, 64)
    assert not any((fresh_machine.parent / "tmp").glob("subject_personalization_selfcheck_*")), \
        "the self-check left its weights behind"


def test_the_tests_command_runs_the_tests(fresh_machine):
    done = run_as_written(readme_commands()[1], fresh_machine, PYTEST_ADDOPTS=f"-k {ONE_HOST_TEST} -p no:cacheprovider")
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    assert re.search(r"\b1 passed\b", done.stdout) and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]
