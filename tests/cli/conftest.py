"""Fixtures of the CLI tests (helpers are in cli_support.py)."""

from __future__ import annotations

import pytest
from cli_support import Cli

from bms_image.common.serving import RunningService


@pytest.fixture
def cli(service: RunningService) -> Cli:
    """Runs `bms-image` client commands against the test's service."""
    return Cli(service)
