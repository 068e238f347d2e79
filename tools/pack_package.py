"""Register the pack's folder as the package `subject_personalization`, without running its `__init__`.

The folder's name is whatever the user cloned it as, and ComfyUI has top-level modules called `nodes` and
`utils`, so scripts and tests never put the pack root on sys.path; they import `subject_personalization.*`.
"""
import importlib.machinery
import os
import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_NAME = "subject_personalization"


def register_pack() -> None:
    if PACKAGE_NAME in sys.modules:
        return
    package = types.ModuleType(PACKAGE_NAME)
    package.__path__ = [str(PACK_ROOT)]
    package.__spec__ = importlib.machinery.ModuleSpec(PACKAGE_NAME, None, is_package=True)
    package.__spec__.submodule_search_locations = [str(PACK_ROOT)]
    sys.modules[PACKAGE_NAME] = package


def comfyui_from_command_line(argv: list[str], purpose: str) -> str:
    """The ComfyUI checkout a `python -m <command>` of the pack runs on: `--comfyui PATH`, else $COMFYUI_PATH; the
    process exits naming both and what ComfyUI is needed for when neither is given."""
    comfyui = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--comfyui"), os.environ.get("COMFYUI_PATH"))
    if not comfyui:
        sys.exit(f"set COMFYUI_PATH or pass --comfyui: {purpose}")
    return comfyui
