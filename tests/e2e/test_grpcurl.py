"""The README's grpcurl walkthrough, run for real: a `bms-image serve`
process, tokens from `bms-image token`, and the grpcurl binary using server
reflection (no proto files). Each call is the command a person types
(support/grpcurl.py spells it out)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from support.grpcurl import (
    EXIT_NOT_FOUND,
    EXIT_PERMISSION_DENIED,
    EXIT_UNAUTHENTICATED,
    Caller,
    by_name,
    ok,
)

if TYPE_CHECKING:
    from conftest import ServerProcess

pytestmark = pytest.mark.e2e

CREATE_WEB_SERVER = (
    '{"image": {"display_name": "web-server-golden", "os_type": "OS_TYPE_LINUX", '
    '"os_distro": "centos", "os_version": "7.6", "architecture": "ARCHITECTURE_X86_64", '
    '"hardware_model": "s4-2288h-v5", "tags": ["web", "golden"]}}'
)
LIST_IMAGES = "bms.image.v1.ImageService/ListImages"
GET_IMAGE = "bms.image.v1.ImageService/GetImage"
CREATE_IMAGE = "bms.image.v1.ImageService/CreateImage"
DELETE_IMAGE = "bms.image.v1.ImageService/DeleteImage"
GET_FLAVOR = "bms.image.v1.ProvisioningService/GetFlavor"
HEALTH_CHECK = "grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def anonymous(server: ServerProcess) -> Caller:
    return Caller(server.address)


@pytest.fixture(scope="module")
def alpha(server: ServerProcess) -> Caller:
    return Caller(server.address, server.token("alpha"))


@pytest.fixture(scope="module")
def beta(server: ServerProcess) -> Caller:
    return Caller(server.address, server.token("beta"))


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Caller:
    return Caller(server.address, server.token("ops", admin=True))


def test_list_shows_the_services_through_reflection(anonymous: Caller) -> None:
    listed = anonymous.ok("list").split()

    assert {
        "bms.image.v1.ImageService",
        "bms.image.v1.ProvisioningService",
        "grpc.health.v1.Health",
    } <= set(listed)


def test_describe_image_service(server: ServerProcess) -> None:
    described = ok("-plaintext", server.address, "describe", "bms.image.v1.ImageService")

    assert "bms.image.v1.ImageService is a service:" in described
    for method in (
        "ListImages",
        "GetImage",
        "CreateImage",
        "UpdateImage",
        "DeleteImage",
        "DeprecateImage",
    ):
        assert f"rpc {method} (" in described


@pytest.mark.parametrize(
    "service", [None, "bms.image.v1.ImageService", "bms.image.v1.ProvisioningService"]
)
def test_health_check_needs_no_token(anonymous: Caller, service: str | None) -> None:
    body = None if service is None else f'{{"service": "{service}"}}'
    health = anonymous.ok(HEALTH_CHECK, body)

    assert health == {"status": "SERVING"}


def test_list_images_shows_the_public_catalog(alpha: Caller) -> None:
    listed = alpha.ok(LIST_IMAGES)

    images = listed["images"]
    assert len(images) >= 6
    assert {image["type"] for image in images} == {"IMAGE_TYPE_PUBLIC"}
    assert all(image["name"].startswith("images/") for image in images)
    assert "next_page_token" not in listed


def test_list_images_with_a_filter(alpha: Caller) -> None:
    everything = alpha.ok(LIST_IMAGES)["images"]

    filtered = alpha.ok(LIST_IMAGES, '{"filter": "type = public AND flavor = physical.s4.large"}')[
        "images"
    ]

    assert filtered
    for image in filtered:
        assert image["type"] == "IMAGE_TYPE_PUBLIC"
        assert "flavors/physical.s4.large" in image["supported_flavors"]
    expected = [
        i["name"] for i in everything if "flavors/physical.s4.large" in i["supported_flavors"]
    ]
    assert [i["name"] for i in filtered] == expected
    assert len(filtered) < len(everything), "the Arm-only images do not run on physical.s4.large"


def test_get_image(alpha: Caller) -> None:
    listed = alpha.ok(LIST_IMAGES)["images"]
    name = listed[0]["name"]

    image = alpha.ok(GET_IMAGE, by_name(name))

    assert image == listed[0]
    assert image["status"] == "IMAGE_STATUS_ACTIVE"


def test_list_and_get_flavors(alpha: Caller) -> None:
    flavors = alpha.ok("bms.image.v1.ProvisioningService/ListFlavors")["flavors"]
    names = [flavor["name"] for flavor in flavors]
    assert "flavors/physical.s4.large" in names
    assert names == sorted(names)

    flavor = alpha.ok(GET_FLAVOR, by_name("flavors/physical.s4.large"))

    assert flavor == flavors[names.index("flavors/physical.s4.large")]
    assert flavor["hardware_model"] == "s4-2288h-v5"
    assert flavor["public_images"]

    alpha.fails(EXIT_NOT_FOUND, "NotFound", GET_FLAVOR, by_name("flavors/physical.nope"))


def test_private_image_create_update_delete(alpha: Caller) -> None:
    created = alpha.ok(CREATE_IMAGE, CREATE_WEB_SERVER)
    name = created["name"]
    assert name.startswith("images/")
    assert created["display_name"] == "web-server-golden"
    assert created["type"] == "IMAGE_TYPE_PRIVATE"
    assert created["owner_project"] == "alpha"
    assert created["status"] == "IMAGE_STATUS_QUEUED"
    assert created["os_type"] == "OS_TYPE_LINUX"
    assert (created["os_distro"], created["os_version"]) == ("centos", "7.6")
    assert created["architecture"] == "ARCHITECTURE_X86_64"
    assert created["hardware_model"] == "s4-2288h-v5"
    assert created["supported_flavors"] == ["flavors/physical.s4.large"]
    assert created["tags"] == ["web", "golden"]

    mine = alpha.ok(LIST_IMAGES, '{"filter": "type = private"}')["images"]
    assert name in [image["name"] for image in mine]

    # grpcurl (1.8.x, golang/protobuf jsonpb) cannot read the proto3 JSON
    # string form of a FieldMask ("update_mask": "description,tags"): it needs
    # the object form. See https://github.com/fullstorydev/grpcurl/issues/393
    updated = alpha.ok(
        "bms.image.v1.ImageService/UpdateImage",
        f'{{"image": {{"name": "{name}", "description": "Nginx on CentOS 7.6", '
        '"tags": ["web", "nginx"]}, "update_mask": {"paths": ["description", "tags"]}}',
    )
    assert updated["description"] == "Nginx on CentOS 7.6"
    assert updated["tags"] == ["web", "nginx"]
    assert updated["display_name"] == "web-server-golden", "not in the mask: unchanged"
    assert updated["etag"] != created["etag"]

    deleted = alpha.ok(DELETE_IMAGE, by_name(name))
    assert deleted == {}

    alpha.fails(EXIT_NOT_FOUND, "NotFound", GET_IMAGE, by_name(name))


def test_a_call_without_a_token_is_unauthenticated(anonymous: Caller) -> None:
    stderr = anonymous.fails(EXIT_UNAUTHENTICATED, "Unauthenticated", LIST_IMAGES)

    assert "TOKEN_MISSING" in stderr


def test_a_token_signed_elsewhere_is_unauthenticated(
    server: ServerProcess, foreign_token: str
) -> None:
    stranger = Caller(server.address, foreign_token)
    stderr = stranger.fails(EXIT_UNAUTHENTICATED, "Unauthenticated", LIST_IMAGES)

    assert "TOKEN_INVALID_SIGNATURE" in stderr


def test_another_projects_private_image_is_not_found(alpha: Caller, beta: Caller) -> None:
    created = alpha.ok(CREATE_IMAGE, CREATE_WEB_SERVER)
    name = created["name"]

    stderr = beta.fails(EXIT_NOT_FOUND, "NotFound", GET_IMAGE, by_name(name))
    assert "IMAGE_NOT_FOUND" in stderr

    seen_by_beta = beta.ok(LIST_IMAGES)["images"]
    assert name not in [image["name"] for image in seen_by_beta]

    beta.fails(EXIT_NOT_FOUND, "NotFound", DELETE_IMAGE, by_name(name))
    still = alpha.ok(GET_IMAGE, by_name(name))
    assert still == created, "beta's failed delete left alpha's image alone"


def test_only_an_admin_publishes_an_image(alpha: Caller, beta: Caller, admin: Caller) -> None:
    request = (
        '{"image": {"display_name": "Rocky Linux 9 64bit", "type": "IMAGE_TYPE_PUBLIC", '
        '"os_type": "OS_TYPE_LINUX", "os_distro": "rocky", "os_version": "9", '
        '"architecture": "ARCHITECTURE_X86_64", '
        '"supported_flavors": ["flavors/physical.s4.large"]}}'
    )
    alpha.fails(EXIT_PERMISSION_DENIED, "PermissionDenied", CREATE_IMAGE, request)

    published = admin.ok(CREATE_IMAGE, request)
    name = published["name"]
    assert published["type"] == "IMAGE_TYPE_PUBLIC"
    assert "owner_project" not in published

    seen_by_beta = beta.ok(GET_IMAGE, by_name(name))
    assert seen_by_beta["type"] == "IMAGE_TYPE_PUBLIC"

    admin.ok(DELETE_IMAGE, by_name(name))


def test_sigterm_shuts_down_gracefully(start_server: Callable[[], ServerProcess]) -> None:
    server = start_server()
    anonymous = Caller(server.address)
    health = anonymous.ok(HEALTH_CHECK)
    assert health == {"status": "SERVING"}

    code, seconds = server.terminate()

    assert code == 0, f"exit code {code}\n{server.output()}"
    assert seconds < server.grace_seconds, f"took {seconds:.1f}s with nothing in flight"
    assert "shutting down" in server.output()
    after = anonymous.run(HEALTH_CHECK)
    assert after.returncode != 0
    assert "Failed to dial target host" in after.stderr, after.stderr
