"""Authentication: every RPC of both services refuses a missing or bad token
with UNAUTHENTICATED; health checking and reflection need no token."""

from __future__ import annotations

import time

import api_support as api
import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.common.auth import TokenAuthority
from support.builders import private_image, public_image
from support.services import fresh_project
from support.tokens import bearer

pytestmark = pytest.mark.asyncio(loop_scope="module")
service, channel, as_project = api.shared_service_fixtures()

OTHER_SECRET = "another-secret-" + "1" * 50
SERVICES = {"bms.image.v1.ImageService", "bms.image.v1.ProvisioningService"}


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "bms-image",
        "aud": "bms-image",
        "sub": "alpha",
        "roles": ["admin"],
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _credentials(service, kind: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for one kind of bad credential."""
    if kind == "missing":
        return ()
    if kind == "basic":
        return (("authorization", "Basic xyz"),)
    if kind == "bearer-without-token":
        return (("authorization", "Bearer "),)
    if kind == "garbage":
        return (("authorization", "Bearer this.is-not.a-jwt"),)
    if kind == "expired":
        token = service.authority.issue("alpha", admin=True, ttl_seconds=-120)
    elif kind == "other-secret":
        token = TokenAuthority(OTHER_SECRET).issue("alpha", admin=True)
    elif kind == "alg-none":
        token = jwt.encode(_claims(), key=None, algorithm="none")
    elif kind == "wrong-issuer":
        token = jwt.encode(_claims(iss="someone-else"), service.settings.token_secret, "HS256")
    elif kind == "no-project":
        token = jwt.encode(_claims(sub=None), service.settings.token_secret, "HS256")
    elif kind == "bad-project":
        token = jwt.encode(_claims(sub="Alpha Project!"), service.settings.token_secret, "HS256")
    else:
        raise AssertionError(kind)
    return bearer(token)


REASONS = {
    "missing": "TOKEN_MISSING",
    "basic": "TOKEN_MALFORMED",
    "bearer-without-token": "TOKEN_MALFORMED",
    "garbage": "TOKEN_INVALID",
    "expired": "TOKEN_EXPIRED",
    "other-secret": "TOKEN_INVALID_SIGNATURE",
    "alg-none": "TOKEN_INVALID",
    "wrong-issuer": "TOKEN_INVALID",
    "no-project": "TOKEN_INVALID",
    "bad-project": "TOKEN_INVALID",
}


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def _upload_requests(image_name: str) -> list[image_pb2.UploadImageDataRequest]:
    return [
        image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(name=image_name, size_bytes=4)
        ),
        image_pb2.UploadImageDataRequest(chunk=b"\0\0\0\0"),
    ]


def _every_rpc(images, provisioning, image_name: str):
    """One well-formed request for each RPC, keyed by its full method name."""
    return {
        "ImageService/ListImages": lambda md: images.ListImages(
            image_pb2.ListImagesRequest(), metadata=md
        ),
        "ImageService/GetImage": lambda md: images.GetImage(
            image_pb2.GetImageRequest(name=image_name), metadata=md
        ),
        "ImageService/CreateImage": lambda md: images.CreateImage(
            image_pb2.CreateImageRequest(image=private_image("x")),
            metadata=md,
        ),
        "ImageService/UpdateImage": lambda md: images.UpdateImage(
            image_pb2.UpdateImageRequest(
                image=image_pb2.Image(name=image_name, display_name="renamed"),
                update_mask=api.mask("display_name"),
            ),
            metadata=md,
        ),
        "ImageService/DeleteImage": lambda md: images.DeleteImage(
            image_pb2.DeleteImageRequest(name=image_name), metadata=md
        ),
        "ImageService/DeprecateImage": lambda md: images.DeprecateImage(
            image_pb2.DeprecateImageRequest(name=image_name), metadata=md
        ),
        "ImageService/UploadImageData": lambda md: images.UploadImageData(
            iter(_upload_requests(image_name)), metadata=md
        ),
        "ImageService/DownloadImageData": lambda md: _drain(
            images.DownloadImageData(
                image_pb2.DownloadImageDataRequest(name=image_name), metadata=md
            )
        ),
        "ProvisioningService/ListFlavors": lambda md: provisioning.ListFlavors(
            provisioning_pb2.ListFlavorsRequest(), metadata=md
        ),
        "ProvisioningService/GetFlavor": lambda md: provisioning.GetFlavor(
            provisioning_pb2.GetFlavorRequest(name=f"flavors/{api.S4}"), metadata=md
        ),
    }


@pytest.mark.parametrize("kind", sorted(REASONS))
async def test_every_rpc_refuses_bad_credentials(
    service, images, provisioning, as_project, kind
) -> None:
    owner = as_project(fresh_project())
    owned = await api.create(images, owner, display_name="must-survive")
    metadata = _credentials(service, kind)
    calls = _every_rpc(images, provisioning, owned.name)
    assert len(calls) == 10
    for method, call in calls.items():
        rich = await api.expect_error(call(metadata), grpc.StatusCode.UNAUTHENTICATED)
        assert rich.info.reason == REASONS[kind], method
    # Nothing was changed by the refused calls.
    still = await images.GetImage(image_pb2.GetImageRequest(name=owned.name), metadata=owner)
    assert still == owned
    listed = await images.ListImages(
        image_pb2.ListImagesRequest(filter="type = private"), metadata=owner
    )
    assert [i.name for i in listed.images] == [owned.name]


async def test_the_unary_rpcs_accept_a_valid_token(images, provisioning, as_project) -> None:
    admin = as_project(fresh_project("ops"), admin=True)
    probe = await images.CreateImage(
        image_pb2.CreateImageRequest(image=public_image(display_name="auth probe")),
        metadata=admin,
    )
    calls = _every_rpc(images, provisioning, probe.name)
    for method in (
        "ImageService/ListImages",
        "ImageService/GetImage",
        "ImageService/CreateImage",
        "ImageService/UpdateImage",
        "ImageService/DeprecateImage",
        "ImageService/DeleteImage",  # last: the others act on the probe image
        "ProvisioningService/ListFlavors",
        "ProvisioningService/GetFlavor",
    ):
        await calls[method](admin)


async def test_bearer_scheme_is_case_insensitive(images, service) -> None:
    token = service.authority.issue(fresh_project())
    response = await images.ListImages(
        image_pb2.ListImagesRequest(), metadata=(("authorization", f"bearer {token}"),)
    )
    assert len(response.images) >= 6


@pytest.mark.parametrize("metadata_kind", ["missing", "garbage"])
async def test_health_check_needs_no_token(channel, service, metadata_kind) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    metadata = _credentials(service, metadata_kind)
    for name in ("", *sorted(SERVICES)):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=name), metadata=metadata)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    await expect_unknown_health_service(stub)


async def expect_unknown_health_service(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_needs_no_token(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="bms.image.v1.ImageService"),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="bms.image.v1.ProvisioningService"
        ),
    ]
    responses = [response async for response in stub.ServerReflectionInfo(iter(requests))]
    assert len(responses) == 3
    listed = {s.name for s in responses[0].list_services_response.service}
    assert SERVICES | {"grpc.health.v1.Health"} <= listed
    for response in responses[1:]:
        assert response.WhichOneof("message_response") == "file_descriptor_response"
        assert response.file_descriptor_response.file_descriptor_proto
