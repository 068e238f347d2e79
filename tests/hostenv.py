"""The host tier's precondition, checked at the top of every host-tier module before heavy imports."""
import os
import re
from pathlib import Path

import pytest

REQUIRE_HOST = "SUBJECT_PERSONALIZATION_REQUIRE_HOST"  # set (CI does): a skipped host test fails the run
# The ComfyUI releases the host tier runs against (../shared/hosts), oldest to newest: the README's supported range.
# The newest gets every test; the others the compatibility subset (marker `compat`, tests/pytest.ini).
TESTED_VERSIONS = ("0.8.0", "0.33.0")
REASON = ("COMFYUI_PATH is not set: host-tier tests need a ComfyUI checkout with its requirements installed "
          "(tools/setup_comfyui.sh makes one)")


def require_comfyui() -> str:
    """COMFYUI_PATH, or skip the calling module with the reason printed in the summary."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(REASON, allow_module_level=True)
    # Absolute from here on, for this process and the ones it starts: servers and scripts run in folders of their own.
    os.environ["COMFYUI_PATH"] = path = str(Path(path).resolve())
    return path


def comfyui_version(path: str | Path) -> str:
    """The version of the ComfyUI at path, read from its comfyui_version.py (without importing ComfyUI)."""
    text = (Path(path) / "comfyui_version.py").read_text()
    return re.search(r"""__version__\s*=\s*["']([^"']+)""", text)[1]
