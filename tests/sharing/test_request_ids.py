"""Idempotency keys (issue 14, item 5), on SQLite and on PostgreSQL: a
request_id belongs to one RPC of one project, so CreateImage and
ReplicateImage never answer with each other's image; a retry whose image was
killed or deleted is refused with REQUEST_ID_CONSUMED (AIP-155: the request
never runs twice, and a dead image is no success); concurrent retries of both
RPCs with one id still make one image each."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sharing_support as sh

from bms.image.v1 import image_pb2
from support.builders import random_bytes
from support.errors import Code, RichError, expect_error
from support.services import ImageStub, Serving, SharingStub, make_settings, serving
from support.tokens import Metadata


@pytest.fixture
async def running(tmp_path: Path, database_url: str) -> AsyncIterator[Serving]:
    async with serving(make_settings(tmp_path, database_url=database_url)) as service:
        yield service


def _create(request_id: str, name: str = "own") -> image_pb2.CreateImageRequest:
    return image_pb2.CreateImageRequest(
        image=sh.private_image(display_name=name), request_id=request_id
    )


@dataclass
class Caller:
    """A project's calls that all carry one request_id."""

    images: ImageStub
    md: Metadata
    request_id: str

    def create(self) -> Awaitable[image_pb2.Image]:
        return self.images.CreateImage(_create(self.request_id), metadata=self.md)

    async def private_names(self) -> list[str]:
        return await sh.names_listed(self.images, self.md, "type = private")


@dataclass
class Member(Caller):
    """beta, with alpha's active image `source` shared with it and accepted."""

    sharing: SharingStub
    source: sh.Uploaded

    def replicate(self) -> Awaitable[image_pb2.Image]:
        return sh.replicate(self.sharing, self.md, self.source.name, request_id=self.request_id)


@pytest.fixture
def alpha(running: Serving) -> Caller:
    return Caller(running.images, running.projects("alpha"), str(uuid.uuid4()))


@pytest.fixture
async def beta(running: Serving) -> Member:
    images, sharing, projects = running.images, running.sharing, running.projects
    owner, member = projects("alpha"), projects("beta")
    image = await sh.create_active(images, owner, size=64 * 1024)
    await sh.share(sharing, owner, image.name, projects.name("beta"))
    await sh.answer(sharing, member, image.name, projects.name("beta"), sh.ACCEPTED)
    return Member(images, member, str(uuid.uuid4()), sharing, image)


def _expect_consumed(rich: RichError, image_name: str, status: str) -> None:
    assert rich.code == Code.FAILED_PRECONDITION, rich.message
    assert rich.reason == "REQUEST_ID_CONSUMED", rich.message
    assert rich.info.metadata["image"] == image_name
    assert rich.info.metadata["status"] == status
    assert image_name in rich.message and status in rich.message
    assert "new request_id" in rich.message
    assert rich.precondition_failure is not None
    assert [v.subject for v in rich.precondition_failure.violations] == [image_name]


async def test_create_then_replicate_with_one_request_id_make_two_images(beta: Member) -> None:
    own = await beta.create()
    replica = await beta.replicate()

    assert replica.name != own.name
    assert replica.status == sh.ACTIVE and replica.sha256 == beta.source.sha256
    assert own.status == image_pb2.IMAGE_STATUS_QUEUED
    # Each RPC's retry answers with its own image.
    assert (await beta.create()).name == own.name
    assert (await beta.replicate()).name == replica.name
    assert sorted(await beta.private_names()) == sorted([own.name, replica.name])


async def test_replicate_then_create_with_one_request_id_make_two_images(beta: Member) -> None:
    replica = await beta.replicate()
    own = await beta.create()

    assert own.name != replica.name
    assert own.status == image_pb2.IMAGE_STATUS_QUEUED and own.display_name == "own"
    assert (await beta.replicate()).name == replica.name


async def test_a_create_retry_after_a_delete_is_refused_as_consumed(alpha: Caller) -> None:
    images = alpha.images
    first = await alpha.create()
    await images.DeleteImage(image_pb2.DeleteImageRequest(name=first.name), metadata=alpha.md)

    rich = await expect_error(alpha.create(), Code.FAILED_PRECONDITION)

    _expect_consumed(rich, first.name, "deleted")
    assert await alpha.private_names() == []  # nothing made again
    # A new request_id creates as usual.
    fresh = await images.CreateImage(_create(str(uuid.uuid4())), metadata=alpha.md)
    assert fresh.name != first.name


async def test_a_create_retry_after_the_upload_failed_is_refused_as_consumed(
    alpha: Caller,
) -> None:
    """A declared sha256 that the bytes do not match kills the image."""
    images = alpha.images
    first = await alpha.create()
    data = random_bytes(4096)
    requests = [
        image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(name=first.name, sha256="0" * 64)
        ),
        image_pb2.UploadImageDataRequest(chunk=data),
    ]
    await expect_error(images.UploadImageData(iter(requests), metadata=alpha.md), Code.DATA_LOSS)
    killed = await images.GetImage(image_pb2.GetImageRequest(name=first.name), metadata=alpha.md)
    assert killed.status == image_pb2.IMAGE_STATUS_KILLED

    rich = await expect_error(alpha.create(), Code.FAILED_PRECONDITION)

    _expect_consumed(rich, first.name, "killed")
    assert await alpha.private_names() == [first.name]


async def test_a_replicate_retry_after_the_replica_is_deleted_is_refused_as_consumed(
    beta: Member,
) -> None:
    replica = await beta.replicate()
    await beta.images.DeleteImage(image_pb2.DeleteImageRequest(name=replica.name), metadata=beta.md)

    rich = await expect_error(beta.replicate(), Code.FAILED_PRECONDITION)

    _expect_consumed(rich, replica.name, "deleted")
    assert rich.info.metadata["method"] == "replicate"
    assert await beta.private_names() == []


async def test_concurrent_retries_of_both_rpcs_with_one_request_id_make_one_image_each(
    beta: Member,
) -> None:
    outcomes = await sh.gather_outcomes(
        [*(beta.create() for _ in range(6)), *(beta.replicate() for _ in range(6))]
    )

    assert [f"{e.code.name}: {e.message}" for _, e in outcomes if e] == []
    created = {response.name for response, _ in outcomes[:6]}
    replicas = {response.name for response, _ in outcomes[6:]}
    assert len(created) == 1 and len(replicas) == 1 and created != replicas
    assert sorted(await beta.private_names()) == sorted(created | replicas)
    (replica_name,) = replicas
    request = image_pb2.GetImageRequest(name=replica_name)
    for _ in range(100):  # a racing retry may answer while the bytes are still copied
        got = await beta.images.GetImage(request, metadata=beta.md)
        if got.status == sh.ACTIVE:
            break
        await asyncio.sleep(0.05)
    assert got.status == sh.ACTIVE and got.sha256 == beta.source.sha256
