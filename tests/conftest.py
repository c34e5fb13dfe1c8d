"""Fixtures shared across the test tree."""

from __future__ import annotations

import shutil

import pytest

# Fixtures of the CA API tests (tests/api/ca_support.py; tests/api is on pythonpath).
pytest_plugins = ["ca_support"]


@pytest.fixture
def require_openssl() -> str:
    """The openssl command line. Interop tests fail, never skip, without it: the README's
    test command (scripts/dev test) installs it, so its absence is a broken setup."""
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("the openssl command line is missing; scripts/dev test installs it")
    return path
