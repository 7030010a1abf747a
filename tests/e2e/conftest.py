"""The service as `make run` starts it: a real `bms-image serve` process,
configured through the environment, driven by external clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BMS_IMAGE = Path(sys.executable).parent / "bms-image"

READY_TIMEOUT = 20.0
# The service drains in-flight calls for BMS_IMAGE_SHUTDOWN_GRACE_SECONDS
# (10 s by default); with nothing in flight it must be gone well before that.
GRACE_SECONDS = 10.0
STOP_TIMEOUT = GRACE_SECONDS + 2.0
READY_LINE = "bms-image listening on "


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    """The caller's environment without any BMS_IMAGE_* left over from it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BMS_IMAGE_")}
    env.update(extra)
    return env


def cli_token(data_dir: Path, project: str, admin: bool = False) -> str:
    """`bms-image token --project <project> --data-dir <data_dir> [--admin]`."""
    argv = [str(BMS_IMAGE), "token", "--project", project, "--data-dir", str(data_dir)]
    if admin:
        argv.append("--admin")
    done = subprocess.run(
        argv, env=clean_environ(), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"{argv} failed: {done.stderr}"
    return done.stdout.strip()


class ServerProcess:
    """One `bms-image serve` subprocess with its own port and data directory."""

    grace_seconds = GRACE_SECONDS

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.address = f"127.0.0.1:{free_port()}"
        self.stdout_path = data_dir / "serve.stdout"
        self.stderr_path = data_dir / "serve.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        # Set once a failure of this process has failed a test already.
        self.reported = False

    @property
    def env(self) -> dict[str, str]:
        return clean_environ(
            BMS_IMAGE_LISTEN=self.address,
            BMS_IMAGE_DATA_DIR=str(self.data_dir),
            BMS_IMAGE_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        )

    def output(self) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)

    def start(self) -> ServerProcess:
        assert BMS_IMAGE.exists(), f"no bms-image console script next to {sys.executable}"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [str(BMS_IMAGE), "serve"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while READY_LINE + self.address not in self.stdout_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                self.reported = True
                pytest.fail(
                    f"bms-image serve exited with {self.process.returncode} before it was "
                    f"ready\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                self.reported = True
                pytest.fail(f"bms-image serve not ready after {READY_TIMEOUT}s\n{self.output()}")
            time.sleep(0.05)
        return self

    def token(self, project: str, admin: bool = False) -> str:
        """A bearer token from the real CLI, signed with this server's secret."""
        return cli_token(self.data_dir, project, admin)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM, then wait for the exit: (exit code, seconds it took).
        Fails the test, after a SIGKILL, if the process outlives STOP_TIMEOUT."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            self.reported = True
            pytest.fail(
                f"bms-image serve ignored SIGTERM for {STOP_TIMEOUT}s and was killed\n"
                f"{self.output()}"
            )
        self.reported = True  # the caller checks the exit code
        return code, time.monotonic() - started

    def stop(self) -> None:
        """Graceful stop that must end with exit code 0."""
        if self.process is None or self.reported:
            return
        if self.process.poll() is None:
            code, _ = self.terminate()
        else:
            code = self.process.returncode
        self.reported = True
        assert code == 0, f"bms-image serve exited with {code}\n{self.output()}"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


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
