"""A restart never leaves a server BUILDING: work cut off by the stop ends
ERROR with a reason, its disk is gone, and the fleet works on."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import provisioning_support as prov
import pytest
from provisioning_support import CENTOS, S4

from bms.image.v1 import provisioning_pb2
from bms_image.fleet.adapters.image_source import ImageSource
from support.fleet_events import (
    ACTIVE,
    BUILDING,
    ERROR,
    FAILED,
    LOCAL,
    STAGE_ACTIVE,
    STREAMING,
    stage_name,
    state_name,
)
from support.services import make_settings, serving

pb = provisioning_pb2
MiB = 1024 * 1024


def states_in_database(data_dir: Path) -> dict[str, str]:
    """servers/{id} -> state, read straight from the stopped service's SQLite file."""
    with sqlite3.connect(data_dir / "bms-image.db") as connection:
        rows = connection.execute("SELECT id, state FROM servers").fetchall()
    return {f"servers/{server_id}": state for server_id, state in rows}


async def check_after_restart(running, md, names: list[str]) -> None:
    settings = running.service.settings
    for name in names:
        server = await prov.get_server(running.provisioning, md, name)
        assert server.state == ERROR, state_name(server.state)
        assert server.state_reason, "an ERROR server must say why"
        assert not prov.server_dir(settings, name).exists(), "a half-built disk was left"
        events = await prov.watch(running.provisioning, md, name)
        assert len(events) == 1, [stage_name(e.stage) for e in events]
        assert events[0].stage == FAILED and events[0].state == ERROR
        assert events[0].message == server.state_reason
    assert {s.state for s in await prov.list_servers(running.provisioning, md)} == {ERROR}
    assert not [p for p in prov.cache_dir(settings).iterdir() if p.name.startswith(".part-")]
    # the fleet works on: the failed servers can be deleted, new ones built
    for name in names:
        await running.provisioning.DeleteServer(pb.DeleteServerRequest(name=name), metadata=md)
    deployment = await prov.deploy(
        running.provisioning, md, prov.create_request(CENTOS, S4, 1, "after")
    )
    (fresh,) = deployment.servers
    assert deployment.final(fresh).stage == STAGE_ACTIVE
    assert [s.name for s in await prov.list_servers(running.provisioning, md)] == [fresh]


async def test_stop_in_the_middle_of_streaming_then_restart(tmp_path) -> None:
    """A big image streamed in small chunks; the service stops as soon as the
    first bytes are reported."""
    settings = make_settings(tmp_path, chunk_bytes=64 * 1024)
    async with serving(settings) as running:
        md = running.project("alpha")
        image, data = await prov.create_disk_image(running.images, md, bulk_bytes=24 * MiB)
        call = running.provisioning.CreateServers(
            prov.create_request(image.name, S4, 3, "cut", boot_source=LOCAL), metadata=md
        )
        names: list[str] = []
        async for event in call:
            if event.server not in names:
                names.append(event.server)
            if event.stage == STREAMING:
                assert 0 < event.bytes_done < len(data), "the stop must come mid-way"
                break
        assert len(names) == 3
        for name in names:
            assert (await prov.get_server(running.provisioning, md, name)).state == BUILDING
        await running.service.stop(0)
    left = states_in_database(tmp_path)
    assert set(left) == set(names)
    async with serving(settings) as running:
        await check_after_restart(running, running.project("alpha"), names)


async def test_servers_left_building_in_the_database_fail_on_restart(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download is held, so the stop finds the servers BUILDING and the
    database says so; the next start marks them ERROR."""
    held: list[asyncio.Task[object]] = []
    opened = asyncio.Event()
    real = ImageSource._download

    async def hold(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        task = asyncio.current_task()
        assert task is not None
        held.append(task)
        await opened.wait()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(ImageSource, "_download", hold)
    settings = make_settings(tmp_path)
    try:
        async with serving(settings) as running:
            md = running.project("alpha")
            image, _ = await prov.create_disk_image(running.images, md)
            call = running.provisioning.CreateServers(
                prov.create_request(image.name, S4, 2, "held"), metadata=md
            )
            first = await asyncio.wait_for(call.read(), 10)
            for _ in range(100):
                if held:
                    break
                await asyncio.sleep(0.02)
            assert held, "the deployment never reached the download"
            names = [s.name for s in await prov.list_servers(running.provisioning, md)]
            assert first.server in names and len(names) == 2
            await running.service.stop(0)
        assert states_in_database(tmp_path) == dict.fromkeys(names, "building")
        for task in held:  # the first service's download, still waiting
            task.cancel()
        opened.set()
        async with serving(settings) as running:
            md = running.project("alpha")
            for name in names:
                server = await prov.get_server(running.provisioning, md, name)
                assert server.state == ERROR
                assert "restart" in server.state_reason, server.state_reason
            await check_after_restart(running, md, names)
            # a call made to the new service for the old image works again
            deployment = await prov.deploy(
                running.provisioning, md, prov.create_request(image.name, S4)
            )
            assert all(deployment.final(s).stage == STAGE_ACTIVE for s in deployment.servers)
            server = await prov.get_server(running.provisioning, md, deployment.servers[0])
            assert server.state == ACTIVE
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
