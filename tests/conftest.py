"""One fixed way for every test to import the pack: as the package `subject_personalization`.

The pack's folder name is whatever the user cloned it as, and ComfyUI has a top-level module
called `nodes`, so tests never put the pack root on sys.path. Instead the root is registered
as a package without running its `__init__` (which needs ComfyUI); subpackages then import
normally: `from subject_personalization.attention import ...`.
"""
import importlib.machinery
import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_NAME = "subject_personalization"


def _register_pack() -> None:
    if PACKAGE_NAME in sys.modules:
        return
    package = types.ModuleType(PACKAGE_NAME)
    package.__path__ = [str(PACK_ROOT)]
    package.__spec__ = importlib.machinery.ModuleSpec(PACKAGE_NAME, None, is_package=True)
    package.__spec__.submodule_search_locations = [str(PACK_ROOT)]
    sys.modules[PACKAGE_NAME] = package


_register_pack()
# Independent reference implementations used by the tests live in tests/reference/.
sys.path.insert(0, str(Path(__file__).resolve().parent))
