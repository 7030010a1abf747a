"""ServerCaptureService, the provisioner's internal capture API, checks
every call as the public ones do: a token is needed, another project's
server does not exist for the caller, and only a server held by
PrepareServerCapture can be started or released."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from bms.image.v1 import capture_pb2, capture_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.api.server import RunningService, start, start_provisioner
from bms_image.catalog.seed import public_image_id
from bms_image.provisioner import fleet as fleet_module
from helpers import decode, make_settings

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[RunningService]:
    database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    images = await start(
        make_settings(tmp_path / "images", provisioner="none", database_url=database_url)
    )
    provisioner = await start_provisioner(
        make_settings(tmp_path / "fleet", database_url=database_url, image_service=images.address)
    )
    yield provisioner
    await provisioner.stop(0)
    await images.stop(0)


def md(service: RunningService, project: str) -> Metadata:
    return (("authorization", f"Bearer {service.authority.issue(project)}"),)


async def stopped_server(channel: grpc.aio.Channel, metadata: Metadata) -> str:
    stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
    stream = stub.CreateServers(
        provisioning_pb2.CreateServersRequest(
            flavor="flavors/physical.s4.large", image=CENTOS, count=1, name_prefix="held"
        ),
        metadata=metadata,
    )
    finals = [e async for e in stream if e.stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE]
    (event,) = finals
    await stub.StopServer(provisioning_pb2.StopServerRequest(name=event.server), metadata=metadata)
    return str(event.server)


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    rich = decode(caught.value)
    return rich.code, rich.reason


async def test_capture_calls_are_checked_like_public_ones(fleet: RunningService) -> None:
    async with grpc.aio.insecure_channel(fleet.address) as channel:
        alpha, beta = md(fleet, "alpha"), md(fleet, "beta")
        server = await stopped_server(channel, alpha)
        capture = capture_pb2_grpc.ServerCaptureServiceStub(channel)
        prepare = capture_pb2.PrepareServerCaptureRequest(server=server)
        start_it = capture_pb2.StartServerCaptureRequest(
            server=server, image="images/00000000-0000-4000-8000-000000000001"
        )
        release = capture_pb2.ReleaseServerCaptureRequest(server=server)

        assert (await refused(capture.PrepareServerCapture(prepare)))[0] == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        for call in (
            capture.PrepareServerCapture(prepare, metadata=beta),
            capture.StartServerCapture(start_it, metadata=beta),
            capture.ReleaseServerCapture(release, metadata=beta),
        ):
            assert await refused(call) == (grpc.StatusCode.NOT_FOUND, "SERVER_NOT_FOUND")
        for call in (
            capture.StartServerCapture(start_it, metadata=alpha),
            capture.ReleaseServerCapture(release, metadata=alpha),
        ):
            assert await refused(call) == (grpc.StatusCode.FAILED_PRECONDITION, "SERVER_NOT_HELD")

        described = await capture.PrepareServerCapture(prepare, metadata=alpha)
        assert described.hardware_model == "s4-2288h-v5" and described.os_distro == "centos"
        assert await refused(capture.PrepareServerCapture(prepare, metadata=alpha)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "SERVER_BUSY",
        )
        await capture.ReleaseServerCapture(release, metadata=alpha)
        again = await capture.PrepareServerCapture(prepare, metadata=alpha)
        assert again.partitions, "released, so it can be held again"
        await capture.ReleaseServerCapture(release, metadata=alpha)


async def test_a_hold_whose_capture_never_starts_lapses(
    fleet: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image service may die between PrepareServerCapture and
    StartServerCapture: the provisioner lets the server go by itself."""
    monkeypatch.setattr(fleet_module, "CAPTURE_START_SECONDS", 0.05)
    async with grpc.aio.insecure_channel(fleet.address) as channel:
        alpha = md(fleet, "alpha")
        server = await stopped_server(channel, alpha)
        capture = capture_pb2_grpc.ServerCaptureServiceStub(channel)
        servers = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
        await capture.PrepareServerCapture(
            capture_pb2.PrepareServerCaptureRequest(server=server), metadata=alpha
        )
        for _ in range(200):  # bounded wait for the lapse, not a timing assertion
            held = await servers.GetServer(
                provisioning_pb2.GetServerRequest(name=server), metadata=alpha
            )
            if not held.task:
                break
            await asyncio.sleep(0.05)
        assert held.task == "", "the hold lapsed"
        started = await servers.StartServer(
            provisioning_pb2.StartServerRequest(name=server), metadata=alpha
        )
        assert started.state == provisioning_pb2.SERVER_STATE_ACTIVE
