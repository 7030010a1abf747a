"""Deadlines and cancellation: every streaming RPC honours a client deadline
and a cancellation, and what the call held on the server is let go.

What "let go" is measured by: the server's handler task for the call (grpc.aio
runs each RPC in a task named `HandleExceptions[<method>]`, see
reliability_support.active_handlers -- the tests run the service in their own
event loop, so they see its tasks), the image file a download holds open
(/proc/self/fd), and the state a broken-off upload leaves (QUEUED with
`uploaded_bytes`, resumable).

To cancel a call *while the server is busy with it*, a gate holds the
server's work at a well-defined point (after the first chunk read from the
blob store, before a deployment writes the disk, before a create reaches the
database); the gate is a wrapper installed with monkeypatch around the real
code, which it then runs unchanged. Without it, whether a call was still
running when it was cancelled would depend on timing.

Timeouts here are deadlines under test or hang guards, never measurements.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import reliability_support as rs

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.common.config import Settings
from bms_image.common.guard import CallGuard
from bms_image.common.serving import RunningService
from bms_image.fleet.domain.fleet import Fleet
from bms_image.images.adapters.chunks.store import ChunkStore
from bms_image.images.adapters.repository import SqlImageRepository
from support import chunk_store
from support.errors import Code
from support.services import ImageStub, ProvisioningStub, make_settings, received_upload_bytes
from support.tokens import Metadata

CHUNK = 16 * 1024
#: A deadline that passes while the server is held by a gate: long enough
#: for the first messages to arrive, and certain to pass (the gate stays shut).
SHORT_DEADLINE = 3.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Downloads in 16 KiB messages, so an image is many messages."""
    return make_settings(tmp_path, chunk_bytes=CHUNK)


@pytest.fixture
def owner(service: RunningService) -> Metadata:
    return rs.identity(service, "deadline-owner")


class Gate:
    """Holds the server's work until opened; counts who waits."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self.waiting = 0

    async def wait(self) -> None:
        self.waiting += 1
        try:
            await self._open.wait()
        finally:
            self.waiting -= 1

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    opened = Gate()
    yield opened
    opened.open()  # whatever a test left held goes on, and the service can stop


@pytest.fixture
def slow_blobs(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> Gate:
    """Reads of the image store give their first chunk, then wait for the
    gate; the keys of reads not yet closed are in READING."""
    original = ChunkStore.read

    async def read(
        self: ChunkStore, key: str, offset: int = 0, chunk_bytes: int = CHUNK
    ) -> AsyncIterator[bytes]:
        first = True
        READING.append(key)
        try:
            async for chunk in original(self, key, offset, chunk_bytes):
                yield chunk
                if first:
                    first = False
                    await gate.wait()
        finally:
            READING.remove(key)

    monkeypatch.setattr(ChunkStore, "read", read)
    return gate


#: The keys of the image store's reads in progress (see slow_blobs).
READING: list[str] = []


def chunk_fetches() -> list[asyncio.Task[Any]]:
    """The image store's fetches of chunks not finished (a read's read-ahead)."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "") == "ChunkStore._fetch"
    ]


def held_before(monkeypatch: pytest.MonkeyPatch, gate: Gate, owner: type, method: str) -> Gate:
    """`owner.method` waits for the gate, then runs unchanged."""
    original = getattr(owner, method)

    async def held(self: Any, *args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, held)
    return gate


@pytest.fixture
def slow_deployments(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> Gate:
    """Deployments (and reinstalls) wait for the gate before writing a disk."""
    return held_before(monkeypatch, gate, Fleet, "_deploy_one")


@pytest.fixture
def slow_creates(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> Gate:
    """Private images wait for the gate before they reach the database."""
    return held_before(monkeypatch, gate, SqlImageRepository, "create_private")


def blob_files(service: RunningService) -> list[str]:
    return rs.open_files_under(service.settings.data_dir / "blobs")


async def no_handlers(method: str = "") -> None:
    await rs.eventually(
        lambda: not rs.active_handlers(method), f"no handler of {method or 'any RPC'}"
    )


async def get_image(images: ImageStub, md: Metadata, name: str) -> image_pb2.Image:
    image: image_pb2.Image = await images.GetImage(
        image_pb2.GetImageRequest(name=name), metadata=md, timeout=rs.CALL_TIMEOUT
    )
    return image


# -- the probe itself ---------------------------------------------------------------------------


async def test_the_server_handler_of_a_call_is_visible_while_it_runs(
    images: ImageStub, owner: Metadata, slow_blobs: Gate
) -> None:
    """What the other tests rely on: grpc.aio still names the task serving a
    call `HandleExceptions[<method>]` (an implementation detail of grpcio)."""
    image = await rs.create_active(images, owner, rs.random_payload(4 * CHUNK))
    assert not rs.active_handlers()
    call = images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=image.name), metadata=owner, timeout=rs.CALL_TIMEOUT
    )
    await call.read()
    assert rs.active_handlers() == [
        "HandleExceptions[/bms.image.v1.ImageService/DownloadImageData]"
    ]
    slow_blobs.open()
    await drain(call)
    await no_handlers()


# -- downloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
async def test_a_download_broken_off_lets_go_of_its_stream_and_file(
    ending: str,
    service: RunningService,
    channel: grpc.aio.Channel,
    images: ImageStub,
    owner: Metadata,
    slow_blobs: Gate,
) -> None:
    data = rs.random_payload(40 * CHUNK + 5)
    image = await rs.create_active(images, owner, data)
    image_id = image.name.removeprefix("images/")
    timeout = SHORT_DEADLINE if ending == "deadline" else rs.CALL_TIMEOUT
    call = images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=image.name), metadata=owner, timeout=timeout
    )
    first = await call.read()
    assert isinstance(first, image_pb2.DownloadImageDataResponse)
    assert first.offset == 0 and first.chunk == data[:CHUNK]
    await rs.eventually(lambda: slow_blobs.waiting == 1, "the server holds the download")
    # Held mid-stream: the server serves the call and its read of the image
    # is open (chunks are read whole: no file of them stays open).
    assert rs.active_handlers("ImageService/DownloadImageData")
    assert READING == [image_id]

    if ending == "cancel":
        assert call.cancel()
        assert await call.code() == Code.CANCELLED
    else:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain(call)
        assert raised.value.code() == Code.DEADLINE_EXCEEDED
    await no_handlers("ImageService/DownloadImageData")
    await rs.eventually(lambda: slow_blobs.waiting == 0, "the held read was abandoned")
    await rs.eventually(lambda: not READING, "the image's read is closed")
    await rs.eventually(lambda: not chunk_fetches(), "the read's fetches are over")
    await rs.eventually(lambda: not blob_files(service), "the image file is closed")

    # Nothing holds the image: another client downloads it whole, and it can be deleted.
    slow_blobs.open()
    parts = [
        message.chunk
        async for message in images.DownloadImageData(
            image_pb2.DownloadImageDataRequest(name=image.name),
            metadata=owner,
            timeout=rs.CALL_TIMEOUT,
        )
    ]
    assert b"".join(parts) == data
    await images.DeleteImage(
        image_pb2.DeleteImageRequest(name=image.name), metadata=owner, timeout=rs.CALL_TIMEOUT
    )
    data_dir = service.settings.data_dir
    assert not list((data_dir / "blobs").glob(f"{image_id}*"))
    assert not chunk_store.stored(data_dir, image.name)
    assert chunk_store.chunk_files(data_dir, image.name) == []
    await rs.still_serving(channel, owner)


async def test_a_client_that_stops_reading_a_download_and_cancels_leaks_nothing(
    service: RunningService,
    channel: grpc.aio.Channel,
    images: ImageStub,
    owner: Metadata,
) -> None:
    """No gate: a client reads one message of a 4 MiB download (256
    messages), stops reading, and cancels. Wherever the server was (blocked
    by flow control, or done), nothing of the call remains."""
    data = rs.random_payload(256 * CHUNK)
    image = await rs.create_active(images, owner, data)
    call = images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=image.name), metadata=owner, timeout=rs.CALL_TIMEOUT
    )
    first = await call.read()
    assert isinstance(first, image_pb2.DownloadImageDataResponse)
    assert first.chunk == data[:CHUNK]
    call.cancel()
    await no_handlers()
    await rs.eventually(lambda: not chunk_fetches(), "the read's fetches are over")
    await rs.eventually(lambda: not blob_files(service), "the image file is closed")
    await rs.still_serving(channel, owner)


# -- uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
async def test_an_upload_broken_off_stays_resumable(
    ending: str,
    service: RunningService,
    channel: grpc.aio.Channel,
    images: ImageStub,
    owner: Metadata,
) -> None:
    """A client sends the first part of an image and stalls; the call is
    cancelled (or its deadline passes). The image goes back to QUEUED with
    `uploaded_bytes` = what arrived, and a second stream from that offset
    completes it."""
    data = rs.random_payload(300_000)
    sent = 5 * 32 * 1024
    queued = await rs.create_private(images, owner)
    stalled = asyncio.Event()

    messages = [
        image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(name=queued.name)
        ),
        *(
            image_pb2.UploadImageDataRequest(chunk=data[start : start + 32 * 1024])
            for start in range(0, sent, 32 * 1024)
        ),
    ]
    before = received_upload_bytes(service)

    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        for message in messages:
            yield message
        await stalled.wait()  # the client stalls: never set

    timeout = SHORT_DEADLINE if ending == "deadline" else rs.CALL_TIMEOUT
    call = images.UploadImageData(requests(), metadata=owner, timeout=timeout)
    everything = before + sum(message.ByteSize() for message in messages)
    await rs.eventually(
        lambda: received_upload_bytes(service) >= everything, "the server took in what was sent"
    )
    saving = await get_image(images, owner, queued.name)
    assert saving.status == image_pb2.IMAGE_STATUS_SAVING
    assert rs.active_handlers("ImageService/UploadImageData")

    if ending == "cancel":
        assert call.cancel()
        assert await call.code() == Code.CANCELLED
    else:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == Code.DEADLINE_EXCEEDED
    await no_handlers("ImageService/UploadImageData")

    async def queued_again() -> bool:
        image = await get_image(images, owner, queued.name)
        return bool(image.status == image_pb2.IMAGE_STATUS_QUEUED)

    await rs.eventually(queued_again, "the broken-off rs.upload is QUEUED again")
    broken = await get_image(images, owner, queued.name)
    assert broken.uploaded_bytes == sent
    assert str(sent) in broken.status_reason

    active = await rs.upload(images, owner, queued.name, data[sent:], offset=sent)
    assert active.status == image_pb2.IMAGE_STATUS_ACTIVE
    assert active.size_bytes == len(data)
    assert active.sha256 == hashlib.sha256(data).hexdigest()
    await rs.still_serving(channel, owner)


# -- deployments, reinstalls, watching -----------------------------------------------------------


async def drain(call: grpc.aio.UnaryStreamCall) -> list[Any]:
    """The rest of a server stream, read with read() (a call read once with
    read() may not be iterated)."""
    rest: list[Any] = []
    while (message := await call.read()) is not grpc.aio.EOF:
        rest.append(message)
    return rest


async def first_events(
    call: grpc.aio.UnaryStreamCall, count: int
) -> list[provisioning_pb2.ServerEvent]:
    events: list[provisioning_pb2.ServerEvent] = []
    while len(events) < count:
        event = await call.read()
        assert isinstance(event, provisioning_pb2.ServerEvent), event
        events.append(event)
    return events


async def server_state(provisioning: ProvisioningStub, md: Metadata, name: str) -> int:
    server = await provisioning.GetServer(
        provisioning_pb2.GetServerRequest(name=name), metadata=md, timeout=rs.CALL_TIMEOUT
    )
    return int(server.state)


async def watch_to_the_end(
    provisioning: ProvisioningStub, md: Metadata, name: str
) -> list[provisioning_pb2.ServerEvent]:
    return [
        event
        async for event in provisioning.WatchServer(
            provisioning_pb2.WatchServerRequest(name=name), metadata=md, timeout=rs.CALL_TIMEOUT
        )
    ]


async def test_dropped_deployment_and_watch_streams_let_go_and_the_work_goes_on(
    channel: grpc.aio.Channel,
    provisioning: ProvisioningStub,
    owner: Metadata,
    slow_deployments: Gate,
) -> None:
    """CreateServers is cancelled after its first event, while the
    deployment is held; WatchServer re-attaches, is cancelled, and another
    WatchServer runs into its deadline. Each call's handler goes away, the
    deployment goes on once let go, and a last WatchServer follows it to ACTIVE."""
    create = provisioning.CreateServers(
        rs.deploy_request(image=rs.CENTOS, prefix="held"), metadata=owner, timeout=rs.CALL_TIMEOUT
    )
    (validating,) = await first_events(create, 1)
    assert validating.stage == provisioning_pb2.PROVISIONING_STAGE_VALIDATING
    server = validating.server
    await rs.eventually(lambda: slow_deployments.waiting == 1, "the deployment is held")
    assert rs.active_handlers("ProvisioningService/CreateServers")
    assert create.cancel()
    await no_handlers("ProvisioningService/CreateServers")

    watch = provisioning.WatchServer(
        provisioning_pb2.WatchServerRequest(name=server), metadata=owner, timeout=rs.CALL_TIMEOUT
    )
    (replayed,) = await first_events(watch, 1)
    assert (replayed.server, replayed.stage) == (server, validating.stage)
    assert rs.active_handlers("ProvisioningService/WatchServer")
    assert watch.cancel()
    await no_handlers("ProvisioningService/WatchServer")

    late = provisioning.WatchServer(
        provisioning_pb2.WatchServerRequest(name=server), metadata=owner, timeout=SHORT_DEADLINE
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in late:
            assert event.stage not in rs.FINAL_STAGES, "the held deployment ended"
    assert raised.value.code() == Code.DEADLINE_EXCEEDED
    await no_handlers("ProvisioningService/WatchServer")
    assert await server_state(provisioning, owner, server) == provisioning_pb2.SERVER_STATE_BUILDING

    slow_deployments.open()
    events = await watch_to_the_end(provisioning, owner, server)
    assert events[-1].stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE, events[-1]
    assert await server_state(provisioning, owner, server) == provisioning_pb2.SERVER_STATE_ACTIVE
    await no_handlers()
    await provisioning.DeleteServer(
        provisioning_pb2.DeleteServerRequest(name=server), metadata=owner, timeout=rs.CALL_TIMEOUT
    )
    await rs.still_serving(channel, owner)


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
async def test_a_dropped_reinstall_stream_lets_go_and_the_reinstall_goes_on(
    ending: str,
    channel: grpc.aio.Channel,
    provisioning: ProvisioningStub,
    owner: Metadata,
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await rs.deploy(provisioning, owner)
    await rs.stop_server(provisioning, owner, server)
    original = Fleet._deploy_one

    async def held(self: Fleet, *args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await original(self, *args, **kwargs)

    monkeypatch.setattr(Fleet, "_deploy_one", held)
    timeout = SHORT_DEADLINE if ending == "deadline" else rs.CALL_TIMEOUT
    call = provisioning.ReinstallServer(
        provisioning_pb2.ReinstallServerRequest(name=server), metadata=owner, timeout=timeout
    )
    (validating,) = await first_events(call, 1)
    assert validating.state == provisioning_pb2.SERVER_STATE_REBUILDING
    await rs.eventually(lambda: gate.waiting == 1, "the reinstall is held")
    if ending == "cancel":
        assert call.cancel()
    else:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            for event in await drain(call):
                assert event.stage not in rs.FINAL_STAGES, "the held reinstall ended"
        assert raised.value.code() == Code.DEADLINE_EXCEEDED
    await no_handlers("ProvisioningService/ReinstallServer")
    assert (
        await server_state(provisioning, owner, server) == provisioning_pb2.SERVER_STATE_REBUILDING
    )

    gate.open()
    events = await watch_to_the_end(provisioning, owner, server)
    assert events[-1].stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE, events[-1]
    assert await server_state(provisioning, owner, server) == provisioning_pb2.SERVER_STATE_ACTIVE
    await rs.still_serving(channel, owner)


# -- unary calls ---------------------------------------------------------------------------------


@pytest.fixture
def held_at_the_door(monkeypatch: pytest.MonkeyPatch, gate: Gate) -> Gate:
    """Every call of our services waits for the gate in the interceptor,
    before authentication and before its servicer runs."""
    original = CallGuard.intercept_service

    async def intercept_service(self: CallGuard, continuation: Any, details: Any) -> Any:
        if details.method.startswith("/bms.image.v1."):
            await gate.wait()
        return await original(self, continuation, details)

    monkeypatch.setattr(CallGuard, "intercept_service", intercept_service)
    return gate


async def test_every_rpc_whose_deadline_passes_is_deadline_exceeded(
    service: RunningService, channel: grpc.aio.Channel, held_at_the_door: Gate
) -> None:
    """All 25 RPCs, each held before the service looks at it, with a 50 ms
    deadline: DEADLINE_EXCEEDED at the client; the server abandons every one
    of them and serves on once the door opens."""
    owner = rs.identity(service, "deadline-owner")
    wrong: list[str] = []
    for method in rs.every_method():
        request = rs.message_class(method.input_type)()
        body: Any = [request] if method.client_streaming else request
        outcome = await rs.call_rpc(channel, method, body, owner, deadline=0.05)
        if outcome.code != Code.DEADLINE_EXCEEDED:
            wrong.append(f"{rs.rpc_id(method)}: {outcome.code.name}")
    assert not wrong, wrong
    await rs.eventually(lambda: held_at_the_door.waiting == 0, "every held call was abandoned")
    await no_handlers()
    held_at_the_door.open()
    assert await rs.healthy(channel)
    await rs.still_serving(channel, owner)


async def test_a_unary_call_whose_deadline_passes_mid_work_is_abandoned(
    channel: grpc.aio.Channel,
    images: ImageStub,
    owner: Metadata,
    slow_creates: Gate,
) -> None:
    """CreateImage is held before it reaches the database; its deadline
    passes. The client gets DEADLINE_EXCEEDED, the server abandons the call
    (its handler is gone, nothing was created), and serves on."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await images.CreateImage(
            image_pb2.CreateImageRequest(image=rs.private_image(display_name="never-created")),
            metadata=owner,
            timeout=SHORT_DEADLINE,
        )
    assert raised.value.code() == Code.DEADLINE_EXCEEDED
    await no_handlers("ImageService/CreateImage")
    await rs.eventually(lambda: slow_creates.waiting == 0, "the held create was abandoned")
    slow_creates.open()
    listed = await images.ListImages(
        image_pb2.ListImagesRequest(filter="name = never-created"),
        metadata=owner,
        timeout=rs.CALL_TIMEOUT,
    )
    assert not listed.images
    await rs.still_serving(channel, owner)
