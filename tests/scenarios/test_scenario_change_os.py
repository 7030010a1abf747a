"""Scenario 3, changing the OS: a stopped CentOS server is reinstalled with
Ubuntu 22.04, which its flavor supports; an image the flavor does not support
(the Arm openEuler image on an x86 flavor) is refused before anything is
touched."""

from __future__ import annotations

import asyncio
from pathlib import Path

from scenario_support import (
    CENTOS,
    OPENEULER_ARM,
    S4,
    UBUNTU,
    cloud,
    create_request,
    deploy_one,
    get_server,
    new_ssh_key,
    overwrite,
    read_at,
    reinstall,
    sha256_and_size,
    stop_server,
)

from bms_image.common import disk_format as disks
from support.disks import server_dir, system_disk
from support.errors import Code, expect_stream_error
from support.fleet_events import ACTIVE, LOCAL, STAGE_ACTIVE, STOPPED, pb


async def test_reinstall_changes_centos_to_ubuntu(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        server = await deploy_one(
            c, md, create_request(CENTOS, 1, "app", boot_source=LOCAL, data_disks_gb=[2])
        )
        await stop_server(c, md, server.name)
        disk = system_disk(c.data_dir, server.name)
        assert (await asyncio.to_thread(disks.os_release, disk))["ID"] == "centos"
        data_disk = server_dir(c.data_dir, server.name) / "data-1.disk"
        await asyncio.to_thread(overwrite, data_disk, 0, b"customer records")

        # refused: the Arm image cannot run on this x86 flavor
        before = await asyncio.to_thread(sha256_and_size, disk.top)
        rich = await expect_stream_error(
            c.provisioning.ReinstallServer(
                pb.ReinstallServerRequest(name=server.name, image=OPENEULER_ARM), metadata=md
            ),
            Code.FAILED_PRECONDITION,
            "IMAGE_FLAVOR_INCOMPATIBLE",
        )
        assert OPENEULER_ARM in rich.message and f"flavors/{S4}" in rich.message, rich.message
        unchanged = await get_server(c, md, server.name)
        assert unchanged.state == STOPPED, unchanged
        assert unchanged.image == CENTOS
        assert unchanged.task == ""
        assert await asyncio.to_thread(
            sha256_and_size, system_disk(c.data_dir, server.name).top
        ) == (before)

        # accepted: Ubuntu 22.04 is offered on physical.s4.large
        key = new_ssh_key()
        events = await reinstall(
            c, md, pb.ReinstallServerRequest(name=server.name, image=UBUNTU,
                                             ssh_public_key=key.line),
        )  # fmt: skip
        assert events.final(server.name).stage == STAGE_ACTIVE, events.describe(server.name)
        changed = await get_server(c, md, server.name)
        assert changed.state == ACTIVE, changed
        assert changed.image == UBUNTU
        assert changed.host_name == "app-1"
        assert changed.ssh_key_fingerprint == key.fingerprint

        disk = system_disk(c.data_dir, server.name)
        release = await asyncio.to_thread(disks.os_release, disk)
        assert (release["ID"], release["VERSION_ID"]) == ("ubuntu", "22.04"), release
        assert (await asyncio.to_thread(disks.read_file, disk, "etc/os-release") or b"").count(
            b"ubuntu"
        ) >= 1
        assert await asyncio.to_thread(disks.read_file, disk, "etc/hostname") == b"app-1\n"
        assert await asyncio.to_thread(disks.read_file, disk, "root/.ssh/authorized_keys") == (
            key.line.encode() + b"\n"
        )
        assert await asyncio.to_thread(read_at, data_disk, 0, 16) == b"customer records"
