"""Races on one server, on SQLite and PostgreSQL: two reinstalls at once,
deletion racing a deployment or a reinstall, a burst of stops and starts.
The outcome is always one of the documented ones: one winner, the others
FAILED_PRECONDITION with a reason (or NOT_FOUND when a delete won before they
looked), and a server state that matches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bms.image.v1 import provisioning_pb2 as pb
from bms_image.common.serving import RunningService
from bms_image.processes import start
from support.builders import CENTOS_IMAGE, UBUNTU_IMAGE
from support.errors import decode
from support.server_requests import create_servers
from support.services import ProvisioningStub, make_settings
from support.tokens import Metadata, bearer

CENTOS = CENTOS_IMAGE
UBUNTU = UBUNTU_IMAGE
LOSING_REASONS = {"SERVER_BUSY", "SERVER_STATE_CONFLICT"}

Stub = ProvisioningStub


@pytest.fixture
async def fleet(tmp_path: Path, database_url: str) -> AsyncIterator[tuple[Stub, Metadata]]:
    service: RunningService = await start(make_settings(tmp_path, database_url=database_url))
    md: Metadata = bearer(service.authority.issue("alpha"))
    async with grpc.aio.insecure_channel(service.address) as channel:
        yield ProvisioningStub(channel), md
    await service.stop(0)


async def deploy(stub: Stub, md: Metadata, count: int = 1) -> list[str]:
    stream = stub.CreateServers(
        create_servers("race", count),
        metadata=md,
        timeout=60,
    )
    finals = [e async for e in stream if e.stage >= pb.PROVISIONING_STAGE_ACTIVE]
    assert [e.stage for e in finals] == [pb.PROVISIONING_STAGE_ACTIVE] * count, finals
    return [e.server for e in finals]


async def settled(call: Any, gone_ok: bool = False) -> tuple[Any, str]:
    """(response, "") or (None, reason) for a refused call; anything but
    FAILED_PRECONDITION with a documented reason fails the test (or, with
    gone_ok, NOT_FOUND: the server was deleted before the call looked)."""
    try:
        return await call, ""
    except grpc.aio.AioRpcError as error:
        rich = decode(error)
        if gone_ok and rich.code == grpc.StatusCode.NOT_FOUND:
            assert rich.reason == "SERVER_NOT_FOUND", rich.reason
            return None, rich.reason
        assert rich.code == grpc.StatusCode.FAILED_PRECONDITION, (rich.code, rich.message)
        assert rich.reason in LOSING_REASONS, rich.reason
        return None, rich.reason


async def follow_reinstall(
    stub: Stub, md: Metadata, name: str, image: str, gone_ok: bool = False
) -> tuple[Any, str]:
    stream = stub.ReinstallServer(pb.ReinstallServerRequest(name=name, image=image), metadata=md)

    async def events() -> list[pb.ServerEvent]:
        return [event async for event in stream]

    return await settled(events(), gone_ok)


async def test_two_reinstalls_at_once_have_one_winner(fleet: tuple[Stub, Metadata]) -> None:
    stub, md = fleet
    (name,) = await deploy(stub, md)
    await stub.StopServer(pb.StopServerRequest(name=name), metadata=md)
    results = await asyncio.gather(
        follow_reinstall(stub, md, name, CENTOS), follow_reinstall(stub, md, name, UBUNTU)
    )
    winners = [events for events, _ in results if events is not None]
    assert len(winners) == 1, results
    assert winners[0][-1].stage == pb.PROVISIONING_STAGE_ACTIVE
    server = await stub.GetServer(pb.GetServerRequest(name=name), metadata=md)
    assert server.state == pb.SERVER_STATE_ACTIVE
    assert server.image in (CENTOS, UBUNTU)


async def test_deleting_a_server_while_it_is_built_is_refused(
    fleet: tuple[Stub, Metadata],
) -> None:
    stub, md = fleet
    stream = stub.CreateServers(
        create_servers("race", boot_source=pb.BOOT_SOURCE_LOCAL_DISK),
        metadata=md,
        timeout=60,
    )
    first = await stream.read()
    deleted, reason = await settled(
        stub.DeleteServer(pb.DeleteServerRequest(name=first.server), metadata=md)
    )
    last = first
    while last.stage < pb.PROVISIONING_STAGE_ACTIVE:
        last = await stream.read()
    assert last.stage == pb.PROVISIONING_STAGE_ACTIVE, "a refused delete does not stop the work"
    if deleted is None:  # refused while BUILDING: the deployment went on
        assert reason == "SERVER_STATE_CONFLICT"
        server = await stub.GetServer(pb.GetServerRequest(name=first.server), metadata=md)
        assert server.state == pb.SERVER_STATE_ACTIVE
        await stub.DeleteServer(pb.DeleteServerRequest(name=first.server), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as gone:  # either way, deleted now
        await stub.GetServer(pb.GetServerRequest(name=first.server), metadata=md)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_racing_a_reinstall_leaves_one_outcome(fleet: tuple[Stub, Metadata]) -> None:
    stub, md = fleet
    (name,) = await deploy(stub, md)
    await stub.StopServer(pb.StopServerRequest(name=name), metadata=md)
    reinstalled, deleted = await asyncio.gather(
        follow_reinstall(stub, md, name, CENTOS, gone_ok=True),  # the delete may end first
        settled(stub.DeleteServer(pb.DeleteServerRequest(name=name), metadata=md)),
    )
    assert (reinstalled[0] is None) != (deleted[0] is None), (reinstalled, deleted)
    try:
        server = await stub.GetServer(pb.GetServerRequest(name=name), metadata=md)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert deleted[0] is not None, "gone, so the delete won"
    else:
        assert reinstalled[0] is not None, "still there, so the reinstall won"
        assert server.state == pb.SERVER_STATE_ACTIVE


async def test_a_burst_of_stops_and_starts_ends_in_a_consistent_state(
    fleet: tuple[Stub, Metadata],
) -> None:
    stub, md = fleet
    (name,) = await deploy(stub, md)
    calls = [
        stub.StopServer(pb.StopServerRequest(name=name), metadata=md)
        if n % 2 == 0
        else stub.StartServer(pb.StartServerRequest(name=name), metadata=md)
        for n in range(12)
    ]
    results = await asyncio.gather(*(settled(call) for call in calls))
    assert any(response is not None for response, _ in results)
    server = await stub.GetServer(pb.GetServerRequest(name=name), metadata=md)
    assert server.state in (pb.SERVER_STATE_ACTIVE, pb.SERVER_STATE_STOPPED)
    assert server.task == ""
