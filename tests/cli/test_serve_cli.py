"""`bms-image serve` refuses an event loop it does not know, before it starts."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from bms_image.cli import app


def test_an_unknown_event_loop_is_refused_with_a_message(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["serve", "--data-dir", str(tmp_path)],
        env={"BMS_IMAGE_EVENT_LOOP": "trio", "BMS_IMAGE_LISTEN": "127.0.0.1:0"},
    )
    assert result.exit_code == 1
    assert "event_loop must be one of uvloop, asyncio, not 'trio'" in result.output
    assert not (tmp_path / "bms-image.db").exists(), "nothing was started"
