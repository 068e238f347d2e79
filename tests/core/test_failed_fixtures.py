"""tests/failed_fixtures.py: a session fixture that fails releases what its frames held, and without the plugin it
would not (the control: the check can fail)."""
import pytest

FAILING_FIXTURE = """
import gc
import weakref

import pytest

held = []


class Model:
    pass


@pytest.fixture(scope="session")
def model_file():
    model = Model()
    held.append(weakref.ref(model))
    raise OSError("No space left on device")


def test_uses_the_file(model_file):
    pass


def test_after_it():
    gc.collect()
    assert held[0]() is None, "the failed fixture's model is still alive"
"""


@pytest.mark.parametrize("plugin, released", [("failed_fixtures", True), ("no:failed_fixtures", False)])
def test_a_failed_session_fixture_keeps_no_model_alive(pytester, plugin, released):
    pytester.makeini("[pytest]\n")  # its own rootdir: under CI's TMPDIR (inside the pack) pytest took the pack's pyproject
    pytester.makepyfile(FAILING_FIXTURE)
    result = pytester.runpytest("-p", plugin, "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1, passed=int(released), failed=int(not released))
    result.stdout.fnmatch_lines(["*OSError: No space left on device*"])
