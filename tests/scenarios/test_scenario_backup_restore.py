"""Scenario 2, backup and restore: a stopped server with a data disk is
captured as a backup; its system disk is then destroyed, and ReinstallServer
from the backup brings the original content back while the data disk keeps
what the user wrote on it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from scenario_support import (
    CENTOS,
    add_partition,
    capture,
    cloud,
    create_request,
    deploy_one,
    disk_contents,
    get_server,
    new_ssh_key,
    overwrite,
    read_at,
    reinstall,
    stop_server,
    wait_released,
)

from bms_image.common import disk_format as disks
from support.disks import server_dir, system_disk
from support.fleet_events import ACTIVE, EVS, NET_UP, REBUILDING, STAGE_ACTIVE, VALIDATING, pb

PRECIOUS = b"precious"
PRECIOUS_AT = (0, 512 * 1024 * 1024 + 17)  # start and middle of the 1 GiB disk
USER_FILES = {
    "home/ops/notes.txt": b"rotate the keys every quarter\n",
    "etc/myapp/settings.ini": b"[main]\nworkers = 16\n",
}


async def test_backup_then_restore_after_the_system_disk_is_lost(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        key = new_ssh_key()
        server = await deploy_one(
            c, md, create_request(CENTOS, 1, "backup", key.line, data_disks_gb=[1])
        )
        assert list(server.data_disks_gb) == [1]
        assert server.boot_source == EVS  # writes go to the clone's overlay
        await stop_server(c, md, server.name)

        data_disk = server_dir(c.data_dir, server.name) / "data-1.disk"
        assert data_disk.stat().st_size == 1024**3
        for offset in PRECIOUS_AT:
            await asyncio.to_thread(overwrite, data_disk, offset, PRECIOUS)
        await add_partition(c.data_dir, server.name, "home", "/", USER_FILES)
        original = await disk_contents(system_disk(c.data_dir, server.name))
        assert original["home/ops/notes.txt"] == USER_FILES["home/ops/notes.txt"]
        assert original["etc/hostname"] == b"backup-1\n"

        backup = await capture(c, md, server.name, "backup-before-upgrade")
        assert backup.source_server == server.name
        await wait_released(c, md, server.name)  # see test_capture_lets_go_when_active

        # the system disk is lost: the clone's overlay (the user's writes and
        # its first boot) overwritten with garbage; its base is the cached
        # image, which no server ever writes
        disk = system_disk(c.data_dir, server.name)
        assert disk.base is not None and disk.top.parent == server_dir(c.data_dir, server.name)
        disk.top.write_bytes(os.urandom(disk.top.stat().st_size))
        with pytest.raises(ValueError):
            disks.read_file(disk, "etc/hostname")

        events = await reinstall(
            c, md, pb.ReinstallServerRequest(name=server.name, image=backup.name,
                                             ssh_public_key=key.line),
        )  # fmt: skip
        assert events.servers == [server.name]
        stages = events.stages(server.name)
        assert stages[0] == VALIDATING and stages[-1] == STAGE_ACTIVE, events.describe(server.name)
        assert all(e.state == REBUILDING for e in events.by_server[server.name][:-1])
        assert events.final(server.name).state == ACTIVE

        restored = await get_server(c, md, server.name)
        assert restored.state == ACTIVE, restored
        assert restored.network_state == NET_UP
        assert restored.image == backup.name
        assert restored.host_name == "backup-1"
        assert restored.ssh_key_fingerprint == key.fingerprint
        assert list(restored.data_disks_gb) == [1]

        now = await disk_contents(system_disk(c.data_dir, server.name))
        for name, content in original.items():
            assert now.get(name) == content, name
        assert disks.os_release(system_disk(c.data_dir, server.name))["ID"] == "centos"

        # the data disk was never touched
        assert data_disk.stat().st_size == 1024**3
        for offset in PRECIOUS_AT:
            assert await asyncio.to_thread(read_at, data_disk, offset, len(PRECIOUS)) == PRECIOUS
