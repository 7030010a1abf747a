"""A peer of ours that cannot be reached is UNAVAILABLE to the caller (a
code clients retry), never FAILED_PRECONDITION or INTERNAL, and the message
tells no internals: gRPC's own texts name addresses and ports, which stay in
our log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.serving import RunningService
from bms_image.processes import start
from support.errors import decode
from support.processes import free_port
from support.services import make_settings
from support.tokens import bearer


@pytest.fixture
async def image_service_without_its_provisioner(tmp_path: Path) -> AsyncIterator[RunningService]:
    """`serve --provisioner none` told of a provisioner that does not listen."""
    service = await start(
        make_settings(tmp_path, provisioner="none", provisioner_address=f"127.0.0.1:{free_port()}")
    )
    yield service
    await service.stop(0)


async def test_an_unreachable_provisioner_is_unavailable_and_names_no_address(
    image_service_without_its_provisioner: RunningService,
) -> None:
    service = image_service_without_its_provisioner
    token = service.authority.issue("alpha")
    port = service.settings.provisioner_address.rsplit(":", 1)[1]
    async with grpc.aio.insecure_channel(service.address) as channel:
        images = image_pb2_grpc.ImageServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await images.CreateImage(
                image_pb2.CreateImageRequest(
                    image=image_pb2.Image(display_name="backup"),
                    source_server=f"servers/{uuid.uuid4()}",
                ),
                metadata=bearer(token),
                timeout=60,
            )
    error = raised.value
    assert error.code() is grpc.StatusCode.UNAVAILABLE, error.details()
    assert decode(error).reason == "PROVISIONER_UNAVAILABLE"
    text = error.details() or ""
    assert "try again" in text
    for internal in ("127.0.0.1", port, "ipv4", "connect"):
        assert internal not in text, f"{internal!r} leaked into {text!r}"
