"""The data-plane tests' fixtures: one service for each module that asks for
`service` (see dataplane_support.shared_service_fixtures), `alpha`, a
project of the test's own on it, and `data_dir`, the service's data
directory. Such a module runs its tests on the module's event loop:
`pytestmark = pytest.mark.asyncio(loop_scope="module")`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from dataplane_support import shared_service_fixtures

from bms_image.common.serving import RunningService
from support.services import fresh_project
from support.tokens import Metadata

service, channel = shared_service_fixtures()


@pytest.fixture
def alpha(as_project: Callable[..., Metadata]) -> Metadata:
    """Call metadata of a project of this test's own."""
    return as_project(fresh_project("alpha"))


@pytest.fixture
def data_dir(service: RunningService) -> Path:
    """The data directory of the module's service."""
    return Path(service.settings.data_dir)
