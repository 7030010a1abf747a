"""Fixtures of the sharing tests: the `sharing` stub and `projects` (see
support.services), and the real `bms-image serve` process of the grpcurl
scenario. The helpers are in sharing_support.py (`import sharing_support as
sh`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.processes import ServerProcess
from support.services import projects, sharing  # noqa: F401 - this folder's fixtures


@pytest.fixture(scope="module")
def sharing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `bms-image serve` process for a module; it must stop cleanly."""
    # Small seeded catalog images: the scenario needs none of their bytes.
    data_dir = tmp_path_factory.mktemp("bms-image-sharing")
    running = ServerProcess(data_dir, catalog_image_mib="1").start()
    try:
        yield running
        running.stop()
    finally:
        running.kill()
