"""One fixed way for every test to import the pack: as the package `subject_personalization`.

The pack's folder name is whatever the user cloned it as, and ComfyUI has a top-level module
called `nodes`, so tests never put the pack root on sys.path. Instead the root is registered
as a package without running its `__init__` (which needs ComfyUI); subpackages then import
normally: `from subject_personalization.attention import ...`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from pack_package import register_pack  # noqa: E402

register_pack()
# Independent reference implementations used by the tests live in tests/reference/.
sys.path.insert(0, str(Path(__file__).resolve().parent))
