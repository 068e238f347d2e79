"""A pytest plugin that prints each test's peak resident memory (set-up, call and teardown), sampled every 0.2 s:

    PYTHONPATH=bench COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/host/test_nested_sdxl.py -s -p pytest_rss

For finding which tests bring a run near the machine's memory (CI has 24 GB); a peak shorter than 0.2 s can be missed.
"""
import threading
import time

import psutil
import pytest

_process = psutil.Process()
_peak = [0]


def _sample_forever() -> None:
    while True:
        _peak[0] = max(_peak[0], _process.memory_info().rss)
        time.sleep(0.2)


threading.Thread(target=_sample_forever, daemon=True, name="pytest-rss").start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _peak[0] = _process.memory_info().rss
    yield
    print(f"\npeak RSS {_peak[0] / 2**30:.2f} GiB: {item.nodeid}", flush=True)
