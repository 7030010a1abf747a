"""The service as `make run` starts it: a real `bms-image serve` process,
configured through the environment, driven by external clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.processes import ServerProcess, cli_token


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[], ServerProcess]]:
    """Starts servers on demand; any still running at teardown is stopped
    with SIGTERM and must exit 0."""
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        data_dir = tmp_path / f"data-{len(started)}"
        data_dir.mkdir()
        server = ServerProcess(data_dir)
        started.append(server)
        return server.start()

    try:
        yield start
        for server in started:
            server.stop()
    finally:
        for server in started:
            server.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by a module's tests; it must stop cleanly at the end."""
    running = ServerProcess(tmp_path_factory.mktemp("bms-image-data")).start()
    try:
        yield running
        running.stop()
    finally:
        running.kill()


@pytest.fixture
def foreign_token(tmp_path: Path) -> str:
    """A well-formed token for project alpha signed with another data dir's secret."""
    return cli_token(tmp_path / "elsewhere", "alpha")
