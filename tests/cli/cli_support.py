"""Helpers of the CLI tests: run `bms-image` client commands against the
in-process service (in a thread, since the service runs on the test's event
loop), and check their exit codes and output. Import them as
`from cli_support import ...`."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

from bms_image.cli import app
from bms_image.common.serving import RunningService
from support import builders

CENTOS = builders.CENTOS_IMAGE
UBUNTU = builders.UBUNTU_IMAGE
S4 = builders.S4_FLAVOR
S4_MODEL = builders.S4_MODEL

#: The client's environment: nothing inherited that changes its behaviour,
#: tables wide enough for one line per row, no colours or live refreshes.
CLEAN_ENV: dict[str, str | None] = {
    "BMS_IMAGE_ADDRESS": None,
    "BMS_IMAGE_TOKEN": None,
    "BMS_IMAGE_CA_CERT": None,
    "BMS_IMAGE_CLIENT_CERT": None,
    "BMS_IMAGE_CLIENT_KEY": None,
    "COLUMNS": "250",
    "NO_COLOR": "1",
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
}

ERROR_LINE = re.compile(r"^error: (?P<code>[A-Z_]+)(?: \((?P<reason>[A-Z_]+)\))?: (?P<message>.+)$")


@dataclass
class Cli:
    """`await cli("images", "list", project="alpha")`: one command, run as
    a person would, with the address and a token of `project` (None: no
    token) in the environment."""

    service: RunningService

    async def __call__(
        self,
        *args: str | Path,
        project: str | None = "alpha",
        admin: bool = False,
        env: dict[str, str | None] | None = None,
    ) -> Result:
        environment = dict(CLEAN_ENV)
        environment["BMS_IMAGE_ADDRESS"] = self.service.address
        if project is not None:
            environment["BMS_IMAGE_TOKEN"] = self.service.authority.issue(project, admin)
        environment.update(env or {})
        return await asyncio.to_thread(
            CliRunner().invoke, app, [str(a) for a in args], env=environment
        )


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (
        f"exit {result.exit_code} ({result.exception!r})\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result


def parsed(result: Result) -> Any:
    """The JSON a successful --json command printed (nothing else on stdout)."""
    return json.loads(ok(result).stdout)


def failed(result: Result, exit_code: int, code: str, reason: str = "") -> str:
    """A command that failed on purpose: its exit code, and one stderr line
    `error: CODE (REASON): message` (after any progress bars; no traceback).
    The message."""
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}"
    assert result.exit_code == exit_code, (
        f"exit {result.exit_code}, expected {exit_code}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    assert result.stdout == "", result.stdout
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line:\n{result.stderr}"
    first = errors[0]
    match = ERROR_LINE.match(first)
    assert match, f"not an error line: {first!r}"
    assert match["code"] == code, first
    if reason:
        assert match["reason"] == reason, first
    return match["message"]


def progress_lines(stderr: str, label: str) -> list[str]:
    """The final lines of the progress bars labelled `label...`."""
    return [line for line in stderr.splitlines() if line.startswith(label)]
