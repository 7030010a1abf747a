"""The protos are the product's face: they must stay lint-clean (buf's
STANDARD and COMMENTS rules, see buf.yaml) and compile for other languages."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support.processes import buf_binary

ROOT = Path(__file__).resolve().parents[1]


def test_buf_lint_passes() -> None:
    result = subprocess.run(
        [buf_binary(), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_protos_declare_options_for_other_languages() -> None:
    for proto in sorted((ROOT / "protos" / "bms" / "image" / "v1").glob("*.proto")):
        text = proto.read_text()
        for option in ("go_package", "java_package", "java_multiple_files", "csharp_namespace"):
            assert f"option {option} =" in text, f"{proto.name} lacks option {option}"
