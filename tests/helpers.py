"""Helpers shared by test modules (import them as `from helpers import ...`;
never import from a conftest module, whose name is not unique)."""

from __future__ import annotations

from pathlib import Path

from bms_image.config import Settings

TEST_SECRET = "test-secret-" + "0" * 52


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "data_dir": tmp_path,
        "token_secret": TEST_SECRET,
        "shutdown_grace_seconds": 1.0,
        "catalog_image_mib": 1,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
