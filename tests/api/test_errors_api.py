"""Bad requests: INVALID_ARGUMENT with a google.rpc.BadRequest naming each bad
field, NOT_FOUND for well-formed names of nothing, and never a traceback."""

from __future__ import annotations

import uuid

import api_support as api
import grpc
import pytest

from bms.image.v1 import image_pb2
from support.builders import private_image
from support.errors import RichError, expect_invalid
from support.services import fresh_project

pytestmark = pytest.mark.asyncio(loop_scope="module")
service, channel, as_project = api.shared_service_fixtures()

# (case id, overrides of a valid private image, the field the violation names
# without its `image.` prefix -- see test_violations_name_request_paths).
CREATE_ERRORS = [
    ("display_name empty", {"display_name": ""}, "display_name"),
    ("display_name blank", {"display_name": "   "}, "display_name"),
    ("display_name 129 chars", {"display_name": "x" * 129}, "display_name"),
    ("display_name control char", {"display_name": "bad\nname"}, "display_name"),
    ("description 1025 chars", {"description": "d" * 1025}, "description"),
    ("11 tags", {"tags": [f"t{i}" for i in range(11)]}, "tags"),
    ("repeated tag", {"tags": ["a", "a"]}, "tags"),
    ("tag with space", {"tags": ["bad tag"]}, "tags[0]"),
    ("tag 65 chars", {"tags": ["ok", "t" * 65]}, "tags[1]"),
    ("empty tag", {"tags": [""]}, "tags[0]"),
    ("min_disk_gb -1", {"min_disk_gb": -1}, "min_disk_gb"),
    ("min_disk_gb 1025", {"min_disk_gb": 1025}, "min_disk_gb"),
    ("hardware_model unknown", {"hardware_model": "s9-unknown"}, "hardware_model"),
    ("hardware_model empty", {"hardware_model": ""}, "hardware_model"),
    ("os_type unset", {"os_type": 0}, "os_type"),
    ("os_type 99", {"os_type": 99}, "os_type"),
    ("architecture unset", {"architecture": 0}, "architecture"),
    ("architecture 99", {"architecture": 99}, "architecture"),
    ("disk_format 42", {"disk_format": 42}, "disk_format"),
    ("type 99", {"type": 99}, "type"),
    ("os_distro empty", {"os_distro": ""}, "os_distro"),
    ("os_distro upper case", {"os_distro": "CentOS"}, "os_distro"),
    ("os_version empty", {"os_version": ""}, "os_version"),
    ("os_version with space", {"os_version": "7 6"}, "os_version"),
    (
        "plugin kind unset",
        {"plugins": [image_pb2.Plugin(kind=0, version="1.0")]},
        "plugins[0].kind",
    ),
    (
        "plugin kind 99",
        {"plugins": [image_pb2.Plugin(kind=99, version="1.0")]},
        "plugins[0].kind",
    ),
    (
        "plugin version bad",
        {"plugins": [image_pb2.Plugin(kind=1, version="v 1")]},
        "plugins[0].version",
    ),
    (
        "plugin twice",
        {
            "plugins": [
                image_pb2.Plugin(kind=1, version="1.0"),
                image_pb2.Plugin(kind=1, version="2.0"),
            ]
        },
        "plugins",
    ),
]


def _matches(field: str, expected: str) -> bool:
    """`image.tags` or `tags`: the path check is test_violations_name_request_paths."""
    return field in (expected, f"image.{expected}")


@pytest.mark.parametrize(
    ("overrides", "field"), [c[1:] for c in CREATE_ERRORS], ids=[c[0] for c in CREATE_ERRORS]
)
async def test_create_rejects_invalid_image(images, as_project, overrides, field) -> None:
    metadata = as_project(fresh_project())
    rich = await api.expect_error(
        images.CreateImage(
            image_pb2.CreateImageRequest(image=private_image(**overrides)), metadata=metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert rich.info.reason in ("INVALID_IMAGE", "INVALID_FIELD")
    assert any(_matches(f, field) for f in rich.fields), rich.fields
    assert await api.names_listed(images, metadata, "type = private") == []


async def test_create_reports_every_bad_field_at_once(images, as_project) -> None:
    rich = await api.expect_error(
        images.CreateImage(
            image_pb2.CreateImageRequest(
                image=private_image(display_name="", os_distro="", hardware_model="nope")
            ),
            metadata=as_project(fresh_project()),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_IMAGE",
    )
    assert {"image.display_name", "image.os_distro", "image.hardware_model"} <= set(rich.fields)


async def test_create_without_an_image(images, as_project) -> None:
    rich = await api.expect_error(
        images.CreateImage(image_pb2.CreateImageRequest(), metadata=as_project(fresh_project())),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "image.display_name" in rich.fields


UPDATE_ERRORS = [
    ("display_name", {"display_name": ""}, "display_name"),
    ("display_name", {"display_name": "y" * 129}, "display_name"),
    ("description", {"description": "d" * 1025}, "description"),
    ("tags", {"tags": [f"t{i}" for i in range(11)]}, "tags"),
    ("tags", {"tags": ["no spaces"]}, "tags[0]"),
    ("min_disk_gb", {"min_disk_gb": 0}, "min_disk_gb"),
    ("min_disk_gb", {"min_disk_gb": 1025}, "min_disk_gb"),
]


async def update_refused(
    images, metadata, image, path: str, values: dict, reason: str | None = None
) -> RichError:
    """UpdateImage of `image` setting `values` under mask `path`, which must
    fail INVALID_ARGUMENT (with `reason`, when given)."""
    return await api.expect_error(
        images.UpdateImage(
            image_pb2.UpdateImageRequest(
                image=image_pb2.Image(name=image.name, **values), update_mask=api.mask(path)
            ),
            metadata=metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
    )


async def test_update_rejects_invalid_values(images, as_project) -> None:
    metadata = as_project(fresh_project())
    image = await api.create(images, metadata)
    for path, values, field in UPDATE_ERRORS:
        rich = await update_refused(images, metadata, image, path, values, "INVALID_IMAGE")
        assert any(_matches(f, field) for f in rich.fields), (values, rich.fields)
    unchanged = await images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=metadata)
    assert unchanged == image


async def test_violations_name_request_paths(images, as_project) -> None:
    """BadRequest.field_violations[].field is a path into the request, as for
    `image.display_name` or `image.os_type`: a tag of CreateImageRequest is
    `image.tags`, not `tags`. Collects every violation that names a bare path."""
    metadata = as_project(fresh_project())
    bare: list[str] = []
    for case, overrides, field in CREATE_ERRORS:
        rich = await api.expect_error(
            images.CreateImage(
                image_pb2.CreateImageRequest(image=private_image(**overrides)),
                metadata=metadata,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        if f"image.{field}" not in rich.fields:
            bare.append(f"CreateImage {case}: {rich.fields}")
    image = await api.create(images, metadata)
    for path, values, field in UPDATE_ERRORS:
        rich = await update_refused(images, metadata, image, path, values)
        if f"image.{field}" not in rich.fields:
            bare.append(f"UpdateImage {path}={str(values)[:40]}: {rich.fields}")
    assert not bare, "violations not naming a request path:\n" + "\n".join(bare)


SAMPLE = uuid.UUID("0f1c2a52-3b0e-4f4e-9f39-5d8f0b1f6a10")
MALFORMED_NAMES = [
    "",
    "images/",
    "images/not-a-uuid",
    "foo/bar",
    "images",
    f"image/{SAMPLE}",
    f"/images/{SAMPLE}",
    f"images/{str(SAMPLE).upper()}",
    f"images/{SAMPLE.hex}",
    f"images/{SAMPLE}/",
    f"images/{SAMPLE} ",
    "images/' OR 1=1 --",
    "images/" + "a" * 5000,
]


async def test_malformed_image_names_are_invalid_for_every_rpc(images, as_project) -> None:
    metadata = as_project(fresh_project(), admin=True)
    for name in MALFORMED_NAMES:
        calls = {
            "GetImage": (
                images.GetImage(image_pb2.GetImageRequest(name=name), metadata=metadata),
                "name",
            ),
            "DeleteImage": (
                images.DeleteImage(image_pb2.DeleteImageRequest(name=name), metadata=metadata),
                "name",
            ),
            "DeprecateImage": (
                images.DeprecateImage(
                    image_pb2.DeprecateImageRequest(name=name), metadata=metadata
                ),
                "name",
            ),
            "UpdateImage": (
                images.UpdateImage(
                    api.update_request(name, ["display_name"], display_name="x"),
                    metadata=metadata,
                ),
                "image.name",
            ),
        }
        for method, (call, field) in calls.items():
            rich = await expect_invalid(call, field, "INVALID_FIELD")
            assert len(rich.status.message) < 300, (method, name)


async def test_well_formed_names_of_nothing_are_not_found(images, as_project) -> None:
    metadata = as_project(fresh_project(), admin=True)
    for name in (f"images/{uuid.uuid4()}", f"images/{uuid.UUID(int=0)}"):
        for call in (
            images.GetImage(image_pb2.GetImageRequest(name=name), metadata=metadata),
            images.DeleteImage(image_pb2.DeleteImageRequest(name=name), metadata=metadata),
            images.DeprecateImage(image_pb2.DeprecateImageRequest(name=name), metadata=metadata),
            images.UpdateImage(
                api.update_request(name, ["display_name"], display_name="x"),
                metadata=metadata,
            ),
        ):
            rich = await api.expect_error(call, grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND")
            assert name in rich.status.message


async def test_oversized_request_is_refused_cleanly(images, as_project) -> None:
    """A message over the server's 8 MiB limit fails with RESOURCE_EXHAUSTED
    from gRPC itself; the service keeps serving."""
    metadata = as_project(fresh_project())
    huge = private_image(description="d" * (9 * 1024 * 1024))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await images.CreateImage(image_pb2.CreateImageRequest(image=huge), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Traceback" not in (caught.value.details() or "")
    assert await api.names_listed(images, metadata, "type = private") == []
    assert (await api.create(images, metadata)).name
