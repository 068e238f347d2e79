"""One fixed way for every test to import the pack: as the package `subject_personalization`.

The pack's folder name is whatever the user cloned it as, and ComfyUI has a top-level module
called `nodes`, so tests never put the pack root on sys.path. Instead the root is registered
as a package without running its `__init__` (which needs ComfyUI); subpackages then import
normally: `from subject_personalization.attention import ...`.

With SUBJECT_PERSONALIZATION_REQUIRE_HOST set (CI sets it), any skipped test of a real part (the host tier, the
Python 3.10 compile check) fails the run.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from pack_package import register_pack  # noqa: E402

register_pack()
# Independent reference implementations used by the tests live in tests/reference/.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostenv import REQUIRE_HOST  # noqa: E402

pytest_plugins = ["failed_fixtures", "pytester"]

# The tests of real parts: the host tier, the real Python 3.10 that the pack must compile on, and insightface.
REQUIRED_IN_CI = ("host/", "core/test_python_versions.py", "core/test_subject_preparation.py")
_host_skips: list[str] = []


def _note_host_skip(report) -> None:
    if report.skipped and report.nodeid.startswith(REQUIRED_IN_CI):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _host_skips.append(f"{report.nodeid}: {reason}")


def pytest_addoption(parser) -> None:
    parser.addoption("--compat", action="store_true",
                     help="the compatibility subset for an older ComfyUI: the tests marked compat or browser, each "
                          "workflow executed once (tests/pytest.ini)")


# Host modules that need much memory of their own run first among the host tests, while this process holds least (a
# long session keeps gigabytes that no tensor accounts for): the FastComposer exactness module (its own full-size models
# and float64 references: 21 GB at its peak), the SDXL workflow's server in a subprocess (23 GB with this process when
# it ran after the others) and the training command's torchrun test (two workers holding SD1.5, 12 GB; beside
# test_trainer.py's models and after the others, a clean-clone CI run was killed there). CI's machine has 24 GB.
RUN_FIRST = ("host/test_fastcomposer_exactness.py::", "host/test_official_sdxl_workflow.py::", "host/test_training_command.py::")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("compat"):
        kept = [item for item in items if item.get_closest_marker("compat") or item.get_closest_marker("browser")]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
    first = [item for item in items if item.nodeid.startswith(RUN_FIRST)]
    rest = [item for item in items if item not in first]
    host = next((number for number, item in enumerate(rest) if item.nodeid.startswith("host/")), len(rest))
    items[:] = rest[:host] + first + rest[host:]


pytest_collectreport = _note_host_skip
pytest_runtest_logreport = _note_host_skip


def pytest_terminal_summary(terminalreporter) -> None:
    if _host_skips and os.environ.get(REQUIRE_HOST):
        terminalreporter.section(f"{REQUIRE_HOST} is set: skipped host tests fail the run", red=True)
        for line in _host_skips:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session) -> None:
    if _host_skips and os.environ.get(REQUIRE_HOST):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
