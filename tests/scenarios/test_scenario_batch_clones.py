"""Scenario 1, batch deployment: a server is deployed from a public image,
stopped, given an application and a data partition, captured into a private
image, and 20 clones of it are deployed in one call — each with the
application, the partition, its own host name and the SSH key, from an image
the provisioner fetched once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from scenario_support import (
    CENTOS,
    CENTOS_PLUGINS,
    S4,
    S4_MODEL,
    add_partition,
    capture,
    cloud,
    create_request,
    deploy,
    deploy_one,
    expected_plugin_pairs,
    get_server,
    new_ssh_key,
    plugin_pairs,
    stop_server,
    wait_released,
)

from bms.image.v1 import image_pb2
from bms_image.common import disk_format as disks
from support.disks import cache_dir, system_disk
from support.fleet_events import ACTIVE, EVS, LOCAL, NET_UP, STOPPED

APP_BINARY = b"#!/bin/sh\necho 'inventory service 3.2.1'\n"
APP_CONFIG = b"listen = 0.0.0.0:8080\ndatabase = /data/inventory/db.sqlite\n"
DATA_FILES = {
    "data/inventory/schema.sql": b"CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);\n",
    "data/inventory/README": b"data partition of the inventory service\n",
}
CLONES = 20


async def test_twenty_clones_of_a_captured_server(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        key = new_ssh_key("deployer@alpha")

        golden = await deploy_one(c, md, create_request(CENTOS, 1, "golden", boot_source=LOCAL))
        assert golden.boot_source == LOCAL
        assert system_disk(c.data_dir, golden.name).top.name == "system.disk"
        await stop_server(c, md, golden.name)

        # "install" the application and lay out a data partition
        await add_partition(
            c.data_dir, golden.name, "app", "/",
            {"opt/inventory/bin/inventory": APP_BINARY, "opt/inventory/inventory.conf": APP_CONFIG},
        )  # fmt: skip
        await add_partition(c.data_dir, golden.name, "data", "/data", DATA_FILES)

        image = await capture(c, md, golden.name, "inventory-golden")
        assert image.type == image_pb2.IMAGE_TYPE_PRIVATE
        assert image.owner_project == "alpha"
        assert image.source_server == golden.name
        assert image.hardware_model == S4_MODEL
        assert image.os_type == image_pb2.OS_TYPE_LINUX
        assert (image.os_distro, image.os_version) == ("centos", "7.6")
        assert image.architecture == image_pb2.ARCHITECTURE_X86_64
        assert plugin_pairs(image.plugins) == expected_plugin_pairs(CENTOS_PLUGINS)
        assert f"flavors/{S4}" in image.supported_flavors
        assert image.size_bytes > 0 and len(image.sha256) == 64
        # the capture lets go of the server (see test_capture_lets_go_when_active)
        await wait_released(c, md, golden.name)

        events = await deploy(
            c, md, create_request(image.name, CLONES, "inventory", key.line), within=90
        )
        assert len(set(events.servers)) == CLONES

        servers = [await get_server(c, md, name) for name in events.servers]
        assert sorted(s.host_name for s in servers) == sorted(
            f"inventory-{n}" for n in range(1, CLONES + 1)
        )
        for server in servers:
            assert server.state == ACTIVE, server
            assert server.network_state == NET_UP, server
            assert server.image == image.name
            assert server.hardware_model == S4_MODEL
            assert server.ssh_key_fingerprint == key.fingerprint
            assert server.boot_source == EVS  # the captured image keeps the SDI driver

        async def check_disk(server_name: str, host_name: str) -> None:
            disk = system_disk(c.data_dir, server_name)

            def read(name: str) -> bytes | None:
                return disks.read_file(disk, name)

            listed = await asyncio.to_thread(disks.list_files, disk)
            assert await asyncio.to_thread(read, "opt/inventory/bin/inventory") == APP_BINARY
            assert await asyncio.to_thread(read, "opt/inventory/inventory.conf") == APP_CONFIG
            for name, content in DATA_FILES.items():
                assert listed.get(name) == len(content), (server_name, name, listed)
                assert await asyncio.to_thread(read, name) == content
            assert await asyncio.to_thread(read, "etc/hostname") == f"{host_name}\n".encode()
            keys = await asyncio.to_thread(read, "root/.ssh/authorized_keys")
            assert keys == key.line.encode() + b"\n"
            release = await asyncio.to_thread(disks.os_release, disk)
            assert (release["ID"], release["VERSION_ID"]) == ("centos", "7.6")

        await asyncio.gather(*(check_disk(s.name, s.host_name) for s in servers))

        # the image came from the image service once, for all 20
        cached = sorted(p.name for p in cache_dir(c.data_dir).iterdir())
        mine = [name for name in cached if name.startswith(image.sha256)]
        assert mine == [f"{image.sha256}.raw"], cached
        assert not [name for name in cached if name.startswith(".part-")], cached

        # the golden server is left as it was: stopped, its own host name
        golden_now = await get_server(c, md, golden.name)
        assert golden_now.state == STOPPED
        assert golden_now.host_name == "golden-1"
        assert golden_now.image == CENTOS
