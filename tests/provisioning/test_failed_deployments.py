"""What goes wrong during a deployment: corrupted image bytes fail every
server of the batch with DATA_LOSS and leave nothing behind; bytes that hold
no system disk fail clearly; a missing or altered bms-network-config leaves
the server up without a network."""

from __future__ import annotations

from pathlib import Path

import grpc
import provisioning_support as prov
import pytest
from provisioning_support import CLOUD_INIT, NETWORK_CONFIG, S4, SDI_DRIVER

from bms.image.v1 import image_pb2, provisioning_pb2
from bms_image.common.disk_format import PLUGIN_PATHS, plugin_content
from bms_image.common.model import PluginKind
from support import chunk_store
from support.builders import new_ssh_key
from support.errors import decode
from support.fleet_events import (
    ACTIVE,
    ERROR,
    EVS,
    FAILED,
    LOCAL,
    NETWORK,
    STAGE_ACTIVE,
    stage_name,
)

pb = provisioning_pb2


@pytest.mark.parametrize("boot_source", [LOCAL, EVS])
async def test_corrupted_image_fails_every_server_with_data_loss(
    provisioning, images, as_project, settings, boot_source
) -> None:
    md = as_project("alpha")
    image, data = await prov.create_disk_image(images, md, bulk_bytes=256 * 1024)
    data_dir = Path(settings.data_dir)
    assert chunk_store.stored_bytes(data_dir, image.name) == data
    chunk_store.damage_bytes(data_dir, image.name, len(data) // 2)  # rot in the bulk data
    assert chunk_store.stored_bytes(data_dir, image.name) != data
    assert len(chunk_store.stored_bytes(data_dir, image.name)) == len(data)

    deployment = await prov.deploy(
        provisioning,
        md,
        prov.create_request(image.name, S4, 3, "rot", new_ssh_key().line, boot_source=boot_source),
    )
    assert len(deployment.servers) == 3
    for server_name in deployment.servers:
        stages = deployment.stages(server_name)
        names = [stage_name(s) for s in stages]
        assert STAGE_ACTIVE not in stages, names
        assert stages[-1] == FAILED, names
        final = deployment.final(server_name)
        assert final.state == ERROR
        assert final.error_code == "DATA_LOSS"
        assert final.error_reason == "IMAGE_DATA_DAMAGED"
        assert final.message
        assert [e for e in deployment.by_server[server_name] if e.stage == FAILED] == [final]
        server = await prov.get_server(provisioning, md, server_name)
        assert server.state == ERROR
        assert server.state_reason
        assert server.network_state != pb.NETWORK_STATE_UP
        assert not prov.server_dir(settings, server_name).exists()
        watched = await prov.watch(provisioning, md, server_name)
        assert watched[-1].stage == FAILED and watched[-1].state == ERROR
    # nothing unverified was kept for later deployments
    assert [p.name for p in prov.cache_dir(settings).iterdir()] == []
    states = {s.name: s.state for s in await prov.list_servers(provisioning, md)}
    assert states == dict.fromkeys(deployment.servers, ERROR)


async def test_image_without_network_config_comes_up_without_network(
    provisioning, images, as_project, settings
) -> None:
    md = as_project("alpha")
    image = await prov.image_without(images, md, NETWORK_CONFIG)
    deployment = await prov.deploy(provisioning, md, prov.create_request(image.name, S4, 2, "dark"))
    for server_name in deployment.servers:
        stages = deployment.stages(server_name)
        assert stages[-1] == STAGE_ACTIVE, [stage_name(s) for s in stages]
        assert NETWORK not in stages, "no network was configured"
        server = await prov.get_server(provisioning, md, server_name)
        assert server.state == ACTIVE
        assert server.network_state == pb.NETWORK_STATE_DOWN
        assert "bms-network-config" in server.state_reason
        assert "missing" in server.state_reason
        # Cloud-Init still ran
        assert prov.read_disk_file(settings, server_name, "etc/hostname") == (
            f"{server.host_name}\n".encode()
        )


async def test_altered_network_config_counts_as_broken(
    provisioning, images, as_project, settings
) -> None:
    """The plug-in check reads the disk: a file that claims the right release
    but is not byte for byte that release does not configure the network."""
    md = as_project("alpha")
    genuine = plugin_content(NETWORK_CONFIG)
    tampered = genuine[:-8] + b"tampered"
    image, _ = await prov.create_disk_image(
        images,
        md,
        plugins=(CLOUD_INIT, SDI_DRIVER),
        files={PLUGIN_PATHS[PluginKind.BMS_NETWORK_CONFIG]: tampered},
        declared=(CLOUD_INIT, NETWORK_CONFIG, SDI_DRIVER),
        display_name="tampered-network",
    )
    # the record claims the plug-in: only the disk tells the truth
    assert image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG in [p.kind for p in image.plugins]
    deployment = await prov.deploy(provisioning, md, prov.create_request(image.name, S4, 1, "odd"))
    (server_name,) = deployment.servers
    assert NETWORK not in deployment.stages(server_name)
    server = await prov.get_server(provisioning, md, server_name)
    assert server.state == ACTIVE
    assert server.network_state == pb.NETWORK_STATE_DOWN
    assert "bms-network-config" in server.state_reason and "modified" in server.state_reason


@pytest.mark.parametrize("boot_source", [LOCAL, EVS])
async def test_an_image_that_is_no_system_disk_fails_clearly(
    provisioning, images, as_project, settings, boot_source
) -> None:
    """Bytes anyone can prov.upload (here random ones) verify fine but boot
    nothing: the deployment fails FAILED_PRECONDITION IMAGE_NOT_BOOTABLE."""
    md = as_project("alpha")
    queued = await prov.create_queued(images, md, display_name="not-a-disk")
    active = await prov.upload(images, md, queued.name, bytes(range(256)) * 1024)
    assert active.status == image_pb2.IMAGE_STATUS_ACTIVE
    deployment = await prov.deploy(
        provisioning, md, prov.create_request(active.name, S4, 1, "junk", boot_source=boot_source)
    )
    (server_name,) = deployment.servers
    final = deployment.final(server_name)
    assert final.stage == FAILED and final.state == ERROR
    assert (final.error_code, final.error_reason) == ("FAILED_PRECONDITION", "IMAGE_NOT_BOOTABLE")
    assert active.name in final.message
    assert not prov.server_dir(settings, server_name).exists()


async def test_a_server_whose_disk_is_unreadable_cannot_be_captured(
    provisioning, images, as_project, settings
) -> None:
    md = as_project("alpha")
    deployment = await prov.deploy(provisioning, md, prov.create_request(boot_source=LOCAL))
    (server_name,) = deployment.servers
    await provisioning.StopServer(pb.StopServerRequest(name=server_name), metadata=md)
    prov.corrupt(prov.system_disk(settings, server_name).top, 0, b"garbage!")  # the partition table
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await images.CreateImage(
            image_pb2.CreateImageRequest(
                image=image_pb2.Image(display_name="from-a-broken-disk"),
                source_server=server_name,
            ),
            metadata=md,
        )
    rich = decode(refused.value)
    assert (rich.code, rich.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SERVER_DISK_UNREADABLE",
    )
    server = await prov.get_server(provisioning, md, server_name)
    assert server.task == "", "the refused capture does not hold the server"
