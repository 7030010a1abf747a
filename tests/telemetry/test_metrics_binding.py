"""The metrics endpoint binds to loopback unless told otherwise (issue 14,
item 8): it has no authentication and its labels name projects, so a bare
port or another address is refused at start unless
BMS_IMAGE_METRICS_ALLOW_REMOTE is set."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import pytest

from bms_image.common.config import Settings
from bms_image.common.telemetry.metrics import metrics_address
from bms_image.processes import start
from support.services import make_settings


async def _scrape(url: str) -> bytes:
    """GET in a thread: a scrape counts the inventory on the service's loop."""

    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read())

    return await asyncio.to_thread(fetch)


@pytest.mark.parametrize(
    ("listen", "host"),
    [
        ("127.0.0.1:9100", "127.0.0.1"),
        ("127.8.9.10:9100", "127.8.9.10"),
        ("localhost:9100", "localhost"),
        ("[::1]:9100", "::1"),
    ],
)
def test_loopback_addresses_are_bound_as_given(listen: str, host: str) -> None:
    assert metrics_address(listen) == (host, 9100)


@pytest.mark.parametrize(
    "listen", ["9100", ":9100", "0.0.0.0:9100", "[::]:9100", "10.1.2.3:9100", "metrics:9100"]
)
def test_other_addresses_are_refused_unless_allowed(listen: str) -> None:
    with pytest.raises(ValueError, match="BMS_IMAGE_METRICS_ALLOW_REMOTE=true"):
        metrics_address(listen)
    host, port = metrics_address(listen, allow_remote=True)
    assert port == 9100 and host not in ("", "127.0.0.1")


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ""])
def test_a_listen_without_a_port_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        metrics_address(listen, allow_remote=True)


def test_the_opt_in_comes_from_the_environment() -> None:
    assert Settings.from_env(environ={}).metrics_allow_remote is False
    on = Settings.from_env(environ={"BMS_IMAGE_METRICS_ALLOW_REMOTE": "true"})
    assert on.metrics_allow_remote is True
    with pytest.raises(ValueError, match="not a boolean"):
        Settings.from_env(environ={"BMS_IMAGE_METRICS_ALLOW_REMOTE": "maybe"})


async def test_a_service_refuses_to_serve_metrics_on_every_address(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot serve metrics on :0") as refused:
        await start(make_settings(tmp_path, metrics_listen=":0"))
    assert "BMS_IMAGE_METRICS_ALLOW_REMOTE" in str(refused.value)


async def test_with_the_opt_in_metrics_are_served_on_every_address(tmp_path: Path) -> None:
    running = await start(
        make_settings(tmp_path, metrics_listen="0.0.0.0:0", metrics_allow_remote=True)
    )
    try:
        port = running.metrics.port
        # Reachable on an address of this machine other than loopback, when it has one.
        addresses = {
            info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        }
        address = next((a for a in sorted(addresses) if not a.startswith("127.")), "127.0.0.1")
        assert b"bms_image_rpcs" in await _scrape(f"http://{address}:{port}/metrics")
    finally:
        await running.stop(0)


async def test_by_default_metrics_are_served_on_loopback_only(tmp_path: Path) -> None:
    running = await start(make_settings(tmp_path, metrics_listen="127.0.0.1:0"))
    try:
        assert b"bms_image_rpcs" in await _scrape(
            f"http://127.0.0.1:{running.metrics.port}/metrics"
        )
    finally:
        await running.stop(0)
