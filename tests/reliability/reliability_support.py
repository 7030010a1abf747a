"""Helpers of the reliability tests (token matrix, hostile input, deadlines):
every RPC enumerated from the service descriptors and called generically,
forged tokens, scene builders, and ways to see what the server still holds
(handler tasks, open files). Plain functions: import them as
`from reliability_support import ...` (never from a conftest module)."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
from google.protobuf import field_mask_pb2, message_factory, text_format
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bms.image.v1 import (
    image_pb2,
    provisioning_pb2,
    sharing_pb2,
)
from bms_image.common import disk_format as disks
from bms_image.common.model import Plugin, PluginKind
from bms_image.common.serving import RunningService
from support import builders
from support.errors import Code
from support.services import ImageStub, ProvisioningStub, Serving, SharingStub, serving  # noqa: F401 - re-exported
from support.tokens import (
    Metadata,
    bearer,
)

#: Every call gets a deadline this long: a guard against hangs, never a
#: measure of speed (a call that reaches it fails the test as a hang).
CALL_TIMEOUT = 30.0
#: How long a condition polled with `eventually` may take before it counts as a hang.
HANG_GUARD = 30.0

S4 = builders.S4_FLAVOR
S4_FLAVOR = f"flavors/{S4}"
S4_MODEL = builders.S4_MODEL
CENTOS = builders.CENTOS_IMAGE

OTHER_SECRET = "not-the-service-secret-" + "7" * 48

# -- the API, from its descriptors ----------------------------------------------

SERVICES: tuple[ServiceDescriptor, ...] = (
    image_pb2.DESCRIPTOR.services_by_name["ImageService"],
    sharing_pb2.DESCRIPTOR.services_by_name["SharingService"],
    provisioning_pb2.DESCRIPTOR.services_by_name["ProvisioningService"],
)
SERVICE_BY_NAME: dict[str, ServiceDescriptor] = {s.name: s for s in SERVICES}


def every_method() -> list[MethodDescriptor]:
    """Every RPC of the three services, in proto order."""
    return [method for service in SERVICES for method in service.methods]


def rpc_id(method: MethodDescriptor) -> str:
    """`ImageService.GetImage`."""
    return f"{method.containing_service.name}.{method.name}"


def method_path(method: MethodDescriptor) -> str:
    """`/bms.image.v1.ImageService/GetImage`: what goes on the wire."""
    return f"/{method.containing_service.full_name}/{method.name}"


def method_by_id(rpc: str) -> MethodDescriptor:
    service, _, name = rpc.partition(".")
    return SERVICE_BY_NAME[service].methods_by_name[name]


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def streaming_kind(method: MethodDescriptor) -> str:
    """unary_unary, unary_stream, stream_unary or stream_stream."""
    left = "stream" if method.client_streaming else "unary"
    right = "stream" if method.server_streaming else "unary"
    return f"{left}_{right}"


def text_of(messages: Iterable[Message]) -> str:
    """Messages as readable text (UTF-8 kept), for leak searches."""
    return "\n".join(text_format.MessageToString(m, as_utf8=True) for m in messages)


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# -- tokens ----------------------------------------------------------------------


def forge_token(secret: str, project: str, *, admin: bool = False, expires_in: int = 3600) -> str:
    """An HS256 JWT as bms_image.common.auth issues them, signed with `secret`;
    a negative `expires_in` makes it expired."""
    now = int(time.time())
    claims = {
        "iss": "bms-image",
        "aud": "bms-image",
        "sub": project,
        "roles": ["admin"] if admin else [],
        "iat": now - max(0, -expires_in) - 60,
        "exp": now + expires_in,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def identity(service: RunningService, project: str, admin: bool = False) -> Metadata:
    """Call metadata with a valid token of `project`, forged with the
    service's own secret (what `bms-image token` does)."""
    return bearer(forge_token(service.settings.token_secret, project, admin=admin))


# -- generic calls -----------------------------------------------------------------


@dataclass
class Outcome:
    """How a call ended: its code, what it answered, and the error if any."""

    code: grpc.StatusCode
    responses: list[Message] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None

    @property
    def details(self) -> str:
        return (self.error.details() or "") if self.error is not None else ""

    def said(self) -> str:
        """Everything the caller learnt, as text."""
        parts = [text_of(self.responses)]
        if self.error is not None:
            parts += [self.details, repr(self.error.trailing_metadata() or ())]
        return "\n".join(parts)


async def call_rpc(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Message | Sequence[Message],
    metadata: Metadata = (),
    *,
    deadline: float = CALL_TIMEOUT,
    max_messages: int = 1_000_000,
) -> Outcome:
    """Calls any RPC by its descriptor. A client stream takes a sequence of
    requests; of a server stream at most `max_messages` are read, then the
    call is cancelled (a cancellation we asked for is not an error)."""
    serializer = message_class(method.input_type).SerializeToString
    deserializer = message_class(method.output_type).FromString
    return await _invoke(
        channel, method, request, metadata, deadline, max_messages, serializer, deserializer
    )


async def call_raw(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    payload: bytes,
    metadata: Metadata = (),
    *,
    deadline: float = CALL_TIMEOUT,
) -> Outcome:
    """Sends `payload` as the request's bytes, whatever they are (for a
    client stream: as its only message); replies are kept as bytes."""
    request: bytes | list[bytes] = [payload] if method.client_streaming else payload
    return await _invoke(channel, method, request, metadata, deadline, 4, None, None)


async def read_stream(
    call: Any, limit: int = 1_000_000, into: list[Any] | None = None
) -> list[Any]:
    """Up to `limit` messages of a streaming call, then the call is cancelled.
    They are appended to `into` as they come, so what arrived before an
    error is kept there."""
    got: list[Any] = [] if into is None else into
    try:
        async for message in call:
            got.append(message)
            if len(got) >= limit:
                break
    finally:
        call.cancel()
    return got


async def _invoke(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Any,
    metadata: Metadata,
    deadline: float,
    max_messages: int,
    serializer: Callable[[Any], bytes] | None,
    deserializer: Callable[[bytes], Any] | None,
) -> Outcome:
    path = method_path(method)
    kind = streaming_kind(method)
    options: dict[str, Any] = {
        "request_serializer": serializer,
        "response_deserializer": deserializer,
    }
    responses: list[Any] = []
    try:
        if kind == "unary_unary":
            responses.append(
                await channel.unary_unary(path, **options)(
                    request, metadata=metadata, timeout=deadline
                )
            )
        elif kind == "stream_unary":
            responses.append(
                await channel.stream_unary(path, **options)(
                    iter(list(request)), metadata=metadata, timeout=deadline
                )
            )
        else:
            if kind == "unary_stream":
                call = channel.unary_stream(path, **options)(
                    request, metadata=metadata, timeout=deadline
                )
            else:
                call = channel.stream_stream(path, **options)(
                    iter(list(request)), metadata=metadata, timeout=deadline
                )
            await read_stream(call, max_messages, into=responses)
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code(), responses, error)
    return Outcome(Code.OK, responses)


# -- observing the server ---------------------------------------------------------

#: grpc.aio names the task serving each RPC `HandleExceptions[<method path>]`
#: (grpc/_cython/_cygrpc/aio/server.pyx.pxi); the tests run the service in
#: their own event loop, so its tasks are visible to them. This is grpcio's
#: naming, not an API: test_deadlines checks it still holds before relying on it.
HANDLER_TASK_PREFIX = "HandleExceptions[/bms.image.v1."


def active_handlers(method: str = "") -> list[str]:
    """The RPCs of our services the server is still serving (in this loop)."""
    prefix = HANDLER_TASK_PREFIX + method
    return sorted(
        task.get_name()
        for task in asyncio.all_tasks()
        if task.get_name().startswith(prefix) and not task.done()
    )


def open_files_under(root: Path) -> list[str]:
    """Paths under `root` this process holds open (Linux /proc)."""
    found: list[str] = []
    prefix = str(root.resolve())
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            found.append(target)
    return sorted(found)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], what: str, within: float = HANG_GUARD
) -> None:
    """Polls `check` until it holds; failing after `within` seconds means a hang or
    a leak that never resolves, never that something was slow."""
    give_up = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > give_up:
            raise AssertionError(f"still not true after {within:.0f} s: {what}")
        await asyncio.sleep(0.02)


async def healthy(channel: grpc.aio.Channel) -> bool:
    """grpc.health.v1 says SERVING (it needs no token)."""
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
    )
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def still_serving(channel: grpc.aio.Channel, md: Metadata) -> None:
    """After abuse: health says SERVING and a real round trip still works
    (create an image, read it back, list it)."""
    assert await healthy(channel)
    images = ImageStub(channel)
    created = await create_private(images, md, display_name="after-the-storm")
    got = await images.GetImage(
        image_pb2.GetImageRequest(name=created.name), metadata=md, timeout=CALL_TIMEOUT
    )
    assert got.display_name == "after-the-storm"
    listed = await images.ListImages(
        image_pb2.ListImagesRequest(filter="name = after-the-storm"),
        metadata=md,
        timeout=CALL_TIMEOUT,
    )
    assert created.name in [image.name for image in listed.images]


# -- services started by a test itself -------------------------------------------------


# -- images, members, servers -------------------------------------------------------


def private_image(**overrides: Any) -> image_pb2.Image:
    """support.builders.private_image, named 'reliability-golden' unless told."""
    return builders.private_image(**{"display_name": "reliability-golden", **overrides})


def public_image(**overrides: Any) -> image_pb2.Image:
    """A public CentOS 7.6 image on s4 only (support.builders.public_image)."""
    values: dict[str, Any] = {
        "display_name": "reliability-public",
        "os_distro": "centos",
        "os_version": "7.6",
        "supported_flavors": [S4_FLAVOR],
    }
    return builders.public_image(**{**values, **overrides})


async def create_private(images: ImageStub, md: Metadata, **overrides: Any) -> image_pb2.Image:
    created: image_pb2.Image = await images.CreateImage(
        image_pb2.CreateImageRequest(image=private_image(**overrides)),
        metadata=md,
        timeout=CALL_TIMEOUT,
    )
    return created


def upload_requests(
    name: str, data: bytes, chunk: int = 64 * 1024, offset: int = 0
) -> Iterator[image_pb2.UploadImageDataRequest]:
    yield image_pb2.UploadImageDataRequest(
        metadata=image_pb2.UploadImageDataMetadata(name=name, offset=offset)
    )
    for start_at in range(0, len(data), chunk):
        yield image_pb2.UploadImageDataRequest(chunk=data[start_at : start_at + chunk])


async def upload(
    images: ImageStub, md: Metadata, name: str, data: bytes, offset: int = 0
) -> image_pb2.Image:
    uploaded: image_pb2.Image = await images.UploadImageData(
        upload_requests(name, data, offset=offset), metadata=md, timeout=CALL_TIMEOUT
    )
    return uploaded


_DISKS: dict[tuple[int, int], bytes] = {}


def system_disk(bulk_bytes: int = 48 * 1024, tail: int = 0) -> bytes:
    """The bytes of a real (BMSDISK1) CentOS system disk without plug-ins,
    so deployments of it go through; `tail` junk bytes after the partitions
    give it a size of its own. Cached per process."""
    key = (bulk_bytes, tail)
    if key not in _DISKS:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "golden.disk"
            disks.write_disk(
                path,
                disks.DiskSpec(
                    os_release={"NAME": "centos", "ID": "centos", "VERSION_ID": "7.6"},
                    plugins=(Plugin(PluginKind.CLOUD_INIT, "0.7.9"),),
                    bulk_bytes=bulk_bytes,
                    seed=f"reliability-{bulk_bytes}",
                ),
            )
            _DISKS[key] = path.read_bytes() + random.Random(tail).randbytes(tail)
    return _DISKS[key]


async def create_active(
    images: ImageStub, md: Metadata, data: bytes, **overrides: Any
) -> image_pb2.Image:
    created = await create_private(images, md, **overrides)
    active = await upload(images, md, created.name, data)
    assert active.status == image_pb2.IMAGE_STATUS_ACTIVE, active
    return active


def member_name(image_name: str, project: str) -> str:
    return f"{image_name}/members/{project}"


async def share(sharing: SharingStub, md: Metadata, image_name: str, project: str) -> None:
    await sharing.CreateImageMember(
        sharing_pb2.CreateImageMemberRequest(
            parent=image_name, member=sharing_pb2.ImageMember(member_project=project)
        ),
        metadata=md,
        timeout=CALL_TIMEOUT,
    )


def answer_request(name: str, status: int) -> sharing_pb2.UpdateImageMemberRequest:
    return sharing_pb2.UpdateImageMemberRequest(
        member=sharing_pb2.ImageMember(name=name, status=status),  # type: ignore[arg-type]
        update_mask=mask("status"),
    )


async def answer(sharing: SharingStub, md: Metadata, name: str, status: int) -> None:
    await sharing.UpdateImageMember(answer_request(name, status), metadata=md, timeout=CALL_TIMEOUT)


def deploy_request(
    image: str = CENTOS, flavor: str = S4_FLAVOR, count: int = 1, prefix: str = "web"
) -> provisioning_pb2.CreateServersRequest:
    return provisioning_pb2.CreateServersRequest(
        flavor=flavor, image=image, count=count, name_prefix=prefix
    )


FINAL_STAGES = (
    provisioning_pb2.PROVISIONING_STAGE_ACTIVE,
    provisioning_pb2.PROVISIONING_STAGE_FAILED,
)


async def deploy(
    provisioning: ProvisioningStub, md: Metadata, image: str = CENTOS, prefix: str = "web"
) -> str:
    """Deploys one server and follows it to ACTIVE; its name."""
    final: provisioning_pb2.ServerEvent | None = None
    async for event in provisioning.CreateServers(
        deploy_request(image=image, prefix=prefix), metadata=md, timeout=CALL_TIMEOUT
    ):
        if event.stage in FINAL_STAGES:
            final = event
    assert final is not None and final.stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE, final
    return str(final.server)


async def stop_server(provisioning: ProvisioningStub, md: Metadata, name: str) -> None:
    stopped = await provisioning.StopServer(
        provisioning_pb2.StopServerRequest(name=name), metadata=md, timeout=CALL_TIMEOUT
    )
    assert stopped.state == provisioning_pb2.SERVER_STATE_STOPPED


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def random_payload(size: int) -> bytes:
    """Random bytes that are raw for certain (no MBR signature at 510)."""
    data = bytearray(os.urandom(size))
    if size >= 512 and data[510:512] == b"\x55\xaa":
        data[511] = 0
    return bytes(data)
