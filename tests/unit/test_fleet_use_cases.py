"""The fleet's use cases (fleet.domain.fleet.Fleet) over fakes of its ports:
no gRPC server, no database, no disk files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from unit_fakes import ADMIN, ALPHA, BETA, FLAVORS, S4_MODEL, make_image

from bms_image.common.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)
from bms_image.common.flavors import FlavorCatalog
from bms_image.common.model import Image, ImageStatus, Plugin, PluginKind, Visibility
from bms_image.common.paging import PageTokens
from bms_image.fleet.domain import network as network_module
from bms_image.fleet.domain.captures import CAPTURE_HOLD
from bms_image.fleet.domain.fleet import Fleet
from bms_image.fleet.domain.servers import (
    BootSource,
    DeployRequest,
    NetworkState,
    ProvisioningStage,
    Server,
    ServerEvent,
    ServerState,
)
from bms_image.fleet.domain.system_disks import DiskKind, SystemDisk
from support.fakes import (
    ALL_INTACT,
    FakeCloudInit,
    FakeImageSource,
    FakeServerDisks,
    FakeServerRepository,
)

TOKEN = "alpha-token"
SHA = "a" * 64
IMAGE_ID = "22222222-2222-4222-8222-222222222222"
FLAVOR = "physical.s4.large"


class World:
    """A fleet over fakes, and the fakes, for one test."""

    def __init__(self, root: Path, max_deployments: int = 1000) -> None:
        self.servers = FakeServerRepository()
        self.images = FakeImageSource(root / "cache")
        self.disks = FakeServerDisks(root)
        self.fleet = Fleet(
            self.servers,
            FlavorCatalog(FLAVORS),
            self.images,
            PageTokens(b"k" * 32),
            self.disks,
            FakeCloudInit(),
            max_deployments_per_project=max_deployments,
        )

    def image(self, **overrides: object) -> Image:
        values: dict[str, object] = {
            "id": IMAGE_ID,
            "sha256": SHA,
            "size_bytes": 1 << 20,
            "plugins": [
                Plugin(PluginKind.CLOUD_INIT, "1.0"),
                Plugin(PluginKind.SDI_INIC_DRIVER, "1"),
            ],
        }
        values.update(overrides)
        return self.images.add(make_image(**values))

    async def deploy(
        self, count: int = 1, ssh_public_key: str = "", user_data: str = ""
    ) -> list[Server]:
        request = DeployRequest(
            FLAVOR, IMAGE_ID, count, "web", ssh_public_key=ssh_public_key, user_data=user_data
        )
        return await self.fleet.create_servers(ALPHA, TOKEN, request)

    async def events(self, server: Server) -> list[ServerEvent]:
        """Every event of the server's work, from the first to ACTIVE or FAILED."""
        events = [event async for event in self.fleet.events.follow([server.id])]
        assert events and events[-1].final, events
        return events

    async def final(self, server: Server) -> ServerEvent:
        return (await self.events(server))[-1]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    built = World(tmp_path)
    yield built
    await built.fleet.close()


async def test_a_batch_fetches_the_image_once_and_every_server_becomes_active(
    world: World,
) -> None:
    world.image()
    servers = await world.deploy(count=3, ssh_public_key="", user_data="#cloud-config\n")
    finals = [await world.final(server) for server in servers]

    assert [e.stage for e in finals] == [ProvisioningStage.ACTIVE] * 3
    assert world.images.fetches == [IMAGE_ID], "a batch pulls the bytes once"
    for server in servers:
        stored = await world.fleet.get(ALPHA, server.id)
        assert stored.state is ServerState.ACTIVE
        assert stored.network_state is NetworkState.UP
        assert stored.boot_source is BootSource.EVS  # the flavor and the driver allow it
        record = await world.servers.disk(server.id)
        assert record is not None and record.kind is DiskKind.EVS
        assert record.base_sha256 == SHA
        disk = world.disks.servers[server.id]
        assert disk.files == {record.top: "overlay"}
        assert disk.first_boot["etc/hostname"] == f"{stored.host_name}\n".encode()
        assert disk.first_boot["etc/motd"] == b"hello\n"  # the user data's write_files
        assert {p.kind for p in stored.plugins} == set(PluginKind)


async def test_a_local_disk_is_a_copy_of_the_cache_entry_put_in_place(world: World) -> None:
    world.image(plugins=[Plugin(PluginKind.CLOUD_INIT, "1.0")])  # no SDI driver: no EVS
    (server,) = await world.deploy()
    assert (await world.final(server)).stage is ProvisioningStage.ACTIVE
    assert world.disks.servers[server.id].files == {"system.disk": f"copy of {SHA}.raw"}
    assert await world.servers.disk(server.id) == SystemDisk.local()


async def test_without_an_intact_network_plugin_the_network_stays_down(world: World) -> None:
    world.image()
    world.disks.states[f"{SHA}.raw"] = {
        **ALL_INTACT,
        PluginKind.BMS_NETWORK_CONFIG: ("modified", "1.0"),
    }
    (server,) = await world.deploy()
    assert (await world.final(server)).stage is ProvisioningStage.ACTIVE
    stored = await world.fleet.get(ALPHA, server.id)
    assert stored.network_state is NetworkState.DOWN
    assert stored.state_reason == "bms-network-config is modified: no network"
    assert PluginKind.BMS_NETWORK_CONFIG not in {p.kind for p in stored.plugins}


async def test_without_cloud_init_first_boot_writes_nothing(world: World) -> None:
    world.image()
    world.disks.states[f"{SHA}.raw"] = {
        **ALL_INTACT,
        PluginKind.CLOUD_INIT: ("missing", ""),
        PluginKind.CLOUDBASE_INIT: ("missing", ""),
    }
    (server,) = await world.deploy()
    events = await world.events(server)
    first_boot = [e for e in events if e.stage is ProvisioningStage.FIRST_BOOT]
    assert [e.message for e in first_boot] == [
        "first boot without Cloud-Init: host name, key and user data not applied"
    ]
    assert world.disks.servers[server.id].first_boot == {}


@pytest.mark.parametrize(
    ("failure", "code", "reason"),
    [
        (DataLoss("IMAGE_CHECKSUM_MISMATCH", "bad bytes"), "DATA_LOSS", "IMAGE_CHECKSUM_MISMATCH"),
        (NotFound("IMAGE_NOT_FOUND", "gone"), "NOT_FOUND", "IMAGE_NOT_FOUND"),
        (RuntimeError("boom"), "", "DEPLOYMENT_FAILED"),
    ],
)
async def test_a_failed_fetch_fails_every_server_with_the_code_of_its_error_type(
    world: World, failure: Exception, code: str, reason: str
) -> None:
    world.image()
    world.images.fetch_error = failure
    servers = await world.deploy(count=2)
    for server in servers:
        final = await world.final(server)
        assert (final.stage, final.error_code, final.error_reason) == (
            ProvisioningStage.FAILED,
            code,
            reason,
        )
        assert (await world.fleet.get(ALPHA, server.id)).state is ServerState.ERROR
        assert server.id not in world.disks.servers, "a failed build leaves no disk"


async def test_an_image_that_is_no_system_disk_is_not_bootable(world: World) -> None:
    world.image()
    world.disks.unreadable.add(f"{SHA}.raw")
    (server,) = await world.deploy()
    final = await world.final(server)
    assert (final.error_code, final.error_reason) == ("FAILED_PRECONDITION", "IMAGE_NOT_BOOTABLE")
    assert await world.servers.disk(server.id) is None


async def test_incompatible_or_bad_requests_are_refused_before_any_server_exists(
    world: World,
) -> None:
    world.image(hardware_model="h2-rh2288-v3")
    with pytest.raises(FailedPrecondition) as refused:
        await world.deploy()
    assert refused.value.reason == "IMAGE_FLAVOR_INCOMPATIBLE"
    world.image()
    with pytest.raises(InvalidArgument) as bad:
        await world.deploy(user_data="#cloud-config bad")
    assert bad.value.reason == "INVALID_USER_DATA"
    assert world.servers.rows == {} and world.images.fetches == []


async def test_deployments_at_once_are_limited_per_project(tmp_path: Path) -> None:
    world = World(tmp_path, max_deployments=2)
    world.image()
    release = asyncio.Event()

    async def held(image_id: str, sha256: str, token: str, progress: object) -> Path:
        await release.wait()
        return tmp_path / f"{sha256}.raw"

    world.images.fetch = held  # type: ignore[method-assign]
    first = await world.deploy(count=2)
    with pytest.raises(QuotaExceeded) as refused:
        await world.deploy()
    assert refused.value.reason == "DEPLOYMENT_LIMIT"
    assert refused.value.metadata == {"limit": "2", "used": "2"}
    release.set()
    for server in first:
        assert (await world.final(server)).stage is ProvisioningStage.ACTIVE
    (later,) = await world.deploy()  # the slots were given back
    assert (await world.final(later)).stage is ProvisioningStage.ACTIVE
    await world.fleet.close()


async def test_power_and_delete(world: World) -> None:
    world.image()
    (server,) = await world.deploy()
    await world.final(server)
    assert (await world.fleet.stop(ALPHA, server.id)).state is ServerState.STOPPED
    assert (await world.fleet.start(ALPHA, server.id)).state is ServerState.ACTIVE
    with pytest.raises(NotFound):
        await world.fleet.stop(BETA, server.id)  # another project sees nothing
    await world.fleet.delete(ALPHA, server.id)
    assert server.id not in world.disks.servers
    with pytest.raises(NotFound):
        await world.fleet.get(ALPHA, server.id)


async def stopped(world: World) -> Server:
    world.image()
    (server,) = await world.deploy()
    await world.final(server)
    return await world.fleet.stop(ALPHA, server.id)


def capture_image(server: Server, **overrides: object) -> Image:
    values: dict[str, object] = {
        "id": "33333333-3333-4333-8333-333333333333",
        "status": ImageStatus.QUEUED,
        "source_server": f"servers/{server.id}",
    }
    values.update(overrides)
    return make_image(**values)


async def test_a_capture_holds_the_server_once_and_uploads_its_flattened_disk(
    world: World,
) -> None:
    server = await stopped(world)
    source = await world.fleet.prepare_capture(ALPHA, TOKEN, server.id)
    assert (source.hardware_model, source.os_distro, source.os_version) == (
        S4_MODEL,
        "centos",
        "7.6",
    )
    assert (await world.fleet.get(ALPHA, server.id)).task == CAPTURE_HOLD
    with pytest.raises(FailedPrecondition) as busy:
        await world.fleet.prepare_capture(ALPHA, TOKEN, server.id)
    assert busy.value.reason == "SERVER_BUSY"
    with pytest.raises(FailedPrecondition) as power:
        await world.fleet.start(ALPHA, server.id)
    assert power.value.reason == "SERVER_BUSY"

    image = world.images.add(capture_image(server))
    await world.fleet.start_capture(TOKEN, server.id, image.id)
    for _ in range(100):
        if world.images.uploads and (await world.fleet.get(ALPHA, server.id)).task == "":
            break
        await asyncio.sleep(0.01)
    (upload,) = world.images.uploads
    assert upload.image_id == image.id and upload.released_before_end
    assert upload.data.startswith(f"flat {server.id}".encode())
    assert not (world.disks.root / f".capture-{image.id}.disk").exists(), "the flat file stays"
    with pytest.raises(FailedPrecondition) as again:
        await world.fleet.start_capture(TOKEN, server.id, image.id)
    assert again.value.reason == "SERVER_NOT_HELD"


async def test_a_capture_starts_only_into_its_own_queued_image(world: World) -> None:
    server = await stopped(world)
    await world.fleet.prepare_capture(ALPHA, TOKEN, server.id)
    for wrong in (
        capture_image(server, status=ImageStatus.ACTIVE),
        capture_image(server, source_server="servers/someone-else"),
        capture_image(server, uploaded_bytes=10),
    ):
        world.images.add(wrong)
        with pytest.raises(FailedPrecondition) as refused:
            await world.fleet.start_capture(TOKEN, server.id, wrong.id)
        assert refused.value.reason == "CAPTURE_IMAGE_MISMATCH"
    assert "it is IMAGE_STATUS_QUEUED" in refused.value.message
    await world.fleet.release_capture(TOKEN, server.id)
    assert (await world.fleet.get(ALPHA, server.id)).task == ""


async def test_a_capture_refuses_damaged_plugins_and_busy_captures(world: World) -> None:
    server = await stopped(world)
    world.disks.states[f"{SHA}.raw"] = {**ALL_INTACT, PluginKind.CLOUD_INIT: ("modified", "1.0")}
    with pytest.raises(FailedPrecondition) as damaged:
        await world.fleet.prepare_capture(ALPHA, TOKEN, server.id)
    assert damaged.value.reason == "PLUGINS_DAMAGED"
    assert (await world.fleet.get(ALPHA, server.id)).task == "", "a refusal holds nothing"


async def test_recovery_fails_interrupted_work_and_lets_go_of_holds(world: World) -> None:
    image = world.image()
    building = Server(
        id="44444444-4444-4444-8444-444444444444", project="alpha", host_name="web-1",
        flavor=FLAVOR, hardware_model=S4_MODEL, image_id=image.id, last_operation="deploy",
    )  # fmt: skip
    held = Server(
        id="55555555-5555-4555-8555-555555555555", project="alpha", host_name="web-2",
        flavor=FLAVOR, hardware_model=S4_MODEL, image_id=image.id,
        state=ServerState.STOPPED, task=CAPTURE_HOLD,
    )  # fmt: skip
    await world.servers.add_all([building, held], limit=10)
    assert await world.fleet.recover() == 1
    failed = await world.fleet.get(ALPHA, building.id)
    assert (failed.state, failed.state_reason) == (
        ServerState.ERROR,
        "deploy interrupted by a restart",
    )
    assert (await world.fleet.get(ALPHA, held.id)).task == ""
    assert world.disks.scratch_removed == 1


async def test_a_public_image_deploys_only_where_it_is_listed(world: World) -> None:
    world.image(visibility=Visibility.PUBLIC, owner_project=None, supported_flavors=["other"])
    with pytest.raises(FailedPrecondition) as refused:
        await world.deploy()
    assert refused.value.reason == "IMAGE_FLAVOR_INCOMPATIBLE"
    assert world.servers.rows == {}


@pytest.mark.parametrize(("network_config", "restored"), [("intact", True), ("modified", False)])
async def test_bms_network_config_repairs_an_injected_fault_only_when_intact(
    world: World, monkeypatch: pytest.MonkeyPatch, network_config: str, restored: bool
) -> None:
    monkeypatch.setattr(network_module, "NETWORK_RESTORE_SECONDS", 0.0)
    world.image()
    (server,) = await world.deploy()
    await world.final(server)
    with pytest.raises(PermissionDenied):
        await world.fleet.inject_network_fault(ALPHA, server.id)
    with pytest.raises(NotFound):
        await world.fleet.inject_network_fault(BETA, server.id)  # strangers learn nothing
    world.disks.states[f"{SHA}.raw"] = {
        **ALL_INTACT,
        PluginKind.BMS_NETWORK_CONFIG: (network_config, "1.0"),
    }
    down = await world.fleet.inject_network_fault(ADMIN, server.id)
    assert down.network_state is NetworkState.DOWN
    for _ in range(100):
        now = await world.fleet.get(ALPHA, server.id)
        if now.state_reason != "network interrupted (fault)":
            break
        await asyncio.sleep(0.01)
    if restored:
        assert (now.network_state, now.state_reason) == (
            NetworkState.UP,
            "network restored by bms-network-config",
        )
    else:
        assert (now.network_state, now.state_reason) == (
            NetworkState.DOWN,
            "network down: bms-network-config is modified, nothing restores it",
        )
