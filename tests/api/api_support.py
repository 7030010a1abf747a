"""Helpers shared by the in-process gRPC tests: rich-status decoding, request
builders and catalog walkers. Plain functions, so no second conftest.py."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.serving import RunningService
from bms_image.processes import start
from helpers import make_settings

ERROR_DOMAIN = "image.bms.cloud"
Metadata = tuple[tuple[str, str], ...]

S4 = "physical.s4.large"  # hardware model s4-2288h-v5, the only flavor of it
H2 = "physical.h2.large"  # h2-rh2288-v3
KI1 = "physical.ki1.2xlarge"  # ki1-taishan-2280-v2 (Arm)
S4_MODEL = "s4-2288h-v5"
H2_MODEL = "h2-rh2288-v3"
KI1_MODEL = "ki1-taishan-2280-v2"

#: The public catalog seeded from src/bms_image/common/catalog.toml.
CENTOS = "CentOS 7.6 64bit"
UBUNTU = "Ubuntu 22.04 server 64bit"
SLES = "SUSE Linux Enterprise Server 12 SP3 64bit"
EULER = "EulerOS 2.3 64bit"
WINDOWS = "Windows Server 2019 Datacenter 64bit"
OPENEULER_ARM = "openEuler 22.03 LTS SP1 64bit (Arm)"
UBUNTU_ARM = "Ubuntu 22.04 server 64bit (Arm)"
PUBLIC_NAMES = frozenset({CENTOS, UBUNTU, SLES, EULER, WINDOWS, OPENEULER_ARM, UBUNTU_ARM})

IMAGE_NAME = re.compile(r"^images/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class ProjectMetadata:
    """`as_project("alpha")`: call metadata of project `alpha-<suffix>`, the
    suffix being unique to the test, so tests sharing a service never see each
    other's private images. `.name("alpha")` is the real project name."""

    def __init__(self, service: RunningService) -> None:
        self._service = service
        self._suffix = uuid.uuid4().hex[:10]

    def name(self, project: str) -> str:
        return f"{project}-{self._suffix}"

    def __call__(self, project: str, admin: bool = False) -> Metadata:
        token = self._service.authority.issue(self.name(project), admin)
        return (("authorization", f"Bearer {token}"),)


def shared_service_fixtures() -> tuple[Any, Any, Any]:
    """Module-scoped replacements of conftest's `service` and `channel`, and
    an `as_project` giving each test projects of its own (ProjectMetadata),
    for modules whose tests do not change what other tests see: they leave
    the public catalog alone. Starting the service (migrations, seeding the
    catalog with its bytes) is the dominant cost of a test, so such modules
    share one. They must also run their tests on the module's event loop:
    `pytestmark = pytest.mark.asyncio(loop_scope="module")`.
    conftest's `images` and `provisioning` then use these."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
        running = await start(make_settings(tmp_path_factory.mktemp("shared-service")))
        yield running
        await running.stop(0)

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def channel(service: RunningService) -> AsyncIterator[grpc.aio.Channel]:
        async with grpc.aio.insecure_channel(service.address) as opened:
            yield opened

    @pytest.fixture
    def as_project(service: RunningService) -> ProjectMetadata:
        return ProjectMetadata(service)

    return service, channel, as_project


def fresh_project(prefix: str = "p") -> str:
    """A project name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class RichError:
    """A failed call with its decoded google.rpc.Status details."""

    error: grpc.aio.AioRpcError
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None = None
    quota_failure: error_details_pb2.QuotaFailure | None = None
    precondition_failure: error_details_pb2.PreconditionFailure | None = None

    @property
    def fields(self) -> list[str]:
        assert self.bad_request is not None
        return [v.field for v in self.bad_request.field_violations]


def decode_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """grpc_status.rpc_status.from_call reads the call's trailing metadata and
    code, both of which an AioRpcError offers synchronously."""
    return rpc_status.from_call(error)  # type: ignore[arg-type]


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None
) -> RichError:
    """Awaits a call that must fail with `code` and a rich status whose
    ErrorInfo has `reason`; checks the detail a code promises
    (BadRequest, QuotaFailure, PreconditionFailure) and that nothing leaks a
    traceback."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    assert "Traceback" not in (error.details() or "")
    assert "Traceback" not in (error.debug_error_string() or "")
    status = decode_status(error)
    assert status is not None, f"{code.name} without google.rpc.Status details: {error.details()}"
    assert status.code == code.value[0]
    assert status.message == error.details()
    assert "Traceback" not in status.message

    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {status.details}"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN
    assert info.reason and info.reason == info.reason.upper()
    if reason is not None:
        assert info.reason == reason, (
            f"expected reason {reason}, got {info.reason}: {status.message}"
        )

    rich = RichError(error=error, status=status, info=info)
    for packed in status.details:
        for attribute, message_type in (
            ("bad_request", error_details_pb2.BadRequest),
            ("quota_failure", error_details_pb2.QuotaFailure),
            ("precondition_failure", error_details_pb2.PreconditionFailure),
        ):
            if packed.Is(message_type.DESCRIPTOR):
                message = message_type()
                packed.Unpack(message)
                setattr(rich, attribute, message)
                assert "Traceback" not in str(message)

    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert rich.bad_request is not None, "INVALID_ARGUMENT without google.rpc.BadRequest"
        assert rich.bad_request.field_violations
        for violation in rich.bad_request.field_violations:
            assert violation.field and violation.description
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert rich.quota_failure is not None, "RESOURCE_EXHAUSTED without google.rpc.QuotaFailure"
        assert rich.quota_failure.violations
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        assert rich.precondition_failure is not None, (
            "FAILED_PRECONDITION without google.rpc.PreconditionFailure"
        )
    return rich


async def expect_invalid(call: Awaitable[Any], field: str, reason: str | None = None) -> RichError:
    """INVALID_ARGUMENT whose BadRequest names `field` (exactly)."""
    rich = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert field in rich.fields, f"expected a violation of {field!r}, got {rich.fields}"
    return rich


def private_image(**overrides: Any) -> image_pb2.Image:
    """A valid private image for CreateImage (on the s4 hardware model)."""
    values: dict[str, Any] = {
        "display_name": "web-server-base",
        "os_type": image_pb2.OS_TYPE_LINUX,
        "os_distro": "centos",
        "os_version": "7.6",
        "architecture": image_pb2.ARCHITECTURE_X86_64,
        "hardware_model": S4_MODEL,
    }
    values.update(overrides)
    return image_pb2.Image(**values)


def public_image(**overrides: Any) -> image_pb2.Image:
    """A valid public image for an admin's CreateImage."""
    values: dict[str, Any] = {
        "display_name": "Rocky Linux 9.3 64bit",
        "type": image_pb2.IMAGE_TYPE_PUBLIC,
        "os_type": image_pb2.OS_TYPE_LINUX,
        "os_distro": "rocky",
        "os_version": "9.3",
        "architecture": image_pb2.ARCHITECTURE_X86_64,
        "supported_flavors": [f"flavors/{S4}", H2],
    }
    values.update(overrides)
    return image_pb2.Image(**values)


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def new_request_id() -> str:
    return str(uuid.uuid4())


def update_request(
    name: str, paths: list[str], etag: str = "", **values: Any
) -> image_pb2.UpdateImageRequest:
    return image_pb2.UpdateImageRequest(
        image=image_pb2.Image(name=name, etag=etag, **values), update_mask=mask(*paths)
    )


def assert_same_except(before: image_pb2.Image, after: image_pb2.Image, *changed: str) -> None:
    for field in image_pb2.Image.DESCRIPTOR.fields:
        if field.name in (*changed, "etag", "update_time"):
            continue
        assert getattr(after, field.name) == getattr(before, field.name), field.name


async def create(
    images: image_pb2_grpc.ImageServiceStub, metadata: Metadata, **overrides: Any
) -> image_pb2.Image:
    request = image_pb2.CreateImageRequest(image=private_image(**overrides))
    return await images.CreateImage(request, metadata=metadata)


async def list_all(
    images: image_pb2_grpc.ImageServiceStub,
    metadata: Metadata,
    filter_text: str = "",
    page_size: int = 1000,
) -> list[image_pb2.Image]:
    """Every image of a listing, following next_page_token to the end."""
    found: list[image_pb2.Image] = []
    token = ""
    for _ in range(10_000):
        response = await images.ListImages(
            image_pb2.ListImagesRequest(page_size=page_size, page_token=token, filter=filter_text),
            metadata=metadata,
        )
        found.extend(response.images)
        token = response.next_page_token
        if not token:
            return found
    raise AssertionError("pagination did not end")


async def names_listed(
    images: image_pb2_grpc.ImageServiceStub, metadata: Metadata, filter_text: str = ""
) -> list[str]:
    return [image.name for image in await list_all(images, metadata, filter_text)]


async def display_names_listed(
    images: image_pb2_grpc.ImageServiceStub, metadata: Metadata, filter_text: str = ""
) -> set[str]:
    return {image.display_name for image in await list_all(images, metadata, filter_text)}


async def public_by_display_name(
    images: image_pb2_grpc.ImageServiceStub, metadata: Metadata
) -> dict[str, image_pb2.Image]:
    return {
        image.display_name: image for image in await list_all(images, metadata, "type = public")
    }
