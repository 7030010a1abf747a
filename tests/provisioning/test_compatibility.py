"""CreateServers refuses what cannot work before any byte moves: the right
code and ErrorInfo reason, no event streamed and no server created."""

from __future__ import annotations

import uuid

import provisioning_support as prov
import pytest
from provisioning_support import (
    ACCEPTED,
    CENTOS,
    CLOUD_INIT,
    H2,
    KI1,
    OPENEULER_ARM,
    REJECTED,
    S4,
    S4_MODEL,
    SDI_DRIVER,
    SLES,
    UBUNTU,
)

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.common import disk_format as disks
from support.builders import new_ssh_key
from support.errors import Code, outcome
from support.fleet_events import ACTIVE, EVS, FIRST_BOOT, LOCAL, STAGE_ACTIVE, stage_name
from support.services import SharingStub

pb = provisioning_pb2


async def assert_nothing_created(provisioning, md, settings) -> None:
    assert await prov.list_servers(provisioning, md) == []
    servers = settings.data_dir / "fleet" / "servers"
    assert not servers.exists() or list(servers.iterdir()) == []


async def refused(provisioning, md, settings, request, reason: str, *named: str):
    """CreateServers refused FAILED_PRECONDITION `reason` with a message naming
    each of `named`, and nothing created; the RichError."""
    rich = await prov.create_error(provisioning, md, request, Code.FAILED_PRECONDITION, reason)
    for name in named:
        assert name in rich.message, rich.message
    await assert_nothing_created(provisioning, md, settings)
    return rich


async def test_public_image_on_a_flavor_that_does_not_list_it(
    provisioning, images, as_project, settings
) -> None:
    md = as_project("alpha")
    ubuntu = await prov.get_image(images, md, UBUNTU)
    assert f"flavors/{H2}" not in ubuntu.supported_flavors
    assert ubuntu.supported_flavors, ubuntu
    # the message names the image, the flavor and every flavor it lists
    request = prov.create_request(UBUNTU, H2)
    supported = ubuntu.supported_flavors
    incompatible = "IMAGE_FLAVOR_INCOMPATIBLE"
    rich = await refused(
        provisioning, md, settings, request, incompatible, UBUNTU, f"flavors/{H2}", *supported
    )
    assert rich.precondition_failure is not None
    # an Arm image on an x86 flavor, and an x86 image on the Arm flavor
    await refused(provisioning, md, settings, prov.create_request(OPENEULER_ARM, S4), incompatible)
    request = prov.create_request(CENTOS, KI1)
    await refused(provisioning, md, settings, request, incompatible, CENTOS, f"flavors/{KI1}")


async def test_private_image_only_on_its_hardware_model(
    provisioning, images, as_project, settings
) -> None:
    md = as_project("alpha")
    image, _ = await prov.create_disk_image(images, md, hardware_model=S4_MODEL)
    request = prov.create_request(image.name, H2)
    # the message also says where it can go instead: flavors/S4
    await refused(
        provisioning,
        md,
        settings,
        request,
        "IMAGE_FLAVOR_INCOMPATIBLE",
        image.name,
        f"flavors/{H2}",
        S4_MODEL,
        f"flavors/{S4}",
    )
    # on its own model it deploys
    deployment = await prov.deploy(provisioning, md, prov.create_request(image.name, S4))
    (server,) = deployment.servers
    assert deployment.final(server).stage == STAGE_ACTIVE


async def test_queued_image_is_not_deployable(provisioning, images, as_project, settings) -> None:
    md = as_project("alpha")
    queued = await prov.create_queued(images, md)
    await refused(
        provisioning,
        md,
        settings,
        prov.create_request(queued.name, S4),
        "IMAGE_NOT_ACTIVE",
        queued.name,
    )


async def test_deprecated_public_image_is_not_deployable(
    provisioning, images, as_project, settings
) -> None:
    md = as_project("alpha")
    deprecated = await images.DeprecateImage(
        image_pb2.DeprecateImageRequest(name=SLES), metadata=as_project("ops", admin=True)
    )
    assert deprecated.deprecated
    await refused(
        provisioning, md, settings, prov.create_request(SLES, S4), "IMAGE_DEPRECATED", SLES
    )
    # the other public images are still fine
    deployment = await prov.deploy(provisioning, md, prov.create_request(CENTOS, S4))
    assert all(deployment.final(s).stage == STAGE_ACTIVE for s in deployment.servers)


async def test_image_without_cloud_init_takes_no_key(
    provisioning, images, as_project, settings
) -> None:
    md = as_project("alpha")
    image = await prov.image_without(images, md, CLOUD_INIT)
    request = prov.create_request(image.name, S4, 2, "bare", new_ssh_key().line)
    await refused(provisioning, md, settings, request, "IMAGE_WITHOUT_CLOUD_INIT", image.name)

    deployment = await prov.deploy(provisioning, md, prov.create_request(image.name, S4, 1, "bare"))
    (server_name,) = deployment.servers
    stages = deployment.stages(server_name)
    assert stages[-1] == STAGE_ACTIVE, [stage_name(s) for s in stages]
    first_boot = [e for e in deployment.by_server[server_name] if e.stage == FIRST_BOOT]
    assert len(first_boot) == 1
    assert "without cloud-init" in first_boot[0].message.lower(), first_boot[0].message
    server = await prov.get_server(provisioning, md, server_name)
    assert server.state == ACTIVE
    assert server.network_state == pb.NETWORK_STATE_UP
    assert server.ssh_key_fingerprint == ""
    # nothing ran at first boot: no host name, no key written on the disk
    assert prov.read_disk_file(settings, server_name, "etc/hostname") is None
    assert prov.read_disk_file(settings, server_name, "root/.ssh/authorized_keys") is None


async def test_evs_needs_an_evs_flavor_and_the_sdi_driver(
    provisioning, images, as_project, settings
) -> None:
    md = as_project("alpha")
    unavailable = "EVS_BOOT_UNAVAILABLE"
    request = prov.create_request(CENTOS, H2, boot_source=EVS)
    await refused(provisioning, md, settings, request, unavailable, f"flavors/{H2}")
    request = prov.create_request(SLES, S4, boot_source=EVS)
    await refused(provisioning, md, settings, request, unavailable, SLES, "SDI")
    no_driver = await prov.image_without(images, md, SDI_DRIVER)
    request = prov.create_request(no_driver.name, S4, boot_source=EVS)
    await refused(provisioning, md, settings, request, unavailable, no_driver.name)
    # unset, the same image simply streams onto the local disk
    deployment = await prov.deploy(provisioning, md, prov.create_request(no_driver.name, S4))
    (server_name,) = deployment.servers
    assert deployment.final(server_name).stage == STAGE_ACTIVE
    assert (await prov.get_server(provisioning, md, server_name)).boot_source == LOCAL


async def test_shared_image_deploys_only_once_accepted(
    provisioning, images, channel, as_project, settings
) -> None:
    sharing = SharingStub(channel)
    owner, member = as_project("owner"), as_project("member")
    image, _ = await prov.create_disk_image(images, owner, display_name="shared-golden")
    await prov.share(sharing, owner, image.name, "member")
    seen = await images.GetImage(image_pb2.GetImageRequest(name=image.name), metadata=member)
    assert seen.type == image_pb2.IMAGE_TYPE_SHARED

    request = prov.create_request(image.name, S4, 2, "member")
    rich = await prov.create_error(
        provisioning, member, request, Code.FAILED_PRECONDITION, "SHARED_IMAGE_NOT_ACCEPTED"
    )
    assert "pending" in rich.message
    await prov.answer(sharing, member, image.name, "member", REJECTED)
    await prov.create_error(
        provisioning, member, request, Code.FAILED_PRECONDITION, "SHARED_IMAGE_NOT_ACCEPTED"
    )
    await assert_nothing_created(provisioning, member, settings)

    await prov.answer(sharing, member, image.name, "member", ACCEPTED)
    deployment = await prov.deploy(provisioning, member, request)
    assert len(deployment.servers) == 2
    for server_name in deployment.servers:
        assert deployment.final(server_name).stage == STAGE_ACTIVE
        server = await prov.get_server(provisioning, member, server_name)
        assert server.project == "member" and server.image == image.name
    assert await prov.list_servers(provisioning, owner) == []


async def test_another_projects_private_image_is_not_found(
    provisioning, images, as_project, settings
) -> None:
    image, _ = await prov.create_disk_image(images, as_project("owner"))
    md = as_project("stranger")
    rich = await prov.create_error(
        provisioning, md, prov.create_request(image.name, S4), Code.NOT_FOUND, "IMAGE_NOT_FOUND"
    )
    assert "owner" not in rich.message
    await prov.create_error(
        provisioning,
        md,
        prov.create_request(f"images/{uuid.uuid4()}", S4),
        Code.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )
    await assert_nothing_created(provisioning, md, settings)


BAD_REQUESTS = {
    "count 0": ({"count": 0}, "count"),
    "count 101": ({"count": 101}, "count"),
    "count -1": ({"count": -1}, "count"),
    "upper-case prefix": ({"name_prefix": "Web"}, "name_prefix"),
    "empty prefix": ({"name_prefix": ""}, "name_prefix"),
    "prefix with underscore": ({"name_prefix": "web_a"}, "name_prefix"),
    "prefix ending in a dash": ({"name_prefix": "web-"}, "name_prefix"),
    "prefix of 49 letters": ({"name_prefix": "a" * 49}, "name_prefix"),
    "not a key": ({"ssh_public_key": "hello"}, "ssh_public_key"),
    "key that is not base64": ({"ssh_public_key": "ssh-ed25519 AAAA!!!! me"}, "ssh_public_key"),
    "key of another type": (
        {"ssh_public_key": "ssh-rsa " + new_ssh_key().line.split()[1]},
        "ssh_public_key",
    ),
    "user data over 32 KiB": ({"user_data": "#!/bin/sh\n" + "x" * 32 * 1024}, "user_data"),
    "invalid YAML": ({"user_data": "#cloud-config\nwrite_files: [ {path: /a\n"}, "user_data"),
    "image without images/": ({"image": CENTOS.removeprefix("images/")}, "image"),
    "image id not a UUID": ({"image": "images/centos-7.6"}, "image"),
    "image id in upper case": ({"image": CENTOS.upper().replace("IMAGES/", "images/")}, "image"),
    "empty image": ({"image": ""}, "image"),
    "flavor without flavors/": ({"flavor": S4}, "flavor"),
    "empty flavor": ({"flavor": ""}, "flavor"),
    "undefined boot source": ({"boot_source": 7}, "boot_source"),
}


async def test_bad_requests_are_invalid_argument(provisioning, as_project, settings) -> None:
    md = as_project("alpha")
    for case, (changes, field) in BAD_REQUESTS.items():
        request = prov.create_request(CENTOS, S4, 2, "web")
        for name, value in changes.items():
            setattr(request, name, value)
        try:
            rich = await prov.create_error(provisioning, md, request, Code.INVALID_ARGUMENT)
        except AssertionError as error:
            raise AssertionError(f"{case}: {error}") from None
        assert any(f == field or f.startswith(field + ".") for f in rich.fields), (
            f"{case}: violations {rich.fields}"
        )
    await assert_nothing_created(provisioning, md, settings)


async def test_largest_valid_request_values_are_accepted(
    provisioning, as_project, settings
) -> None:
    """The limits themselves pass: 48-letter prefix, user data of exactly 32 KiB."""
    md = as_project("alpha")
    prefix = "a" + "-b" * 23 + "c"
    assert len(prefix) == 48
    user_data = "#!/bin/sh\n"
    user_data += "x" * (32 * 1024 - len(user_data))
    deployment = await prov.deploy(
        provisioning, md, prov.create_request(CENTOS, S4, 1, prefix, user_data=user_data)
    )
    (server_name,) = deployment.servers
    assert deployment.final(server_name).stage == STAGE_ACTIVE
    assert (await prov.get_server(provisioning, md, server_name)).host_name == f"{prefix}-1"
    assert prov.read_disk_file(settings, server_name, "var/lib/cloud/instance/user-data.txt") == (
        user_data.encode()
    )


@pytest.mark.parametrize(
    "user_data",
    [
        prov.cloud_config({"etc/relative": "x"}),
        "#cloud-config\nwrite_files:\n  - path: /etc/../../escape\n    content: x\n",
    ],
    ids=["relative path", "dot-dot path"],
)
async def test_write_files_outside_the_root_are_refused(
    provisioning, as_project, settings, user_data
) -> None:
    md = as_project("alpha")
    rich = await prov.create_error(
        provisioning,
        md,
        prov.create_request(CENTOS, S4, user_data=user_data),
        Code.INVALID_ARGUMENT,
    )
    assert any(f.startswith("user_data") for f in rich.fields), rich.fields
    await assert_nothing_created(provisioning, md, settings)


@pytest.mark.parametrize("path", ["/", "/etc/"], ids=["root", "directory"])
async def test_write_files_paths_must_name_a_file(provisioning, as_project, settings, path) -> None:
    """A write_files entry for "/" or a path ending in "/" names a directory,
    not a file: refused up front like every other bad write_files path."""
    md = as_project("alpha")
    user_data = f"#cloud-config\nwrite_files:\n  - path: {path}\n    content: hi\n"
    deployment, rich = await outcome(
        prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, user_data=user_data))
    )
    if rich is None:
        (server_name,) = deployment.servers
        listed = sorted(disks.list_files(prov.system_disk(settings, server_name)))
        raise AssertionError(f"write_files path {path!r} was accepted; the disk holds {listed}")
    assert rich.code == Code.INVALID_ARGUMENT, rich.message
    assert any(f.startswith("user_data") for f in rich.fields), rich.fields
    await assert_nothing_created(provisioning, md, settings)


async def test_write_files_paths_are_normalised(provisioning, as_project, settings) -> None:
    """ "/etc/./motd" is /etc/motd to the server (or refused, never a file the
    server cannot reach at /etc/motd)."""
    md = as_project("alpha")
    user_data = "#cloud-config\nwrite_files:\n  - path: /etc/./motd\n    content: hi\n"
    deployment, rich = await outcome(
        prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, user_data=user_data))
    )
    if rich is not None:
        assert rich.code == Code.INVALID_ARGUMENT, rich.message
        return
    (server_name,) = deployment.servers
    assert deployment.final(server_name).stage == STAGE_ACTIVE
    listed = disks.list_files(prov.system_disk(settings, server_name))
    assert prov.read_disk_file(settings, server_name, "etc/motd") == b"hi", sorted(listed)


async def test_unknown_flavor_is_not_found(provisioning, as_project, settings) -> None:
    md = as_project("alpha")
    rich = await prov.create_error(
        provisioning,
        md,
        prov.create_request(CENTOS, "physical.z9.huge"),
        Code.NOT_FOUND,
        "FLAVOR_NOT_FOUND",
    )
    assert "flavors/physical.z9.huge" in rich.message
    assert f"{S4}" in rich.message  # says which flavors exist
    await assert_nothing_created(provisioning, md, settings)
