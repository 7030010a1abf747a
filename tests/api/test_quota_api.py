"""The private-image quota, on a service started with a quota of 3."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import api_support as api
import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.processes import start
from support.builders import private_image, public_image
from support.services import make_settings
from support.tokens import Metadata, bearer

QUOTA = 3


@dataclass
class SmallQuota:
    images: image_pb2_grpc.ImageServiceStub
    as_project: Callable[..., Metadata]

    async def create(
        self, metadata: Metadata, request_id: str = "", **overrides
    ) -> image_pb2.Image:
        return await self.images.CreateImage(
            image_pb2.CreateImageRequest(image=private_image(**overrides), request_id=request_id),
            metadata=metadata,
        )


@pytest.fixture
async def small_quota(tmp_path) -> AsyncIterator[SmallQuota]:
    running = await start(make_settings(tmp_path, private_image_quota=QUOTA))
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:

            def as_project(project: str, admin: bool = False) -> Metadata:
                return bearer(running.authority.issue(project, admin))

            yield SmallQuota(image_pb2_grpc.ImageServiceStub(channel), as_project)
    finally:
        await running.stop(0)


async def expect_quota_exceeded(quota: SmallQuota, metadata: Metadata, project: str) -> None:
    rich = await api.expect_error(
        quota.create(metadata, display_name="one too many"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "IMAGE_QUOTA_EXCEEDED",
    )
    assert rich.quota_failure is not None
    [violation] = rich.quota_failure.violations
    assert violation.subject == f"projects/{project}"
    assert str(QUOTA) in violation.description
    assert rich.info.metadata["limit"] == str(QUOTA)
    assert rich.info.metadata["used"] == str(QUOTA)


async def test_fourth_private_image_exceeds_the_quota(small_quota) -> None:
    alpha = small_quota.as_project("alpha")
    created = [await small_quota.create(alpha, display_name=f"image {i}") for i in range(QUOTA)]
    await expect_quota_exceeded(small_quota, alpha, "alpha")
    listed = await api.names_listed(small_quota.images, alpha, "type = private")
    assert listed == [image.name for image in created]


async def test_deleting_an_image_frees_its_slot(small_quota) -> None:
    alpha = small_quota.as_project("alpha")
    created = [await small_quota.create(alpha) for _ in range(QUOTA)]
    await expect_quota_exceeded(small_quota, alpha, "alpha")
    await small_quota.images.DeleteImage(
        image_pb2.DeleteImageRequest(name=created[1].name), metadata=alpha
    )
    replacement = await small_quota.create(alpha, display_name="replacement")
    assert replacement.status == image_pb2.IMAGE_STATUS_QUEUED
    await expect_quota_exceeded(small_quota, alpha, "alpha")
    assert await api.names_listed(small_quota.images, alpha, "type = private") == [
        created[0].name,
        created[2].name,
        replacement.name,
    ]


async def test_quota_is_per_project_and_ignores_public_images(small_quota) -> None:
    alpha, beta = small_quota.as_project("alpha"), small_quota.as_project("beta")
    for _ in range(QUOTA):
        await small_quota.create(alpha)
    await expect_quota_exceeded(small_quota, alpha, "alpha")
    # Another project has its own quota; an admin's public images hold none.
    for _ in range(QUOTA):
        await small_quota.create(beta)
    admin = small_quota.as_project("alpha", admin=True)
    for index in range(QUOTA + 1):
        await small_quota.images.CreateImage(
            image_pb2.CreateImageRequest(image=public_image(display_name=f"public {index}")),
            metadata=admin,
        )
    await expect_quota_exceeded(small_quota, beta, "beta")
    await expect_quota_exceeded(small_quota, alpha, "alpha")


async def test_retry_of_a_created_image_succeeds_at_the_limit(small_quota) -> None:
    alpha = small_quota.as_project("alpha")
    request_id = api.new_request_id()
    first = await small_quota.create(alpha, request_id=request_id)
    for _ in range(QUOTA - 1):
        await small_quota.create(alpha)
    retried = await small_quota.create(alpha, request_id=request_id)
    assert retried.name == first.name
    await expect_quota_exceeded(small_quota, alpha, "alpha")


async def test_concurrent_creates_never_exceed_the_quota(small_quota) -> None:
    alpha = small_quota.as_project("alpha")
    results = await asyncio.gather(
        *(small_quota.create(alpha, display_name=f"racer {i}") for i in range(QUOTA + 4)),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, image_pb2.Image)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == QUOTA, results
    assert len(refused) == 4
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert len(await api.names_listed(small_quota.images, alpha, "type = private")) == QUOTA


async def test_updates_work_at_the_limit(small_quota) -> None:
    alpha = small_quota.as_project("alpha")
    images = [await small_quota.create(alpha) for _ in range(QUOTA)]
    updated = await small_quota.images.UpdateImage(
        image_pb2.UpdateImageRequest(
            image=image_pb2.Image(name=images[0].name, display_name="still fits"),
            update_mask=api.mask("display_name"),
        ),
        metadata=alpha,
    )
    assert updated.display_name == "still fits"
