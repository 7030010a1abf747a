"""The README's grpcurl walkthrough as data: its ```sh blocks split into
commands, and a runner that pastes them, in order, into one bash session.
Plain functions: import them as `from readme_support import ...`."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

README = Path(__file__).resolve().parents[2] / "README.md"

#: The walkthrough: from this heading up to, not including, WALKTHROUGH_END.
WALKTHROUGH_START = "## Calling it with grpcurl"
WALKTHROUGH_END = "## Command-line client"
#: Each of these headings must hold at least one ```sh block.
WALKTHROUGH_SECTIONS = (
    "## Calling it with grpcurl",
    "### Uploading, downloading and sharing",
    "### Deploying servers (the simulated fleet)",
)
#: The address the README's commands use (`make run`'s default listen address).
README_ADDRESS = "127.0.0.1:50051"

# grpcurl exits with 64 + the gRPC status code when the call fails and prints
# the code as `Code: NotFound`; a README comment saying `Code: X` announces it.
GRPCURL_FAILURE_EXIT = 64
_EXPECTED_CODE = re.compile(r"\bCode: ([A-Z][A-Za-z]+)\b")
_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")
_RPC = re.compile(r"\b((?:[a-z][a-z0-9_]*\.)+[A-Z][A-Za-z0-9]*/[A-Z][A-Za-z0-9]*)\b")


def status_exit_code(code: str) -> int:
    """grpcurl's exit status for a failure printed as `Code: <code>`."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", code).upper()
    return GRPCURL_FAILURE_EXIT + int(grpc.StatusCode[snake].value[0])


@dataclass(frozen=True)
class Command:
    """One command of the walkthrough, as a person would paste it."""

    section: str
    line: int  # README line of its first line (1-based)
    text: str
    comment: str  # the comment lines of its paragraph
    expected_code: str | None  # e.g. "NotFound" when its comment says it fails

    @property
    def expected_exit(self) -> int:
        return 0 if self.expected_code is None else status_exit_code(self.expected_code)

    @property
    def program(self) -> str:
        """The first word of the command (`grpcurl`, `head`, `{`, `IMAGE=...`)."""
        return self.text.split(None, 1)[0]

    @property
    def rpc(self) -> str | None:
        """What a grpcurl command calls: `pkg.Service/Method`, `list` or `describe`."""
        if "grpcurl" not in self.text:
            return None
        found = _RPC.search(self.text)
        if found is not None:
            return found.group(1)
        words = shlex.split(self.text.replace("\\\n", " "), comments=True)
        for verb in ("list", "describe"):
            if verb in words:
                return verb
        return None

    @property
    def assigns(self) -> str | None:
        """The shell variable the command sets (`IMAGE=$(...)`), if any."""
        found = _ASSIGNMENT.match(self.text)
        return found.group(1) if found else None

    def describe(self) -> str:
        return f"README.md:{self.line} ({self.section})\n{self.text}"


@dataclass(frozen=True)
class Block:
    section: str
    line: int  # README line of the first line inside the fence
    lines: tuple[str, ...]


def walkthrough_blocks(readme: Path = README) -> list[Block]:
    """The ```sh blocks between WALKTHROUGH_START and WALKTHROUGH_END."""
    lines = readme.read_text().splitlines()
    blocks: list[Block] = []
    inside = False
    section = ""
    fence: list[str] | None = None
    fence_line = 0
    for number, line in enumerate(lines, start=1):
        if fence is None and line.startswith("#"):
            heading = line.rstrip()
            if heading == WALKTHROUGH_START:
                inside = True
            elif heading == WALKTHROUGH_END:
                break
            if heading.startswith(("## ", "### ")):
                section = heading
            continue
        if not inside:
            continue
        if fence is None:
            if line.strip() == "```sh":
                fence, fence_line = [], number + 1
        elif line.strip() == "```":
            blocks.append(Block(section, fence_line, tuple(fence)))
            fence = None
        else:
            fence.append(line)
    assert fence is None, f"README.md:{fence_line}: a ```sh block is never closed"
    return blocks


def _is_complete(text: str) -> bool:
    """Whether bash would run `text` as it stands (no open quote, pipe, brace
    or line continuation): `bash -n` parses without executing."""
    if text.rstrip("\n").endswith("\\"):
        return False
    parsed = subprocess.run(
        ["bash", "-n"], input=text + "\n", capture_output=True, text=True, timeout=10, check=False
    )
    return parsed.returncode == 0


def split_commands(block: Block) -> list[Command]:
    """A block's commands: continuation lines, multi-line quoted JSON and
    `{ ...; } |` pipelines joined; comment lines become the `comment` of the
    commands of their paragraph (up to the next blank line or comment)."""
    commands: list[Command] = []
    comment: list[str] = []
    comment_after_command = False
    pending: list[str] = []
    pending_line = 0
    for offset, line in enumerate(block.lines):
        number = block.line + offset
        if pending:
            pending.append(line)
        else:
            stripped = line.strip()
            if not stripped:
                comment, comment_after_command = [], False
                continue
            if stripped.startswith("#"):
                if comment_after_command:
                    comment, comment_after_command = [], False
                comment.append(stripped.lstrip("#").strip())
                continue
            pending, pending_line = [line], number
        text = "\n".join(pending)
        if _is_complete(text):
            joined = " ".join(comment)
            code = _EXPECTED_CODE.search(joined)
            # the comment's failure is the grpcurl call's, not an assignment's
            fails = code is not None and text.lstrip().startswith("grpcurl")
            commands.append(
                Command(
                    section=block.section,
                    line=pending_line,
                    text=text,
                    comment=joined,
                    expected_code=code.group(1) if code is not None and fails else None,
                )
            )
            pending = []
            comment_after_command = True
    assert not pending, (
        f"README.md:{pending_line}: this command never ends (open quote, pipe or `\\`):\n"
        + "\n".join(pending)
    )
    return commands


def walkthrough_commands(readme: Path = README) -> list[Command]:
    return [command for block in walkthrough_blocks(readme) for command in split_commands(block)]


@dataclass(frozen=True)
class Outcome:
    """What one command did; `exit` is None when the session stopped before it."""

    command: Command
    exit: int | None
    stdout: str
    stderr: str

    @property
    def ran(self) -> bool:
        return self.exit is not None

    def messages(self) -> list[Any]:
        """The JSON messages grpcurl printed (one for a unary call, any number
        for a stream), parsed."""
        decoder = json.JSONDecoder()
        messages: list[Any] = []
        position = 0
        text = self.stdout
        while True:
            while position < len(text) and text[position].isspace():
                position += 1
            if position == len(text):
                return messages
            message, position = decoder.raw_decode(text, position)
            messages.append(message)

    def message(self) -> Any:
        messages = self.messages()
        assert len(messages) == 1, f"expected one message, got {len(messages)}\n{self}"
        return messages[0]

    def __str__(self) -> str:
        return (
            f"{self.command.describe()}\n--- exit {self.exit} (expected "
            f"{self.command.expected_exit}) ---\n--- stdout ---\n{self.stdout[-3000:]}"
            f"\n--- stderr ---\n{self.stderr[-3000:]}"
        )


@dataclass(frozen=True)
class Session:
    outcomes: list[Outcome]
    variables: dict[str, str]  # the shell variables the commands set, at the end
    stderr: str  # bash's own (a timeout is reported here)


def _script(commands: list[Command], results: Path, address: str) -> str:
    """One bash script: each command, its output and status recorded; it stops
    at the first command whose status is not the expected one (what follows
    would only fail because of it)."""
    parts = ["set -o pipefail  # a failing grpcurl is not hidden by `| tee`", ""]
    for index, command in enumerate(commands):
        out = shlex.quote(str(results / f"{index}"))
        parts += [
            f"# README.md:{command.line}",
            "{",
            command.text.replace(README_ADDRESS, address),
            f"}} >{out}.out 2>{out}.err",
            "__status=$?",
            f'printf "%s\\n" "$__status" >{out}.rc',
            f'[ "$__status" -eq {command.expected_exit} ] || exit 3',
            "",
        ]
    names = sorted({command.assigns for command in commands if command.assigns})
    parts.append(
        f"for __name in {' '.join(names)}; do "
        f'printf "%s=%s\\n" "$__name" "${{!__name}}"; done >{shlex.quote(str(results / "vars"))}'
    )
    return "\n".join(parts) + "\n"


def run_session(
    commands: list[Command], workdir: Path, env: dict[str, str], address: str, timeout: float
) -> Session:
    """Runs the commands in one bash process with cwd `workdir`, the README's
    address replaced by `address`; stops (and kills the session) after `timeout`."""
    results = workdir.parent / f"{workdir.name}.results"
    results.mkdir()
    script = workdir.parent / f"{workdir.name}.walkthrough.sh"
    script.write_text(_script(commands, results, address))
    bash_stderr = results / "bash.stderr"
    with bash_stderr.open("wb") as err:
        process = subprocess.Popen(
            ["bash", "--noprofile", "--norc", str(script)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            err.write(f"\nthe walkthrough was killed after {timeout} s\n".encode())
    outcomes = []
    for index, command in enumerate(commands):
        rc = results / f"{index}.rc"
        out, errors = results / f"{index}.out", results / f"{index}.err"
        outcomes.append(
            Outcome(
                command=command,
                exit=int(rc.read_text()) if rc.exists() else None,
                stdout=out.read_text(errors="replace") if out.exists() else "",
                stderr=errors.read_text(errors="replace") if errors.exists() else "",
            )
        )
    variables: dict[str, str] = {}
    if (results / "vars").exists():
        for line in (results / "vars").read_text().splitlines():
            name, _, value = line.partition("=")
            variables[name] = value
    return Session(outcomes, variables, bash_stderr.read_text(errors="replace"))
