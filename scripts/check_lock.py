"""Fails when pyproject.toml and the lock files disagree (`make lint`).

Two checks, for requirements/runtime.lock (the runtime dependencies) and
requirements/dev.lock (those plus the `dev` extra):

1. offline: every requirement of pyproject.toml is pinned in its lock, at a
   version its specifier admits;
2. a fresh resolution by uv, which keeps the lock's pins wherever they still
   satisfy pyproject.toml (as `make lock` does), must give the very same
   pins and hashes: a lock that pins what nothing asks for any more, or
   misses a dependency of a dependency, fails here.

Exit status 1 with what differs, and `make lock` as the fix."""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {
    "runtime": ROOT / "requirements" / "runtime.lock",
    "dev": ROOT / "requirements" / "dev.lock",
}
#: The flags `make lock` compiles with (see the Makefile's LOCK_FLAGS).
COMPILE_FLAGS = (
    "--generate-hashes",
    "--python-version",
    "3.11",
    "--python-platform",
    "x86_64-unknown-linux-gnu",
    "--custom-compile-command",
    "make lock",
    "--no-config",  # no machine or user uv settings
    "--quiet",
)


def pins(lock: Path) -> dict[str, str]:
    """Package name -> pinned version, from a requirements-style lock."""
    pinned: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split(" ", 1)[0].split("==", 1)
            pinned[canonicalize_name(name)] = version
    return pinned


def requirements(project: dict[str, object], kind: str) -> list[Requirement]:
    table = project["project"]
    assert isinstance(table, dict)
    listed = list(table["dependencies"])
    if kind == "dev":
        listed += table["optional-dependencies"]["dev"]
    return [Requirement(text) for text in listed]


def unsatisfied(project: dict[str, object], kind: str, lock: Path) -> list[str]:
    pinned = pins(lock)
    problems = []
    for requirement in requirements(project, kind):
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{lock.name}: {requirement} is not pinned")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{lock.name}: {requirement.name}=={version} is outside {requirement}")
    return problems


def requirement_lines(text: str) -> list[str]:
    return [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def resolution_differs(kind: str, lock: Path) -> list[str]:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        return ["uv is not installed in the venv: run make install"]
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / lock.name
        shutil.copyfile(lock, fresh)  # uv keeps the pins of the output file where it can
        extra = ("--extra", "dev") if kind == "dev" else ()
        command = [uv, "pip", "compile", str(ROOT / "pyproject.toml"), *extra, *COMPILE_FLAGS]
        result = subprocess.run(
            [*command, "-o", str(fresh)], capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0:
            return [f"uv pip compile failed: {result.stderr.strip()}"]
        old, new = requirement_lines(lock.read_text()), requirement_lines(fresh.read_text())
    if old == new:
        return []
    diff = difflib.unified_diff(old, new, f"{lock.name} (committed)", f"{lock.name} (resolved)")
    return [f"{lock.name} does not match pyproject.toml:", *list(diff)[:60]]


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems: list[str] = []
    for kind, lock in LOCKS.items():
        if not lock.exists():
            problems.append(f"{lock.relative_to(ROOT)} is missing")
            continue
        problems += unsatisfied(project, kind, lock) or resolution_differs(kind, lock)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print("the lock is stale: run `make lock` and commit requirements/", file=sys.stderr)
        return 1
    print("requirements/*.lock match pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
