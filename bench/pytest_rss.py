"""A pytest plugin that prints each test's peak resident memory (set-up, call and teardown), and at the end each test
module's peak and what stayed resident after it: this process and its children (a server the tests start), sampled
every 0.2 s:

    PYTHONPATH=bench COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/host/test_nested_sdxl.py -s -p pytest_rss

For finding which tests bring a run near the machine's memory (CI has 24 GB); a peak shorter than 0.2 s can be missed.
"""
import threading
import time

import psutil
import pytest

_process = psutil.Process()
_peak = {"test": 0, "module": 0}
_modules: dict[str, tuple[int, int]] = {}  # module: (peak, resident after its last test)


def _resident() -> int:
    total = 0
    for process in (_process, *_process.children(recursive=True)):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _sample_forever() -> None:
    while True:
        now = _resident()
        for scope in _peak:
            _peak[scope] = max(_peak[scope], now)
        time.sleep(0.2)


threading.Thread(target=_sample_forever, daemon=True, name="pytest-rss").start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    module = item.nodeid.split("::")[0]
    if module not in _modules:
        _peak["module"] = _resident()
    _peak["test"] = _resident()
    yield
    print(f"\npeak RSS {_peak['test'] / 2**30:.2f} GiB: {item.nodeid}", flush=True)
    _modules[module] = (_peak["module"], _resident())


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.section("peak resident memory per module (this process and its children)")
    for module, (peak, after) in _modules.items():
        terminalreporter.write_line(f"{peak / 2**30:6.1f} GiB peak, {after / 2**30:5.1f} GiB after: {module}")
