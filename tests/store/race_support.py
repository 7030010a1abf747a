"""Helpers shared by the persistence and race tests: a running service on a
given database, call metadata, request builders and rich-status decoding."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.serving import RunningService
from support import services
from support.paging import every_page
from support.services import make_settings
from support.tokens import (
    Metadata,
    bearer,
)

HARDWARE_MODEL = "s4-2288h-v5"


@dataclass
class Service:
    """A running service plus one stub per channel, for round-robin calls."""

    running: RunningService
    stubs: list[image_pb2_grpc.ImageServiceStub]

    @property
    def images(self) -> image_pb2_grpc.ImageServiceStub:
        return self.stubs[0]

    def stub(self, index: int) -> image_pb2_grpc.ImageServiceStub:
        return self.stubs[index % len(self.stubs)]

    def as_project(self, project: str, admin: bool = False) -> Metadata:
        token = self.running.authority.issue(project, admin)
        return bearer(token)


@asynccontextmanager
async def serving(
    tmp_path: Path, database_url: str, channels: int = 4, **overrides: object
) -> AsyncIterator[Service]:
    """Starts the service on database_url and opens `channels` channels to it
    (several HTTP/2 connections, so concurrent calls really run in parallel)."""
    settings = make_settings(tmp_path, database_url=database_url, **overrides)
    async with services.serving(settings) as started:
        running = started.service
        opened = [started.channel]
        opened += [grpc.aio.insecure_channel(running.address) for _ in range(channels - 1)]
        try:
            # Connected before the test fires its burst, so that the calls of a
            # burst reach the server together instead of in connection order.
            await asyncio.gather(*(channel.channel_ready() for channel in opened))
            service = Service(running, [image_pb2_grpc.ImageServiceStub(c) for c in opened])
            # Likewise open the database pool's connections now: a fresh pool hands
            # the first call its one open connection while later ones still connect.
            warm_up = image_pb2.ListImagesRequest(page_size=1)
            metadata = service.as_project("warm-up")
            await asyncio.gather(
                *(service.stub(i).ListImages(warm_up, metadata=metadata) for i in range(12))
            )
            yield service
        finally:
            for channel in opened[1:]:
                await channel.close()


def private_image_request(name: str, request_id: str | None = None) -> image_pb2.CreateImageRequest:
    return image_pb2.CreateImageRequest(
        image=image_pb2.Image(
            display_name=name,
            type=image_pb2.IMAGE_TYPE_PRIVATE,
            hardware_model=HARDWARE_MODEL,
            os_type=image_pb2.OS_TYPE_LINUX,
            os_distro="centos",
            os_version="7.6",
            architecture=image_pb2.ARCHITECTURE_X86_64,
        ),
        request_id=request_id if request_id is not None else str(uuid.uuid4()),
    )


def update_request(name: str, etag: str = "", **fields: object) -> image_pb2.UpdateImageRequest:
    """UpdateImage of the given fields, the update mask naming exactly them."""
    return image_pb2.UpdateImageRequest(
        image=image_pb2.Image(name=name, etag=etag, **fields),  # type: ignore[arg-type]
        update_mask=field_mask_pb2.FieldMask(paths=sorted(fields)),
    )


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status in the trailing metadata; fails the test if absent."""
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} without grpc-status-details-bin: {error.details()}"
    return status


def detail(status: status_pb2.Status, message_type: type) -> object | None:
    """The first detail of the given google.rpc type, unpacked, or None."""
    for packed in status.details:
        if packed.Is(message_type.DESCRIPTOR):
            message = message_type()
            packed.Unpack(message)
            return message
    return None


def error_reason(error: grpc.aio.AioRpcError) -> str:
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo), "status carries no ErrorInfo"
    return info.reason


async def list_all(
    service: Service, metadata: Metadata, filter_text: str, page_size: int = 7
) -> list[image_pb2.Image]:
    """Every image ListImages returns for the filter, following the page tokens."""

    def read_page(token: str) -> Awaitable[image_pb2.ListImagesResponse]:
        request = image_pb2.ListImagesRequest(
            filter=filter_text, page_size=page_size, page_token=token
        )
        return service.images.ListImages(request, metadata=metadata)

    return await every_page(read_page, lambda page: page.images)
