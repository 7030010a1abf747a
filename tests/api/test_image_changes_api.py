"""ImageService: UpdateImage, DeleteImage and DeprecateImage of private images
(and what a non-admin may not do to public ones).

The tests of this module share one service and work in projects of their own;
admin changes to public images are in test_public_images_api.py."""

from __future__ import annotations

import asyncio

import api_support as api
import grpc
import pytest
from google.protobuf import empty_pb2

from bms.image.v1 import image_pb2
from support.errors import expect_invalid

pytestmark = pytest.mark.asyncio(loop_scope="module")
service, channel, as_project = api.shared_service_fixtures()


UPDATES = [
    ("display_name", "renamed image", "renamed image"),
    ("description", "a longer description", "a longer description"),
    ("description", "", ""),
    ("tags", ["b", "a:1", "c_2"], ["b", "a:1", "c_2"]),
    ("tags", [], []),
    ("min_disk_gb", 100, 100),
    ("protected", True, True),
]


@pytest.mark.parametrize(("path", "value", "expected"), UPDATES)
async def test_update_each_updatable_field(images, as_project, path, value, expected) -> None:
    metadata = as_project("alpha")
    before = await api.create(
        images, metadata, description="old", tags=["old", "a:1"], protected=False
    )
    updated = await images.UpdateImage(
        api.update_request(before.name, [path], **{path: value}), metadata=metadata
    )
    got = getattr(updated, path)
    assert (list(got) if path == "tags" else got) == expected
    api.assert_same_except(before, updated, path)
    assert updated.etag != before.etag
    assert updated.update_time.ToDatetime() >= before.update_time.ToDatetime()
    assert updated.create_time == before.create_time
    fetched = await images.GetImage(image_pb2.GetImageRequest(name=before.name), metadata=metadata)
    assert fetched == updated


async def test_update_changes_only_masked_fields(images, as_project) -> None:
    metadata = as_project("alpha")
    before = await api.create(images, metadata, description="keep me", tags=["keep"])
    updated = await images.UpdateImage(
        api.update_request(
            before.name,
            ["display_name", "min_disk_gb"],
            display_name="new name",
            min_disk_gb=80,
            description="",  # not in the mask: must stay
            protected=True,  # not in the mask: must stay
        ),
        metadata=metadata,
    )
    assert (updated.display_name, updated.min_disk_gb) == ("new name", 80)
    assert updated.description == "keep me"
    assert list(updated.tags) == ["keep"]
    assert not updated.protected
    api.assert_same_except(before, updated, "display_name", "min_disk_gb")


async def test_update_mask_must_name_updatable_fields(images, as_project) -> None:
    metadata = as_project("alpha")
    image = await api.create(images, metadata)
    for paths in (
        [],
        ["name"],
        ["os_type"],
        ["status"],
        ["owner_project"],
        ["etag"],
        ["hardware_model"],
        ["display_name", "bogus"],
        ["image.display_name"],
    ):
        await expect_invalid(
            images.UpdateImage(
                api.update_request(image.name, paths, display_name="x", os_type=2),
                metadata=metadata,
            ),
            "update_mask",
        )
    assert (
        await images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=metadata)
        == image
    )


async def test_update_checks_the_etag(images, as_project) -> None:
    metadata = as_project("alpha")
    image = await api.create(images, metadata)
    fresh = await images.UpdateImage(
        api.update_request(image.name, ["display_name"], etag=image.etag, display_name="v2"),
        metadata=metadata,
    )
    assert fresh.display_name == "v2" and fresh.etag != image.etag
    rich = await api.expect_error(
        images.UpdateImage(
            api.update_request(image.name, ["display_name"], etag=image.etag, display_name="v3"),
            metadata=metadata,
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert image.name in rich.status.message
    current = await images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=metadata)
    assert current == fresh
    again = await images.UpdateImage(
        api.update_request(image.name, ["display_name"], etag=current.etag, display_name="v3"),
        metadata=metadata,
    )
    assert again.display_name == "v3"
    assert len({image.etag, fresh.etag, again.etag}) == 3


async def test_concurrent_updates_with_one_etag_let_one_win(images, as_project) -> None:
    metadata = as_project("alpha")
    image = await api.create(images, metadata)
    results = await asyncio.gather(
        *(
            images.UpdateImage(
                api.update_request(
                    image.name, ["description"], etag=image.etag, description=f"w{i}"
                ),
                metadata=metadata,
            )
            for i in range(5)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, image_pb2.Image)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 4, results
    assert all(e.code() == grpc.StatusCode.ABORTED for e in losers)
    current = await images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=metadata)
    assert current.description == winners[0].description


async def test_concurrent_updates_without_etag_all_apply(images, as_project) -> None:
    metadata = as_project("alpha")
    image = await api.create(images, metadata)
    results = await asyncio.gather(
        *(
            images.UpdateImage(
                api.update_request(image.name, ["min_disk_gb"], min_disk_gb=50 + i),
                metadata=metadata,
            )
            for i in range(4)
        )
    )
    assert len({r.etag for r in results}) == 4


async def test_only_the_owner_updates_a_private_image(images, as_project) -> None:
    image = await api.create(images, as_project("alpha"))
    await api.expect_error(
        images.UpdateImage(
            api.update_request(image.name, ["display_name"], display_name="x"),
            metadata=as_project("beta"),
        ),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )


async def test_delete_private_image(images, provisioning, as_project) -> None:
    metadata = as_project("alpha")
    keep = await api.create(images, metadata, display_name="keep")
    image = await api.create(images, metadata, display_name="drop", tags=["gone"])
    response = await images.DeleteImage(
        image_pb2.DeleteImageRequest(name=image.name), metadata=metadata
    )
    assert response == empty_pb2.Empty()
    await api.expect_error(
        images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=metadata),
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )
    for filter_text in ("", "type = private", "tag = gone", "name = drop", f"flavor = {api.S4}"):
        assert image.name not in await api.names_listed(images, metadata, filter_text)
    assert await api.names_listed(images, metadata, "type = private") == [keep.name]
    for call in (
        images.DeleteImage(image_pb2.DeleteImageRequest(name=image.name), metadata=metadata),
        images.UpdateImage(
            api.update_request(image.name, ["display_name"], display_name="back"), metadata=metadata
        ),
    ):
        await api.expect_error(call, grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND")


async def test_delete_protected_image_needs_unprotect_first(images, as_project) -> None:
    metadata = as_project("alpha")
    image = await api.create(images, metadata, protected=True)
    assert image.protected
    rich = await api.expect_error(
        images.DeleteImage(image_pb2.DeleteImageRequest(name=image.name), metadata=metadata),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_PROTECTED",
    )
    assert rich.precondition_failure is not None
    [violation] = rich.precondition_failure.violations
    assert (violation.type, violation.subject) == ("PROTECTED", image.name)
    assert violation.description
    assert (
        await images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=metadata)
        == image
    )

    unprotected = await images.UpdateImage(
        api.update_request(image.name, ["protected"], protected=False), metadata=metadata
    )
    assert not unprotected.protected
    await images.DeleteImage(image_pb2.DeleteImageRequest(name=image.name), metadata=metadata)
    assert image.name not in await api.names_listed(images, metadata)


async def test_delete_checks_the_etag(images, as_project) -> None:
    metadata = as_project("alpha")
    image = await api.create(images, metadata)
    changed = await images.UpdateImage(
        api.update_request(image.name, ["display_name"], display_name="changed"), metadata=metadata
    )
    await api.expect_error(
        images.DeleteImage(
            image_pb2.DeleteImageRequest(name=image.name, etag=image.etag), metadata=metadata
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert image.name in await api.names_listed(images, metadata)
    await images.DeleteImage(
        image_pb2.DeleteImageRequest(name=image.name, etag=changed.etag), metadata=metadata
    )
    assert image.name not in await api.names_listed(images, metadata)


async def test_deprecate_is_admin_only_and_public_only(images, as_project) -> None:
    alpha = as_project("alpha")
    centos = (await api.public_by_display_name(images, alpha))[api.CENTOS]
    await api.expect_error(
        images.DeprecateImage(image_pb2.DeprecateImageRequest(name=centos.name), metadata=alpha),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    own = await api.create(images, alpha)
    await api.expect_error(
        images.DeprecateImage(image_pb2.DeprecateImageRequest(name=own.name), metadata=alpha),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    assert not (
        await images.GetImage(image_pb2.GetImageRequest(name=centos.name), metadata=alpha)
    ).deprecated
    # An admin of the owning project still cannot deprecate a private image.
    await expect_invalid(
        images.DeprecateImage(
            image_pb2.DeprecateImageRequest(name=own.name),
            metadata=as_project("alpha", admin=True),
        ),
        "name",
    )
    assert await images.GetImage(image_pb2.GetImageRequest(name=own.name), metadata=alpha) == own
