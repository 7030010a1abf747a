"""Scenario 5, the provisioner as its own process: `bms-image serve
--provisioner none` and `bms-image provisioner --image-service ...` run as
real processes sharing one data directory. Servers are deployed through the
provisioner's port, which fetches images from the image service with the
caller's own token; the image service's port has no ProvisioningService;
CreateImage on the image service captures a server of the provisioner
through its ServerCaptureService. Both stop cleanly on SIGTERM."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from scenario_support import CENTOS, create_request, disk_spec, new_ssh_key

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2_grpc
from bms_image.common import disk_format as disks
from support.builders import private_image
from support.disks import cache_dir, server_dir, system_disk, write_disk_file
from support.errors import Code
from support.errors import expect_error_sync as expect_error
from support.fleet_events import ACTIVE, STAGE_ACTIVE, Events, pb
from support.processes import ServerProcess
from support.tokens import bearer

pytestmark = pytest.mark.e2e

IMAGE_SERVICE = "bms.image.v1.ImageService"
PROVISIONING_SERVICE = "bms.image.v1.ProvisioningService"
SETTINGS = {"catalog_image_mib": "1", "shutdown_grace_seconds": "2"}


def listed_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names: set[str] = set()
    for response in responses:
        names.update(s.name for s in response.list_services_response.service)
    return names


def upload_private_image(images: image_pb2_grpc.ImageServiceStub, md: Any) -> image_pb2.Image:
    """A small private CentOS image of model s4-2288h-v5, uploaded by `md`."""
    with tempfile.TemporaryDirectory() as directory:
        path = write_disk_file(Path(directory) / "beta.disk", disk_spec(seed="beta"))
        data = path.read_bytes()
    created = images.CreateImage(
        image_pb2.CreateImageRequest(
            image=private_image(
                "beta-golden",
                plugins=[
                    image_pb2.Plugin(kind=image_pb2.PLUGIN_KIND_CLOUD_INIT, version="0.7.9"),
                    image_pb2.Plugin(
                        kind=image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG, version="2.1.3"
                    ),
                ],
            )
        ),
        metadata=md,
        timeout=10,
    )
    messages = [
        image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(
                name=created.name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
        ),
        image_pb2.UploadImageDataRequest(chunk=data),
    ]
    active: image_pb2.Image = images.UploadImageData(iter(messages), metadata=md, timeout=30)
    assert active.status == image_pb2.IMAGE_STATUS_ACTIVE, active
    return active


def test_provisioner_process_deploys_through_the_image_service_process(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    provisioner = ServerProcess(data_dir, "provisioner", **SETTINGS)
    fleet_address = provisioner.address
    serve = ServerProcess(
        data_dir, "serve", "--provisioner", "none", "--provisioner-address", fleet_address,
        **SETTINGS,
    )  # fmt: skip
    image_address = serve.address
    provisioner.command += ["--image-service", image_address]
    for process in (serve, provisioner):  # killed at teardown if still running
        request.addfinalizer(process.kill)
    serve.start()
    provisioner.start()

    alpha = bearer(serve.token("alpha"))
    beta = bearer(serve.token("beta"))
    key = new_ssh_key()

    with (
        grpc.insecure_channel(image_address) as image_channel,
        grpc.insecure_channel(fleet_address) as fleet_channel,
    ):
        images = image_pb2_grpc.ImageServiceStub(image_channel)
        fleet = provisioning_pb2_grpc.ProvisioningServiceStub(fleet_channel)

        # each port offers exactly its own service
        on_image_port = listed_services(image_channel)
        assert IMAGE_SERVICE in on_image_port, on_image_port
        assert PROVISIONING_SERVICE not in on_image_port, on_image_port
        on_fleet_port = listed_services(fleet_channel)
        assert PROVISIONING_SERVICE in on_fleet_port, on_fleet_port
        assert IMAGE_SERVICE not in on_fleet_port, on_fleet_port
        wrong_port = provisioning_pb2_grpc.ProvisioningServiceStub(image_channel)
        try:
            wrong_port.ListFlavors(pb.ListFlavorsRequest(), metadata=alpha, timeout=10)
        except grpc.RpcError as error:
            assert error.code() == Code.UNIMPLEMENTED, error
        else:
            raise AssertionError("the image service's port answered ProvisioningService")

        # two servers through the provisioner, followed to ACTIVE
        stream = fleet.CreateServers(
            create_request(CENTOS, 2, "remote", key.line), metadata=alpha, timeout=60
        )
        events = Events(list(stream))
        assert len(events.servers) == 2, events.servers
        for name in events.servers:
            assert events.final(name).stage == STAGE_ACTIVE, events.describe(name)
            server = fleet.GetServer(pb.GetServerRequest(name=name), metadata=alpha, timeout=10)
            assert server.state == ACTIVE, server
            assert server.project == "alpha"
            assert server.image == CENTOS
            assert server.ssh_key_fingerprint == key.fingerprint
            disk = system_disk(data_dir, name)
            assert server_dir(data_dir, name).is_dir()
            assert disks.read_file(disk, "etc/hostname") == f"{server.host_name}\n".encode()
            assert disks.read_file(disk, "root/.ssh/authorized_keys") == key.line.encode() + b"\n"
        assert sorted(
            fleet.GetServer(pb.GetServerRequest(name=n), metadata=alpha).host_name
            for n in events.servers
        ) == ["remote-1", "remote-2"]
        centos = images.GetImage(image_pb2.GetImageRequest(name=CENTOS), metadata=alpha)
        assert [p.name for p in cache_dir(data_dir).glob("*.raw")] == [f"{centos.sha256}.raw"]

        # a private image of beta's: alpha's token is passed on, so NOT_FOUND
        private = upload_private_image(images, beta)
        expect_error(
            lambda: list(
                fleet.CreateServers(create_request(private.name, 1, "thief"), metadata=alpha,
                                    timeout=30)
            ),
            Code.NOT_FOUND,
        )  # fmt: skip
        expect_error(
            lambda: images.GetImage(
                image_pb2.GetImageRequest(name=private.name), metadata=alpha, timeout=10
            ),
            Code.NOT_FOUND,
        )
        listing = fleet.ListServers(pb.ListServersRequest(), metadata=alpha, timeout=10)
        assert sorted(s.name for s in listing.servers) == sorted(events.servers)
        # while beta, its owner, deploys it through the same provisioner
        owned = Events(
            list(
                fleet.CreateServers(
                    create_request(private.name, 1, "owner"), metadata=beta, timeout=60
                )
            )
        )
        (beta_server,) = owned.servers
        final = owned.final(beta_server)
        assert final.stage == STAGE_ACTIVE, owned.describe(beta_server)
        expect_error(
            lambda: fleet.GetServer(pb.GetServerRequest(name=beta_server), metadata=alpha,
                                    timeout=10),
            Code.NOT_FOUND,
        )  # fmt: skip

        capture_through_the_provisioner(images, fleet, alpha, events.servers[0])

    assert provisioner.terminate()[0] == 0, provisioner.output()
    assert serve.terminate()[0] == 0, serve.output()


def capture_through_the_provisioner(
    images: image_pb2_grpc.ImageServiceStub,
    fleet: provisioning_pb2_grpc.ProvisioningServiceStub,
    md: Any,
    server_name: str,
) -> None:
    """CreateImage on the image service's port captures a server of the
    provisioner process (ServerCaptureService, with the caller's token);
    its refusals keep their code and reason; the image deploys."""
    running = expect_error(
        lambda: images.CreateImage(
            image_pb2.CreateImageRequest(
                image=image_pb2.Image(display_name="too-early"), source_server=server_name
            ),
            metadata=md,
            timeout=30,
        ),
        Code.FAILED_PRECONDITION,
    )
    assert running.reason == "SERVER_NOT_STOPPED", running.message
    fleet.StopServer(pb.StopServerRequest(name=server_name), metadata=md, timeout=10)
    created = images.CreateImage(
        image_pb2.CreateImageRequest(
            image=image_pb2.Image(display_name="remote-capture"), source_server=server_name
        ),
        metadata=md,
        timeout=30,
    )
    assert created.source_server == server_name
    assert created.hardware_model == "s4-2288h-v5" and created.os_distro == "centos"
    assert created.partitions, "the layout came from the provisioner's disk"
    deadline = time.monotonic() + 60
    image = created
    while image.status != image_pb2.IMAGE_STATUS_ACTIVE:
        assert image.status in (image_pb2.IMAGE_STATUS_QUEUED, image_pb2.IMAGE_STATUS_SAVING), image
        assert time.monotonic() < deadline, f"capture did not finish: {image}"
        time.sleep(0.1)
        image = images.GetImage(image_pb2.GetImageRequest(name=created.name), metadata=md)
    released = fleet.StartServer(pb.StartServerRequest(name=server_name), metadata=md, timeout=10)
    assert released.state == ACTIVE, "the server is let go once the capture ends"
    clone = Events(
        list(fleet.CreateServers(create_request(image.name, 1, "clone"), metadata=md, timeout=60))
    )
    (clone_name,) = clone.servers
    assert clone.final(clone_name).stage == STAGE_ACTIVE, clone.describe(clone_name)
