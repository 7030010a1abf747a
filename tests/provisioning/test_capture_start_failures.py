"""A capture that fails before its bytes flow ends KILLED with a reason,
never QUEUED for ever, and lets its server go: whether the disk cannot be
flattened (the provisioner's upload stream is already open, and ends
without a byte) or the capture cannot be started at all (CreateImage fails,
its image is killed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import provisioning_support as prov
import pytest

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.common import disk_format
from bms_image.common.errors import Unavailable
from bms_image.fleet.domain.fleet import Fleet
from support.errors import decode
from support.fleet_events import LOCAL

pb = provisioning_pb2
#: A hang guard only: a capture image leaves QUEUED/SAVING in well under it.
PATIENCE_POLLS = 1200


async def stopped_server(provisioning, md) -> str:
    deployment = await prov.deploy(provisioning, md, prov.create_request(boot_source=LOCAL))
    (name,) = deployment.servers
    await provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md)
    return name


def capture_request(server: str) -> image_pb2.CreateImageRequest:
    return image_pb2.CreateImageRequest(
        image=image_pb2.Image(display_name="backup"), source_server=server
    )


async def settled(images, md, name: str) -> image_pb2.Image:
    """The image once it is neither QUEUED nor SAVING (bounded wait)."""
    for _ in range(PATIENCE_POLLS):
        image = await images.GetImage(image_pb2.GetImageRequest(name=name), metadata=md)
        if image.status not in (image_pb2.IMAGE_STATUS_QUEUED, image_pb2.IMAGE_STATUS_SAVING):
            return image
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} is still {image_pb2.ImageStatus.Name(image.status)}")


async def released(provisioning, md, name: str) -> provisioning_pb2.Server:
    for _ in range(PATIENCE_POLLS):
        server = await prov.get_server(provisioning, md, name)
        if not server.task:
            return server
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} is still held ({server.task})")


async def test_a_capture_whose_disk_cannot_be_flattened_ends_killed(
    provisioning, images, as_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    md = as_project("alpha")
    server = await stopped_server(provisioning, md)

    def broken_flatten(source: Path, target: Path) -> None:
        raise OSError(5, "Input/output error", str(source))

    monkeypatch.setattr(disk_format, "flatten", broken_flatten)
    created = await images.CreateImage(capture_request(server), metadata=md)
    assert created.status == image_pb2.IMAGE_STATUS_QUEUED

    image = await settled(images, md, created.name)
    assert image.status == image_pb2.IMAGE_STATUS_KILLED, image
    assert server in image.status_reason and "capture the server again" in image.status_reason
    assert image.uploaded_bytes == 0
    after = await released(provisioning, md, server)
    assert after.state == pb.SERVER_STATE_STOPPED
    monkeypatch.undo()
    again = await images.CreateImage(capture_request(server), metadata=md)
    assert (await settled(images, md, again.name)).status == image_pb2.IMAGE_STATUS_ACTIVE


async def test_a_capture_that_cannot_start_kills_its_image_and_lets_go(
    provisioning, images, as_project, monkeypatch: pytest.MonkeyPatch
) -> None:
    md = as_project("alpha")
    server = await stopped_server(provisioning, md)

    async def unreachable(self: Fleet, token: str, server_id: str, image_id: str) -> None:
        raise Unavailable("PROVISIONER_UNAVAILABLE", "provisioner: connection refused")

    monkeypatch.setattr(Fleet, "start_capture", unreachable)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.CreateImage(capture_request(server), metadata=md)
    rich = decode(caught.value)
    assert (rich.code, rich.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVISIONER_UNAVAILABLE")

    listing = await images.ListImages(
        image_pb2.ListImagesRequest(filter="type = private"), metadata=md
    )
    (image,) = [i for i in listing.images if i.source_server == server]
    assert image.status == image_pb2.IMAGE_STATUS_KILLED, image
    assert "could not start" in image.status_reason, image.status_reason
    assert "connection refused" in image.status_reason, image.status_reason
    assert (await prov.get_server(provisioning, md, server)).task == ""
