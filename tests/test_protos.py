"""The protos are the product's face: they must stay lint-clean (buf's
STANDARD and COMMENTS rules, see buf.yaml) and compile for other languages."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / "node_modules" / ".bin" / "buf"


def _buf() -> str:
    if BUF.exists():
        return str(BUF)
    found = shutil.which("buf")
    if found:
        return found
    message = "buf is not installed: run `npm ci` (make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def test_buf_lint_passes() -> None:
    result = subprocess.run(
        [_buf(), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_protos_declare_options_for_other_languages() -> None:
    for proto in sorted((ROOT / "protos" / "bms" / "image" / "v1").glob("*.proto")):
        text = proto.read_text()
        for option in ("go_package", "java_package", "java_multiple_files", "csharp_namespace"):
            assert f"option {option} =" in text, f"{proto.name} lacks option {option}"
