"""The host tier's precondition, checked at the top of every host-tier module before heavy imports."""
import os

import pytest

REQUIRE_HOST = "SUBJECT_PERSONALIZATION_REQUIRE_HOST"  # set (CI does): a skipped host test fails the run
REASON = ("COMFYUI_PATH is not set: host-tier tests need a ComfyUI checkout with its requirements installed "
          "(tools/setup_comfyui.sh makes one)")


def require_comfyui() -> str:
    """COMFYUI_PATH, or skip the calling module with the reason printed in the summary."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(REASON, allow_module_level=True)
    return path
