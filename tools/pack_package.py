"""Register the pack's folder as the package `subject_personalization`, without running its `__init__`.

The folder's name is whatever the user cloned it as, and ComfyUI has top-level modules called `nodes` and
`utils`, so scripts and tests never put the pack root on sys.path; they import `subject_personalization.*`.
"""
import importlib.machinery
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
