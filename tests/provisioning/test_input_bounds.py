"""What a deployment request can make the fleet parse or allocate is bounded,
and refused before any byte moves: hostile `#cloud-config` user data
(aliases, depth, node count, unreadable values) is INVALID_ARGUMENT
INVALID_USER_DATA on CreateServers and ReinstallServer; an SSH key line is
at most 16 KiB; a data disk at most what ext4 holds (16,383 GiB), at most 8
of them; each refusal names its field. Documents within the bounds still
deploy, with their files written."""

from __future__ import annotations

import asyncio

import provisioning_support as prov
import pytest
from provisioning_support import CENTOS, S4

from bms.image.v1 import provisioning_pb2
from bms_image.fleet.adapters.firstboot import MAX_YAML_DEPTH, MAX_YAML_NODES
from bms_image.fleet.domain.servers import MAX_DATA_DISK_GB, MAX_DATA_DISKS
from support.builders import new_ssh_key
from support.errors import Code, expect_error
from support.fleet_events import STAGE_ACTIVE, STOPPED

pb = provisioning_pb2


def nested(depth: int) -> str:
    return "#cloud-config\n" + "".join(" " * level + f"k{level}:\n" for level in range(depth))


def padded(nodes: int) -> str:
    return "#cloud-config\npadding: [" + ",".join(["1"] * nodes) + "]\n"


#: Each is small and quick to expand (the real bomb runs against a real
#: process in tests/security/test_parser_bombs.py), but each was accepted or
#: answered INTERNAL before the loader was bounded.
HOSTILE_USER_DATA = {
    "an anchor and an alias": "#cloud-config\na: &a [x]\nwrite_files:\n- path: /x\n  content: *a\n",
    "an anchor alone": "#cloud-config\nwrite_files: &w []\n",
    "nested one level too deep": nested(MAX_YAML_DEPTH + 1),
    "one node too many": padded(MAX_YAML_NODES),
    "an int of 5,000 digits": "#cloud-config\nwrite_files: []\nn: " + "7" * 5000 + "\n",
    "a date that is none": "#cloud-config\nwhen: 2001-13-45\n",
    "an empty !!int": "#cloud-config\n!!int \n",
}


async def assert_nothing_created(provisioning, md, settings) -> None:
    assert await prov.list_servers(provisioning, md) == []
    servers = settings.data_dir / "fleet" / "servers"
    assert not servers.exists() or list(servers.iterdir()) == []


@pytest.mark.parametrize("case", list(HOSTILE_USER_DATA))
async def test_hostile_cloud_config_is_refused_up_front(
    provisioning, as_project, settings, case
) -> None:
    md = as_project("alpha")
    request = prov.create_request(CENTOS, S4, 2, "web", user_data=HOSTILE_USER_DATA[case])
    rich = await prov.create_error(
        provisioning, md, request, Code.INVALID_ARGUMENT, "INVALID_USER_DATA"
    )
    assert rich.fields == ["user_data"]
    assert rich.message.startswith("user_data: #cloud-config")
    await assert_nothing_created(provisioning, md, settings)


async def test_hostile_cloud_config_is_refused_by_a_reinstall(provisioning, as_project) -> None:
    md = as_project("alpha")
    deployment = await prov.deploy(provisioning, md, prov.create_request(CENTOS, S4, 1, "re"))
    (name,) = deployment.servers
    await provisioning.StopServer(pb.StopServerRequest(name=name), metadata=md)
    for case, user_data in HOSTILE_USER_DATA.items():
        request = pb.ReinstallServerRequest(name=name, image=CENTOS, user_data=user_data)

        async def reinstall(request: pb.ReinstallServerRequest = request) -> None:
            async for event in provisioning.ReinstallServer(request, metadata=md):
                raise AssertionError(f"the reinstall started: {event}")

        try:
            rich = await expect_error(
                asyncio.wait_for(reinstall(), 30), Code.INVALID_ARGUMENT, "INVALID_USER_DATA"
            )
        except AssertionError as error:
            raise AssertionError(f"{case}: {error}") from None
        assert rich.fields == ["user_data"], case
    assert (await prov.get_server(provisioning, md, name)).state == STOPPED


async def test_cloud_config_within_the_bounds_deploys(provisioning, as_project, settings) -> None:
    """Near every bound at once: nodes, depth, and files still written."""
    user_data = (
        padded(MAX_YAML_NODES - 200)
        + nested(MAX_YAML_DEPTH - 4).removeprefix("#cloud-config\n")
        + "write_files:\n- path: /etc/motd\n  content: within the bounds\n"
    )
    assert len(user_data.encode()) < 32 * 1024
    md = as_project("alpha")
    deployment = await prov.deploy(
        provisioning, md, prov.create_request(CENTOS, S4, 1, "ok", user_data=user_data)
    )
    (name,) = deployment.servers
    assert deployment.final(name).stage == STAGE_ACTIVE, deployment.final(name)
    assert prov.read_disk_file(settings, name, "etc/motd") == b"within the bounds"


async def test_an_ssh_key_line_over_16_kib_is_refused(provisioning, as_project, settings) -> None:
    """A real key with a 16 KiB comment: the key itself is valid, its line is not."""
    md = as_project("alpha")
    key = new_ssh_key("c" * 16 * 1024).line
    rich = await prov.create_error(
        provisioning, md, prov.create_request(CENTOS, S4, 1, "k", ssh_public_key=key),
        Code.INVALID_ARGUMENT,
    )  # fmt: skip
    assert rich.fields == ["ssh_public_key"]
    assert "16384" in rich.bad_request.field_violations[0].description
    await assert_nothing_created(provisioning, md, settings)


def with_disks(sizes: list[int]) -> pb.CreateServersRequest:
    request = prov.create_request(CENTOS, S4, 1, "d")
    request.data_disks_gb.extend(sizes)
    return request


@pytest.mark.parametrize(
    ("sizes", "field"),
    [
        ([MAX_DATA_DISK_GB + 1], "data_disks_gb[0]"),
        ([1, 65536], "data_disks_gb[1]"),
        ([0], "data_disks_gb[0]"),
        ([-5], "data_disks_gb[0]"),
        ([1] * (MAX_DATA_DISKS + 1), "data_disks_gb"),
    ],
    ids=["16384 GiB", "65536 GiB", "0 GiB", "negative", "9 disks"],
)
async def test_data_disks_the_file_system_cannot_hold_are_refused_up_front(
    provisioning, as_project, settings, sizes, field
) -> None:
    """Before the bound, 16,384 GiB (ext4's 16 TiB, which it cannot hold: its
    files end one block short) and more were accepted, and the server failed
    only after its image was fetched."""
    md = as_project("alpha")
    rich = await prov.create_error(provisioning, md, with_disks(sizes), Code.INVALID_ARGUMENT)
    assert field in rich.fields, rich.fields
    await assert_nothing_created(provisioning, md, settings)


async def test_the_largest_data_disk_is_created(provisioning, as_project, settings) -> None:
    """16,383 GiB: a sparse file the fleet's file system can hold."""
    md = as_project("alpha")
    deployment = await prov.deploy(provisioning, md, with_disks([MAX_DATA_DISK_GB]))
    (name,) = deployment.servers
    assert deployment.final(name).stage == STAGE_ACTIVE, deployment.final(name)
    data_disk = prov.server_dir(settings, name) / "data-1.disk"
    assert data_disk.stat().st_size == MAX_DATA_DISK_GB * 1024**3
