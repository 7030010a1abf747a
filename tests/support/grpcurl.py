"""grpcurl as the README walkthroughs type it (tests/e2e/test_grpcurl.py,
tests/sharing/test_grpcurl_sharing.py): the grpcurl binary of this
environment, using server reflection (no proto files), against a real
`bms-image serve` process.

A `Caller` is one person at the terminal: an address and a token. Each call
is the command line they type,

    grpcurl -plaintext [-H 'authorization: Bearer <token>'] [-d <body>] <address> <method>

and a failed expectation prints that command line and what grpcurl said."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

from support.processes import GRPCURL

# grpcurl exits with 64 + the gRPC status code when the call fails.
EXIT_NOT_FOUND = 64 + 5
EXIT_PERMISSION_DENIED = 64 + 7
EXIT_FAILED_PRECONDITION = 64 + 9
EXIT_UNAUTHENTICATED = 64 + 16


def grpcurl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `grpcurl <args>` with the grpcurl binary of this environment."""
    return subprocess.run(
        [str(GRPCURL), *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


def json_messages(text: str) -> list[Any]:
    """grpcurl prints each response message of a stream as its own JSON value."""
    decoder = json.JSONDecoder()
    messages: list[Any] = []
    position = 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        message, position = decoder.raw_decode(text, position)
        messages.append(message)
    return messages


def ok(*args: str, stdin: str | None = None) -> Any:
    """A grpcurl call that must succeed: its one JSON response, parsed; the
    text grpcurl prints for `list` and `describe`, as it is."""
    done = grpcurl(*args, stdin=stdin)
    assert done.returncode == 0, f"grpcurl {args} failed ({done.returncode}):\n{done.stderr}"
    if not done.stdout.strip().startswith("{"):
        return done.stdout
    [message] = json_messages(done.stdout)
    return message


def fails(expected_exit: int, code: str, *args: str) -> str:
    """A grpcurl call that must fail with the status grpcurl prints as `Code: <code>`."""
    done = grpcurl(*args)
    assert done.returncode == expected_exit, (
        f"grpcurl {args}: exit {done.returncode}, expected {expected_exit}\n"
        f"stdout: {done.stdout}\nstderr: {done.stderr}"
    )
    assert f"Code: {code}" in done.stderr, done.stderr
    return done.stderr


@dataclass(frozen=True)
class Caller:
    """Somebody calling `address` with `token` (none: no authorization header)."""

    address: str
    token: str = ""

    def argv(self, method: str, body: str | None = None) -> list[str]:
        """The arguments of `grpcurl` for `method` (`Service/Method`) with `body` (JSON)."""
        args = ["-plaintext"]
        if self.token:
            args += ["-H", f"authorization: Bearer {self.token}"]
        if body is not None:
            args += ["-d", body]
        return [*args, self.address, method]

    def run(self, method: str, body: str | None = None) -> subprocess.CompletedProcess[str]:
        return grpcurl(*self.argv(method, body))

    def ok(self, method: str, body: str | None = None, stdin: str | None = None) -> Any:
        return ok(*self.argv(method, body), stdin=stdin)

    def fails(self, expected_exit: int, code: str, method: str, body: str | None = None) -> str:
        return fails(expected_exit, code, *self.argv(method, body))


def by_name(name: str) -> str:
    """The JSON body `{"name": <name>}` of a Get, Delete or Download."""
    return json.dumps({"name": name})
