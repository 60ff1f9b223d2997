"""Integration tests start real servers and workers: run them with `make test-integration` (DEDE_INTEGRATION=1),
not in `make test`."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DEDE_INTEGRATION") == "1":
        return
    skip = pytest.mark.skip(reason="integration test: run `make test-integration`")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)
