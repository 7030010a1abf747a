"""Scenario 4b, captures that must not happen, and the hold a capture keeps
on its server: a damaged bms-network-config and a running server are refused
with FAILED_PRECONDITION; while the disk is captured the server cannot be
started (SERVER_BUSY); once the image is ACTIVE the server is free again."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from scenario_support import (
    CENTOS,
    CENTOS_PLUGINS,
    NETWORK_CONFIG_PATH,
    Cloud,
    add_partition,
    capture_request,
    cloud,
    create_request,
    deploy_one,
    disk_spec,
    get_server,
    private_images,
    stop_server,
    stopped_server,
    wait_released,
)

from bms.image.v1 import image_pb2
from bms_image.common.model import PluginKind
from support.disks import system_disk, write_disk_file
from support.errors import Code, RichError, expect_error, expect_stream_error
from support.fleet_events import ACTIVE, LOCAL, STOPPED, pb
from support.tokens import Metadata

MIB = 1024 * 1024


async def refused_capture(c: Cloud, md: Metadata, server: str, state: int) -> RichError:
    """CreateImage of `server` refused FAILED_PRECONDITION: nothing was
    created, and the server is still `state`, not left held."""
    rich = await expect_error(
        c.images.CreateImage(capture_request(server), metadata=md), Code.FAILED_PRECONDITION
    )
    assert await private_images(c, md) == []
    after = await get_server(c, md, server)
    assert after.state == state and after.task == "", after
    return rich


def _remove_network_config(disk: Path) -> None:
    """The disk rewritten without bms-network-config (as if the user had
    uninstalled it); everything else is the CentOS disk."""
    others = tuple(p for p in CENTOS_PLUGINS if p.kind is not PluginKind.BMS_NETWORK_CONFIG)
    write_disk_file(disk, disk_spec(plugins=others, seed="uninstalled"))


@pytest.mark.parametrize("damage", ["modified", "missing"])
async def test_capture_refused_without_an_intact_network_config(
    tmp_path: Path, damage: str
) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        server = await stopped_server(c, md, "damaged")
        if damage == "modified":
            await add_partition(
                c.data_dir, server.name, "tweaks", "/",
                {NETWORK_CONFIG_PATH: b"#!/bin/sh\n# my own network script\nexit 0\n"},
            )  # fmt: skip
        else:
            await asyncio.to_thread(
                _remove_network_config, system_disk(c.data_dir, server.name).top
            )

        rich = await refused_capture(c, md, server.name, STOPPED)
        assert "bms_network_config" in rich.message or "bms-network-config" in rich.message, (
            rich.message
        )
        assert damage in rich.message, rich.message
        named = [v for v in rich.violations if "network" in v.subject]
        assert named, rich.violations
        assert [v.description for v in named] == [damage]


async def test_capture_of_a_running_server_is_refused(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        server = await deploy_one(c, md, create_request(CENTOS, 1, "running", boot_source=LOCAL))
        assert server.state == ACTIVE
        rich = await refused_capture(c, md, server.name, ACTIVE)
        assert "stop" in rich.message.lower(), rich.message


async def test_a_server_being_captured_is_busy(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        server = await stopped_server(c, md, "busy")
        # a large disk makes the capture last long enough to be caught at work
        await add_partition(
            c.data_dir, server.name, "bulk", "/data", {"data/blob.bin": os.urandom(48 * MIB)}
        )
        created = await c.images.CreateImage(capture_request(server.name), metadata=md)
        assert created.status == image_pb2.IMAGE_STATUS_QUEUED

        await expect_error(
            c.provisioning.StartServer(pb.StartServerRequest(name=server.name), metadata=md),
            Code.FAILED_PRECONDITION,
            "SERVER_BUSY",
        )
        await expect_error(
            c.provisioning.DeleteServer(pb.DeleteServerRequest(name=server.name), metadata=md),
            Code.FAILED_PRECONDITION,
            "SERVER_BUSY",
        )
        await expect_stream_error(
            c.provisioning.ReinstallServer(pb.ReinstallServerRequest(name=server.name),
                                           metadata=md),
            Code.FAILED_PRECONDITION,
            "SERVER_BUSY",
        )  # fmt: skip
        held = await get_server(c, md, server.name)
        assert held.task == "capture" and held.state == STOPPED, held

        image = await asyncio.wait_for(_active(c, md, created.name), 60)
        assert image.size_bytes > 48 * MIB
        await wait_released(c, md, server.name)
        started = await c.provisioning.StartServer(
            pb.StartServerRequest(name=server.name), metadata=md
        )
        assert started.state == ACTIVE


async def _active(c: Cloud, md: Metadata, name: str) -> image_pb2.Image:
    """GetImage as fast as it answers, until the image is ACTIVE."""
    while True:
        image = await c.images.GetImage(image_pb2.GetImageRequest(name=name), metadata=md)
        if image.status == image_pb2.IMAGE_STATUS_ACTIVE:
            return image
        assert image.status in (image_pb2.IMAGE_STATUS_QUEUED, image_pb2.IMAGE_STATUS_SAVING)


async def test_capture_lets_go_when_active(tmp_path: Path) -> None:
    """The proto: the image "becomes ACTIVE once the provisioner has uploaded
    the disk (poll GetImage); the server cannot be started, reinstalled or
    deleted meanwhile" — so a client that saw ACTIVE may start the server at
    once. 25 rounds of capture (the window is narrow), each started as soon as ACTIVE shows."""
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        server = await stopped_server(c, md, "prompt")
        for round_ in range(25):
            created = await c.images.CreateImage(
                capture_request(server.name, f"round-{round_}"), metadata=md
            )
            await asyncio.wait_for(_active(c, md, created.name), 60)
            try:
                started = await c.provisioning.StartServer(
                    pb.StartServerRequest(name=server.name), metadata=md
                )
            except grpc.aio.AioRpcError as error:
                held = await get_server(c, md, server.name)
                raise AssertionError(
                    f"round {round_}: {created.name} is ACTIVE but StartServer failed: "
                    f"{error} (server task now {held.task!r})"
                ) from None
            assert started.state == ACTIVE
            await stop_server(c, md, server.name)
