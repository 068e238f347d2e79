"""A fixture that fails keeps no memory alive (a pytest plugin: tests/conftest.py loads it).

pytest keeps a failed fixture's exception, for a session fixture to the session's end, and with its traceback every
frame's locals: a host fixture that fails while writing a model file would hold that model's gigabytes beside every
later module's. The frames' locals are cleared; the message and the source lines of the report stay.
"""
import traceback

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    try:
        return (yield)
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)
        raise
