"""The pack imports on every Python ComfyUI supports (3.10 and up, pyproject's requires-python): its code uses nothing
newer than 3.10 (vermin, a static check of syntax, modules and functions by version), and a real 3.10 compiles it."""
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
OLDEST_PYTHON = "3.10"
# What ComfyUI imports or the user runs; the tests run on the CI's Python and may use what it has.
SHIPPED = ["__init__.py", "attention", "encoders", "nodes", "tools", "train", "study", "bench"]
VERMIN = [str(Path(sys.executable).with_name("vermin")), f"--target={OLDEST_PYTHON}-", "--violations", "--no-tips"]


def test_requires_python_is_the_oldest_python_comfyui_supports():
    assert f'requires-python = ">={OLDEST_PYTHON}"' in (PACK_ROOT / "pyproject.toml").read_text()


def test_nothing_the_pack_ships_needs_a_python_newer_than_3_10():
    done = subprocess.run([*VERMIN, "--eval-annotations", *SHIPPED], cwd=PACK_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_vermin_does_catch_a_3_11_module(tmp_path):
    """The check above can fail: an unguarded tomllib import is reported."""
    (tmp_path / "uses_tomllib.py").write_text("import tomllib\n")
    done = subprocess.run([*VERMIN, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "tomllib" in done.stdout


def python_3_10() -> str | None:
    """A Python 3.10 interpreter on this machine: pyenv's, or one on the PATH (a pyenv shim runs only when selected)."""
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{OLDEST_PYTHON}.*/bin/python")))
    candidates += [found for found in [shutil.which(f"python{OLDEST_PYTHON}")] if found]
    for candidate in candidates:
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                               text=True)
        if probe.returncode == 0 and probe.stdout.strip() == f"({OLDEST_PYTHON.replace('.', ', ')})":
            return candidate
    return None


def test_a_real_python_3_10_compiles_every_file(tmp_path):
    interpreter = python_3_10()
    if interpreter is None:
        pytest.skip(f"no Python {OLDEST_PYTHON} interpreter on this machine (PATH or pyenv); the vermin check stands")
    files = [str(path) for path in sorted(PACK_ROOT.rglob("*.py")) if ".ci-work" not in path.parts and
             ".venv" not in path.parts]
    # compile() only: the byte code goes nowhere, the checkout stays clean
    done = subprocess.run([interpreter, "-c", "import sys\nfor name in sys.argv[1:]:\n"
                           "    compile(open(name, encoding='utf-8').read(), name, 'exec')", *files],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
