"""The README's grpcurl walkthrough, run for real: a `bms-image serve`
process, tokens from `bms-image token`, and the grpcurl binary using server
reflection (no proto files). Each call is written as a person types it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from support.processes import GRPCURL

if TYPE_CHECKING:
    from conftest import ServerProcess

pytestmark = pytest.mark.e2e

# grpcurl exits with 64 + the gRPC status code when the call fails.
EXIT_NOT_FOUND = 64 + 5
EXIT_PERMISSION_DENIED = 64 + 7
EXIT_UNAUTHENTICATED = 64 + 16


CREATE_WEB_SERVER = (
    '{"image": {"display_name": "web-server-golden", "os_type": "OS_TYPE_LINUX", '
    '"os_distro": "centos", "os_version": "7.6", "architecture": "ARCHITECTURE_X86_64", '
    '"hardware_model": "s4-2288h-v5", "tags": ["web", "golden"]}}'
)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs `grpcurl <args>` with the grpcurl binary of this environment."""
    return subprocess.run(
        [str(GRPCURL), *args], capture_output=True, text=True, timeout=30, check=False
    )


def ok(*args: str) -> Any:
    """A grpcurl call that must succeed; its JSON output, parsed."""
    done = grpcurl(*args)
    assert done.returncode == 0, f"grpcurl {args} failed ({done.returncode}):\n{done.stderr}"
    return json.loads(done.stdout) if done.stdout.strip().startswith("{") else done.stdout


def fails(expected_exit: int, code: str, *args: str) -> str:
    """A grpcurl call that must fail with the status grpcurl prints as `Code: <code>`."""
    done = grpcurl(*args)
    assert done.returncode == expected_exit, (
        f"grpcurl {args}: exit {done.returncode}, expected {expected_exit}\n"
        f"stdout: {done.stdout}\nstderr: {done.stderr}"
    )
    assert f"Code: {code}" in done.stderr, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def alpha(server: ServerProcess) -> str:
    return server.token("alpha")


@pytest.fixture(scope="module")
def beta(server: ServerProcess) -> str:
    return server.token("beta")


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> str:
    return server.token("ops", admin=True)


def test_list_shows_the_services_through_reflection(server: ServerProcess) -> None:
    listed = ok("-plaintext", server.address, "list").split()

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
def test_health_check_needs_no_token(server: ServerProcess, service: str | None) -> None:
    if service is None:
        health = ok("-plaintext", server.address, "grpc.health.v1.Health/Check")
    else:
        health = ok(
            "-plaintext",
            "-d",
            f'{{"service": "{service}"}}',
            server.address,
            "grpc.health.v1.Health/Check",
        )

    assert health == {"status": "SERVING"}


def test_list_images_shows_the_public_catalog(server: ServerProcess, alpha: str) -> None:
    listed = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        server.address,
        "bms.image.v1.ImageService/ListImages",
    )

    images = listed["images"]
    assert len(images) >= 6
    assert {image["type"] for image in images} == {"IMAGE_TYPE_PUBLIC"}
    assert all(image["name"].startswith("images/") for image in images)
    assert "next_page_token" not in listed


def test_list_images_with_a_filter(server: ServerProcess, alpha: str) -> None:
    everything = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        server.address,
        "bms.image.v1.ImageService/ListImages",
    )["images"]

    filtered = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        '{"filter": "type = public AND flavor = physical.s4.large"}',
        server.address,
        "bms.image.v1.ImageService/ListImages",
    )["images"]

    assert filtered
    for image in filtered:
        assert image["type"] == "IMAGE_TYPE_PUBLIC"
        assert "flavors/physical.s4.large" in image["supported_flavors"]
    expected = [
        i["name"] for i in everything if "flavors/physical.s4.large" in i["supported_flavors"]
    ]
    assert [i["name"] for i in filtered] == expected
    assert len(filtered) < len(everything), "the Arm-only images do not run on physical.s4.large"


def test_get_image(server: ServerProcess, alpha: str) -> None:
    listed = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        server.address,
        "bms.image.v1.ImageService/ListImages",
    )["images"]
    name = listed[0]["name"]

    image = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        f'{{"name": "{name}"}}',
        server.address,
        "bms.image.v1.ImageService/GetImage",
    )

    assert image == listed[0]
    assert image["status"] == "IMAGE_STATUS_ACTIVE"


def test_list_and_get_flavors(server: ServerProcess, alpha: str) -> None:
    flavors = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        server.address,
        "bms.image.v1.ProvisioningService/ListFlavors",
    )["flavors"]
    names = [flavor["name"] for flavor in flavors]
    assert "flavors/physical.s4.large" in names
    assert names == sorted(names)

    flavor = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        '{"name": "flavors/physical.s4.large"}',
        server.address,
        "bms.image.v1.ProvisioningService/GetFlavor",
    )

    assert flavor == flavors[names.index("flavors/physical.s4.large")]
    assert flavor["hardware_model"] == "s4-2288h-v5"
    assert flavor["public_images"]

    fails(
        EXIT_NOT_FOUND,
        "NotFound",
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        '{"name": "flavors/physical.nope"}',
        server.address,
        "bms.image.v1.ProvisioningService/GetFlavor",
    )


def test_private_image_create_update_delete(server: ServerProcess, alpha: str) -> None:
    created = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        CREATE_WEB_SERVER,
        server.address,
        "bms.image.v1.ImageService/CreateImage",
    )
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

    mine = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        '{"filter": "type = private"}',
        server.address,
        "bms.image.v1.ImageService/ListImages",
    )["images"]
    assert name in [image["name"] for image in mine]

    # grpcurl (1.8.x, golang/protobuf jsonpb) cannot read the proto3 JSON
    # string form of a FieldMask ("update_mask": "description,tags"): it needs
    # the object form. See https://github.com/fullstorydev/grpcurl/issues/393
    updated = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        f'{{"image": {{"name": "{name}", "description": "Nginx on CentOS 7.6", '
        '"tags": ["web", "nginx"]}, "update_mask": {"paths": ["description", "tags"]}}',
        server.address,
        "bms.image.v1.ImageService/UpdateImage",
    )
    assert updated["description"] == "Nginx on CentOS 7.6"
    assert updated["tags"] == ["web", "nginx"]
    assert updated["display_name"] == "web-server-golden", "not in the mask: unchanged"
    assert updated["etag"] != created["etag"]

    deleted = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        f'{{"name": "{name}"}}',
        server.address,
        "bms.image.v1.ImageService/DeleteImage",
    )
    assert deleted == {}

    fails(
        EXIT_NOT_FOUND,
        "NotFound",
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        f'{{"name": "{name}"}}',
        server.address,
        "bms.image.v1.ImageService/GetImage",
    )


def test_a_call_without_a_token_is_unauthenticated(server: ServerProcess) -> None:
    stderr = fails(
        EXIT_UNAUTHENTICATED,
        "Unauthenticated",
        "-plaintext",
        server.address,
        "bms.image.v1.ImageService/ListImages",
    )

    assert "TOKEN_MISSING" in stderr


def test_a_token_signed_elsewhere_is_unauthenticated(
    server: ServerProcess, foreign_token: str
) -> None:
    stderr = fails(
        EXIT_UNAUTHENTICATED,
        "Unauthenticated",
        "-plaintext",
        "-H",
        f"authorization: Bearer {foreign_token}",
        server.address,
        "bms.image.v1.ImageService/ListImages",
    )

    assert "TOKEN_INVALID_SIGNATURE" in stderr


def test_another_projects_private_image_is_not_found(
    server: ServerProcess, alpha: str, beta: str
) -> None:
    created = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        CREATE_WEB_SERVER,
        server.address,
        "bms.image.v1.ImageService/CreateImage",
    )
    name = created["name"]

    stderr = fails(
        EXIT_NOT_FOUND,
        "NotFound",
        "-plaintext",
        "-H",
        f"authorization: Bearer {beta}",
        "-d",
        f'{{"name": "{name}"}}',
        server.address,
        "bms.image.v1.ImageService/GetImage",
    )
    assert "IMAGE_NOT_FOUND" in stderr

    seen_by_beta = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {beta}",
        server.address,
        "bms.image.v1.ImageService/ListImages",
    )["images"]
    assert name not in [image["name"] for image in seen_by_beta]

    fails(
        EXIT_NOT_FOUND,
        "NotFound",
        "-plaintext",
        "-H",
        f"authorization: Bearer {beta}",
        "-d",
        f'{{"name": "{name}"}}',
        server.address,
        "bms.image.v1.ImageService/DeleteImage",
    )
    assert (
        ok(
            "-plaintext",
            "-H",
            f"authorization: Bearer {alpha}",
            "-d",
            f'{{"name": "{name}"}}',
            server.address,
            "bms.image.v1.ImageService/GetImage",
        )
        == created
    ), "beta's failed delete left alpha's image alone"


def test_only_an_admin_publishes_an_image(
    server: ServerProcess, alpha: str, beta: str, admin: str
) -> None:
    request = (
        '{"image": {"display_name": "Rocky Linux 9 64bit", "type": "IMAGE_TYPE_PUBLIC", '
        '"os_type": "OS_TYPE_LINUX", "os_distro": "rocky", "os_version": "9", '
        '"architecture": "ARCHITECTURE_X86_64", '
        '"supported_flavors": ["flavors/physical.s4.large"]}}'
    )
    fails(
        EXIT_PERMISSION_DENIED,
        "PermissionDenied",
        "-plaintext",
        "-H",
        f"authorization: Bearer {alpha}",
        "-d",
        request,
        server.address,
        "bms.image.v1.ImageService/CreateImage",
    )

    published = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {admin}",
        "-d",
        request,
        server.address,
        "bms.image.v1.ImageService/CreateImage",
    )
    name = published["name"]
    assert published["type"] == "IMAGE_TYPE_PUBLIC"
    assert "owner_project" not in published

    seen_by_beta = ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {beta}",
        "-d",
        f'{{"name": "{name}"}}',
        server.address,
        "bms.image.v1.ImageService/GetImage",
    )
    assert seen_by_beta["type"] == "IMAGE_TYPE_PUBLIC"

    ok(
        "-plaintext",
        "-H",
        f"authorization: Bearer {admin}",
        "-d",
        f'{{"name": "{name}"}}',
        server.address,
        "bms.image.v1.ImageService/DeleteImage",
    )


def test_sigterm_shuts_down_gracefully(start_server: Callable[[], ServerProcess]) -> None:
    server = start_server()
    health = ok("-plaintext", server.address, "grpc.health.v1.Health/Check")
    assert health == {"status": "SERVING"}

    code, seconds = server.terminate()

    assert code == 0, f"exit code {code}\n{server.output()}"
    assert seconds < server.grace_seconds, f"took {seconds:.1f}s with nothing in flight"
    assert "shutting down" in server.output()
    after = grpcurl("-plaintext", server.address, "grpc.health.v1.Health/Check")
    assert after.returncode != 0
    assert "Failed to dial target host" in after.stderr, after.stderr
