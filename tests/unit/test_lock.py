"""The lock check of `make lint` (scripts/check_lock.py), offline part: the
committed locks pin every requirement of pyproject.toml within its
specifier, and a requirement the lock misses or pins outside its range is
reported. (The re-resolution by uv needs the package index; `make lint` runs it.)"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _check_lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project(extra_runtime: list[str] | None = None) -> dict[str, object]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project["project"]["dependencies"] += extra_runtime or []
    return project


def test_the_committed_locks_pin_every_requirement_within_range() -> None:
    check = _check_lock()
    for kind, lock in check.LOCKS.items():
        assert check.unsatisfied(_project(), kind, lock) == []


def test_a_requirement_the_lock_lacks_is_reported() -> None:
    check = _check_lock()
    problems = check.unsatisfied(_project(["tomli-w>=1"]), "runtime", check.LOCKS["runtime"])
    assert problems == ["runtime.lock: tomli-w>=1 is not pinned"]


def test_a_pin_outside_the_requirement_is_reported() -> None:
    check = _check_lock()
    problems = check.unsatisfied(_project(["grpcio>=999"]), "dev", check.LOCKS["dev"])
    assert len(problems) == 1 and "is outside grpcio>=999" in problems[0]


def test_grpcio_tools_is_not_a_runtime_dependency() -> None:
    """The stubs are generated at build time: the service never imports grpc_tools."""
    check = _check_lock()
    assert "grpcio-tools" not in check.pins(check.LOCKS["runtime"])
    assert "grpcio-tools" in check.pins(check.LOCKS["dev"])
    assert not [
        path
        for path in (ROOT / "src" / "bms_image").rglob("*.py")
        if "grpc_tools" in path.read_text()
    ]
