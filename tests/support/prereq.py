"""Shared test helpers: the CI switch that turns missing prerequisites into failures."""

from __future__ import annotations

import os

import pytest


def require(condition: bool, what: str) -> None:
    """Skip when a prerequisite is missing, or fail when CI demands it.

    CI sets MICROVM_RUN_REQUIRE_INTEGRATION=1 so integration tests can never
    silently skip there.
    """
    if condition:
        return
    if os.environ.get("MICROVM_RUN_REQUIRE_INTEGRATION") == "1":
        pytest.fail(f"prerequisite missing (MICROVM_RUN_REQUIRE_INTEGRATION=1): {what}")
    pytest.skip(f"prerequisite missing: {what} (run scripts/setup-host)")
