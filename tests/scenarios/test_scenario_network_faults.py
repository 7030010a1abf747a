"""Scenario 4c, network faults: an admin interrupts the network of running
servers; bms-network-config brings it back within seconds where it is intact
on the disk, and nothing does where it was tampered with. Only an admin may
inject faults."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from scenario_support import (
    CENTOS,
    NETWORK_CONFIG_PATH,
    add_partition,
    cloud,
    create_request,
    deploy,
    get_server,
    poll,
)

from support.errors import Code, expect_error
from support.fleet_events import ACTIVE, NET_DOWN, NET_UP, pb

RESTORE_WITHIN = 5.0


async def test_network_fault_heals_only_with_an_intact_network_config(tmp_path: Path) -> None:
    async with cloud(tmp_path) as c:
        md = c.md("alpha")
        ops = c.md("ops", admin=True)  # an admin of another project
        events = await deploy(c, md, create_request(CENTOS, 2, "net"))
        healthy, tampered = events.servers
        for name in (healthy, tampered):
            assert (await get_server(c, md, name)).network_state == NET_UP

        # a user "fixes" the network script on the running server's disk
        await add_partition(
            c.data_dir, tampered, "tweaks", "/", {NETWORK_CONFIG_PATH: b"#!/bin/sh\nexit 1\n"}
        )

        # only an admin may inject a fault; the owner is no admin
        await expect_error(
            c.provisioning.InjectNetworkFault(pb.InjectNetworkFaultRequest(name=healthy),
                                              metadata=md),
            Code.PERMISSION_DENIED,
        )  # fmt: skip
        assert (await get_server(c, md, healthy)).network_state == NET_UP

        injected_at = time.monotonic()
        for name in (healthy, tampered):
            down = await c.provisioning.InjectNetworkFault(
                pb.InjectNetworkFaultRequest(name=name), metadata=ops
            )
            assert down.network_state == NET_DOWN, down
            assert down.state == ACTIVE
        assert (await get_server(c, md, healthy)).network_state == NET_DOWN

        back = await poll(
            lambda: get_server(c, md, healthy), lambda s: s.network_state == NET_UP,
            RESTORE_WITHIN, every=0.2,
        )  # fmt: skip
        assert back.network_state == NET_UP, (
            f"network still down {time.monotonic() - injected_at:.1f}s after the fault: {back}"
        )
        assert back.state == ACTIVE

        # the tampered server: its watchdog gives up, and the network stays down
        still = await poll(
            lambda: get_server(c, md, tampered),
            lambda s: "bms-network-config" in s.state_reason or s.network_state != NET_DOWN,
            RESTORE_WITHIN, every=0.2,
        )  # fmt: skip
        assert still.network_state == NET_DOWN, still
        assert still.state == ACTIVE
        assert "bms-network-config" in still.state_reason, still.state_reason
        assert "modified" in still.state_reason, still.state_reason
        await asyncio.sleep(0.5)
        assert (await get_server(c, md, tampered)).network_state == NET_DOWN
