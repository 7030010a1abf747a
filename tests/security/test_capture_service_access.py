"""ServerCaptureService, the provisioner's internal capture API: only the
image service calls it, with its service credential next to the caller's
user token, and every call is also checked for that caller as the public
ones are (another project's server does not exist for it, only a server
held by PrepareServerCapture can be started or released). A capture starts
once, only into the image created as that server's capture; a running one
is never released; the owner never writes a capture image's bytes; and the
limit of 40 captures at once per project holds under a burst, on SQLite and
PostgreSQL.

The image service and the provisioner run in this process, as two services
on two ports sharing one database, as `bms-image serve --provisioner none`
and `bms-image provisioner` do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from bms.image.v1 import (
    capture_pb2,
    capture_pb2_grpc,
    image_pb2,
    image_pb2_grpc,
    provisioning_pb2,
    provisioning_pb2_grpc,
)
from bms_image.common.auth import SERVICE_AUDIENCE, SERVICE_METADATA_KEY
from bms_image.common.serving import RunningService
from bms_image.fleet.adapters.image_source import ImageSource
from bms_image.fleet.domain import captures as captures_module
from bms_image.images.adapters.catalog import public_image_id
from bms_image.processes import start, start_provisioner
from support.builders import private_image
from support.errors import decode
from support.processes import free_port
from support.services import make_settings
from support.tokens import TEST_SECRET, Metadata, bearer

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
S4 = "flavors/physical.s4.large"
#: A hang guard only: nothing here should take more than a fraction of it.
PATIENCE_SECONDS = 60.0


@dataclass
class Pair:
    images: RunningService
    provisioner: RunningService

    def user(self, project: str) -> Metadata:
        """A user token only, as `bms-image token` mints it."""
        return bearer(self.images.authority.issue(project))

    def internal(self, project: str, service: str = "image-service") -> Metadata:
        """What the image service sends: the caller's token and its own credential."""
        credential = self.images.authority.issue_service(service)
        return (*self.user(project), (SERVICE_METADATA_KEY, f"Bearer {credential}"))


async def start_pair(tmp_path: Path, database_url: str) -> Pair:
    """The image service captures through the provisioner, which uploads
    through the image service: each is told the other's port."""
    fleet_port = free_port()
    images = await start(
        make_settings(
            tmp_path / "images",
            provisioner="none",
            database_url=database_url,
            provisioner_address=f"127.0.0.1:{fleet_port}",
        )
    )
    provisioner = await start_provisioner(
        make_settings(
            tmp_path / "fleet",
            database_url=database_url,
            image_service=images.address,
            listen=f"127.0.0.1:{fleet_port}",
        )
    )
    return Pair(images, provisioner)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    running = await start_pair(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")
    yield running
    await running.provisioner.stop(0)
    await running.images.stop(0)


@dataclass
class Stubs:
    capture: capture_pb2_grpc.ServerCaptureServiceStub
    servers: provisioning_pb2_grpc.ProvisioningServiceStub
    images: image_pb2_grpc.ImageServiceStub


@pytest.fixture
async def stubs(pair: Pair) -> AsyncIterator[Stubs]:
    async with (
        grpc.aio.insecure_channel(pair.provisioner.address) as fleet_channel,
        grpc.aio.insecure_channel(pair.images.address) as image_channel,
    ):
        yield Stubs(
            capture_pb2_grpc.ServerCaptureServiceStub(fleet_channel),
            provisioning_pb2_grpc.ProvisioningServiceStub(fleet_channel),
            image_pb2_grpc.ImageServiceStub(image_channel),
        )


async def stopped_servers(
    servers: provisioning_pb2_grpc.ProvisioningServiceStub,
    metadata: Metadata,
    count: int = 1,
    prefix: str = "held",
) -> list[str]:
    stream = servers.CreateServers(
        provisioning_pb2.CreateServersRequest(
            flavor=S4, image=CENTOS, count=count, name_prefix=prefix
        ),
        metadata=metadata,
    )
    finals = [e async for e in stream if e.stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE]
    assert len(finals) == count
    names = [str(event.server) for event in finals]
    await asyncio.gather(
        *(
            servers.StopServer(provisioning_pb2.StopServerRequest(name=name), metadata=metadata)
            for name in names
        )
    )
    return names


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    rich = decode(caught.value)
    return rich.code, rich.reason


async def task_of(stubs: Stubs, md: Metadata, server: str) -> str:
    got = await stubs.servers.GetServer(provisioning_pb2.GetServerRequest(name=server), metadata=md)
    return str(got.task)


async def test_capture_calls_are_checked_like_public_ones(pair: Pair, stubs: Stubs) -> None:
    alpha, beta = pair.internal("alpha"), pair.internal("beta")
    (server,) = await stopped_servers(stubs.servers, pair.user("alpha"))
    capture = stubs.capture
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


def forged_service_credential(**claims: object) -> str:
    """A credential of the image service's shape, signed with the user-token
    key (the secret itself) instead of the derived service key."""
    now = int(time.time())
    values: dict[str, object] = {
        "iss": "bms-image",
        "aud": SERVICE_AUDIENCE,
        "sub": "image-service",
        "iat": now,
        "exp": now + 600,
    }
    values.update(claims)
    return jwt.encode(values, TEST_SECRET, algorithm="HS256")


async def test_only_the_image_service_identity_may_call_it(pair: Pair, stubs: Stubs) -> None:
    """A user token alone, even an admin's, is refused; so is a service
    credential without a user token, a forged one, the provisioner's own,
    and a user token minted with the service audience."""
    (server,) = await stopped_servers(stubs.servers, pair.user("alpha"))
    user = pair.user("alpha")
    admin = bearer(pair.images.authority.issue("alpha", admin=True))
    credential = pair.images.authority.issue_service("image-service")
    service_only = ((SERVICE_METADATA_KEY, f"Bearer {credential}"),)
    forged = (*user, (SERVICE_METADATA_KEY, f"Bearer {forged_service_credential()}"))
    user_with_service_audience = forged_service_credential(sub="alpha")
    audience_in_service_key = (
        *user,
        (SERVICE_METADATA_KEY, f"Bearer {user_with_service_audience}"),
    )
    audience_as_user = (
        ("authorization", f"Bearer {user_with_service_audience}"),
        (SERVICE_METADATA_KEY, f"Bearer {credential}"),
    )
    user_token_as_credential = (*user, (SERVICE_METADATA_KEY, user[0][1]))
    expected = {
        "no token": ((), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
        "user token only": (user, grpc.StatusCode.PERMISSION_DENIED, "SERVICE_IDENTITY_REQUIRED"),
        "admin token only": (
            admin,
            grpc.StatusCode.PERMISSION_DENIED,
            "SERVICE_IDENTITY_REQUIRED",
        ),
        "service credential only": (
            service_only,
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_MISSING",
        ),
        "forged credential": (
            forged,
            grpc.StatusCode.UNAUTHENTICATED,
            "SERVICE_IDENTITY_INVALID",
        ),
        "user token as credential": (
            user_token_as_credential,
            grpc.StatusCode.UNAUTHENTICATED,
            "SERVICE_IDENTITY_INVALID",
        ),
        "service audience as credential": (
            audience_in_service_key,
            grpc.StatusCode.UNAUTHENTICATED,
            "SERVICE_IDENTITY_INVALID",
        ),
        "service audience as user token": (
            audience_as_user,
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_INVALID",
        ),
        "the provisioner's credential": (
            pair.internal("alpha", service="provisioner"),
            grpc.StatusCode.PERMISSION_DENIED,
            "SERVICE_IDENTITY_REQUIRED",
        ),
    }
    capture = stubs.capture
    for name, (metadata, code, reason) in expected.items():
        for call in (
            capture.PrepareServerCapture(
                capture_pb2.PrepareServerCaptureRequest(server=server), metadata=metadata
            ),
            capture.StartServerCapture(
                capture_pb2.StartServerCaptureRequest(
                    server=server, image="images/00000000-0000-4000-8000-000000000001"
                ),
                metadata=metadata,
            ),
            capture.ReleaseServerCapture(
                capture_pb2.ReleaseServerCaptureRequest(server=server), metadata=metadata
            ),
        ):
            assert await refused(call) == (code, reason), name
    assert await task_of(stubs, user, server) == "", "nothing held the server"
    described = await capture.PrepareServerCapture(
        capture_pb2.PrepareServerCaptureRequest(server=server), metadata=pair.internal("alpha")
    )
    assert described.os_distro == "centos", "the image service's own identity is accepted"


@pytest.fixture
def paused_uploads(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.Event]:
    """Captures wait before their upload opens (their image still QUEUED,
    their server captured) until the event is set."""
    go = asyncio.Event()
    original = ImageSource.upload

    async def paused(self: ImageSource, *args: Any, **kwargs: Any) -> image_pb2.Image:
        await go.wait()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ImageSource, "upload", paused)
    yield go
    go.set()


async def wait_for_status(stubs: Stubs, md: Metadata, name: str, status: int) -> image_pb2.Image:
    deadline = time.monotonic() + PATIENCE_SECONDS
    while True:
        image = await stubs.images.GetImage(image_pb2.GetImageRequest(name=name), metadata=md)
        if image.status == status or time.monotonic() > deadline:
            return image
        await asyncio.sleep(0.05)


def upload_requests(name: str, data: bytes) -> Iterator[image_pb2.UploadImageDataRequest]:
    yield image_pb2.UploadImageDataRequest(
        metadata=image_pb2.UploadImageDataMetadata(name=name, size_bytes=len(data))
    )
    yield image_pb2.UploadImageDataRequest(chunk=data)


async def test_a_capture_starts_once_into_its_own_image_and_runs_to_its_end(
    pair: Pair, stubs: Stubs, paused_uploads: asyncio.Event
) -> None:
    user = pair.user("alpha")
    internal = pair.internal("alpha")
    captured, other = await stopped_servers(stubs.servers, user, count=2)
    created = await stubs.images.CreateImage(
        image_pb2.CreateImageRequest(
            image=image_pb2.Image(display_name="backup"), source_server=captured
        ),
        metadata=user,
    )
    assert created.status == image_pb2.IMAGE_STATUS_QUEUED
    assert created.source_server == captured
    assert await task_of(stubs, user, captured) == "capture"

    # the owner's own bytes never go into a capture image, nor the image service's
    for metadata in (user, internal):
        upload = stubs.images.UploadImageData(
            iter(upload_requests(created.name, b"x" * 4096)), metadata=metadata
        )
        assert await refused(upload) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "IMAGE_BYTES_FROM_CAPTURE",
        )
    # a second start for the same image and server
    again = capture_pb2.StartServerCaptureRequest(server=captured, image=created.name)
    assert await refused(stubs.capture.StartServerCapture(again, metadata=internal)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAPTURE_ALREADY_STARTED",
    )
    # a running capture is not released
    release = capture_pb2.ReleaseServerCaptureRequest(server=captured)
    assert await refused(stubs.capture.ReleaseServerCapture(release, metadata=internal)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAPTURE_RUNNING",
    )
    assert await task_of(stubs, user, captured) == "capture"

    # another held server started into an image that is not its capture
    await stubs.capture.PrepareServerCapture(
        capture_pb2.PrepareServerCaptureRequest(server=other), metadata=internal
    )
    assert await task_of(stubs, user, other) == "capture-hold"
    plain = await stubs.images.CreateImage(
        image_pb2.CreateImageRequest(image=private_image("plain")),
        metadata=user,
    )
    for unrelated in (plain.name, created.name):
        request = capture_pb2.StartServerCaptureRequest(server=other, image=unrelated)
        assert await refused(stubs.capture.StartServerCapture(request, metadata=internal)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "CAPTURE_IMAGE_MISMATCH",
        ), unrelated
    assert await task_of(stubs, user, other) == "capture-hold", "still held, not started"
    await stubs.capture.ReleaseServerCapture(
        capture_pb2.ReleaseServerCaptureRequest(server=other), metadata=internal
    )
    assert await task_of(stubs, user, other) == ""

    # the capture itself uploads with the provisioner's identity: it ends ACTIVE
    paused_uploads.set()
    active = await wait_for_status(stubs, user, created.name, image_pb2.IMAGE_STATUS_ACTIVE)
    assert active.status == image_pb2.IMAGE_STATUS_ACTIVE, active.status_reason
    plain_after = await stubs.images.GetImage(
        image_pb2.GetImageRequest(name=plain.name), metadata=user
    )
    assert plain_after.status == image_pb2.IMAGE_STATUS_QUEUED, "nothing was written into it"
    for _ in range(1200):  # bounded wait for the release, not a timing assertion
        if not await task_of(stubs, user, captured):
            break
        await asyncio.sleep(0.05)
    assert await task_of(stubs, user, captured) == ""
    # once ended, the image takes no second capture
    await stubs.capture.PrepareServerCapture(
        capture_pb2.PrepareServerCaptureRequest(server=captured), metadata=internal
    )
    assert await refused(stubs.capture.StartServerCapture(again, metadata=internal)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAPTURE_IMAGE_MISMATCH",
    )
    await stubs.capture.ReleaseServerCapture(release, metadata=internal)


async def test_a_hold_whose_capture_never_starts_lapses(
    pair: Pair, stubs: Stubs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image service may die between PrepareServerCapture and
    StartServerCapture: the provisioner lets the server go by itself."""
    monkeypatch.setattr(captures_module, "CAPTURE_START_SECONDS", 0.05)
    alpha = pair.user("alpha")
    (server,) = await stopped_servers(stubs.servers, alpha)
    await stubs.capture.PrepareServerCapture(
        capture_pb2.PrepareServerCaptureRequest(server=server), metadata=pair.internal("alpha")
    )
    for _ in range(200):  # bounded wait for the lapse, not a timing assertion
        if not await task_of(stubs, alpha, server):
            break
        await asyncio.sleep(0.05)
    assert await task_of(stubs, alpha, server) == "", "the hold lapsed"
    started = await stubs.servers.StartServer(
        provisioning_pb2.StartServerRequest(name=server), metadata=alpha
    )
    assert started.state == provisioning_pb2.SERVER_STATE_ACTIVE


async def test_45_parallel_captures_give_exactly_40(tmp_path: Path, database_url: str) -> None:
    """The limit of 40 captures at once per project holds under a burst of
    45 PrepareServerCapture calls, on SQLite and PostgreSQL; another project
    is not held back by it."""
    running = await start_pair(tmp_path, database_url)
    try:
        async with grpc.aio.insecure_channel(running.provisioner.address) as channel:
            servers = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
            capture = capture_pb2_grpc.ServerCaptureServiceStub(channel)
            alpha, internal = running.user("alpha"), running.internal("alpha")
            names = await stopped_servers(servers, alpha, count=45, prefix="burst")
            (beta_server,) = await stopped_servers(servers, running.user("beta"), prefix="beta")

            async def prepare(name: str) -> str:
                try:
                    await capture.PrepareServerCapture(
                        capture_pb2.PrepareServerCaptureRequest(server=name), metadata=internal
                    )
                except grpc.aio.AioRpcError as error:
                    rich = decode(error)
                    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED, rich.message
                    assert rich.quota_failure is not None
                    return rich.reason
                return "OK"

            outcomes = await asyncio.gather(*(prepare(name) for name in names))
            assert sorted(set(outcomes)) == ["CAPTURE_LIMIT", "OK"], outcomes
            assert outcomes.count("OK") == 40, outcomes
            tasks = [
                (
                    await servers.GetServer(
                        provisioning_pb2.GetServerRequest(name=name), metadata=alpha
                    )
                ).task
                for name in names
            ]
            assert tasks.count("capture-hold") == 40 and tasks.count("") == 5, tasks
            await capture.PrepareServerCapture(
                capture_pb2.PrepareServerCaptureRequest(server=beta_server),
                metadata=running.internal("beta"),
            )
    finally:
        await running.provisioner.stop(0)
        await running.images.stop(0)


async def test_45_parallel_create_image_captures_give_exactly_40(
    pair: Pair, stubs: Stubs, paused_uploads: asyncio.Event
) -> None:
    """The same limit through the public API: CreateImage with a
    source_server, 45 at once; the refused ones leave no image behind."""
    alpha = pair.user("alpha")
    names = await stopped_servers(stubs.servers, alpha, count=45, prefix="burst")

    async def capture(name: str) -> str:
        try:
            await stubs.images.CreateImage(
                image_pb2.CreateImageRequest(
                    image=image_pb2.Image(display_name="burst"), source_server=name
                ),
                metadata=alpha,
            )
        except grpc.aio.AioRpcError as error:
            rich = decode(error)
            assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED, rich.message
            return rich.reason
        return "OK"

    outcomes = await asyncio.gather(*(capture(name) for name in names))
    assert outcomes.count("OK") == 40 and outcomes.count("CAPTURE_LIMIT") == 5, outcomes
    listing = await stubs.images.ListImages(
        image_pb2.ListImagesRequest(filter="type = private", page_size=100), metadata=alpha
    )
    assert len(listing.images) == 40, [i.name for i in listing.images]
    paused_uploads.set()
    for image in listing.images:
        active = await wait_for_status(stubs, alpha, image.name, image_pb2.IMAGE_STATUS_ACTIVE)
        assert active.status == image_pb2.IMAGE_STATUS_ACTIVE, active.status_reason
