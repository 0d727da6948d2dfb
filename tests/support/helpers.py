"""Small shared helpers for tests (not fixtures)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(check: Callable[[], T], *, timeout_s: float = 60.0, every_s: float = 0.2, what: str = "condition") -> T:
    """Polls ``check`` until it returns something truthy; fails the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def require_tool(*names: str, why: str) -> str:
    """The path of the first of ``names`` on PATH. Missing, the test is skipped on a
    developer's machine and fails under CI (``CI=true``), where a test that cannot run must
    not pass silently."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{' or '.join(names)} not installed: {why}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)
