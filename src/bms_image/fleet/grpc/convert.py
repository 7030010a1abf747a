"""Proto messages <-> domain objects of the fleet's servicers
(ProvisioningService, ServerCaptureService)."""

from __future__ import annotations

from bms.image.v1 import provisioning_pb2
from bms_image.common import model
from bms_image.common.convert import (
    ENUMS,
    flavor_name_from_resource,
    image_id_from_name,
    timestamp_to_proto,
)
from bms_image.fleet.domain import servers

#: The shared enums and the fleet's own.
FLEET_ENUMS = ENUMS.extended(
    {
        servers.ServerState: (provisioning_pb2.ServerState, "SERVER_STATE_"),
        servers.NetworkState: (provisioning_pb2.NetworkState, "NETWORK_STATE_"),
        servers.BootSource: (provisioning_pb2.BootSource, "BOOT_SOURCE_"),
        servers.ProvisioningStage: (provisioning_pb2.ProvisioningStage, "PROVISIONING_STAGE_"),
    }
)
enum_to_proto = FLEET_ENUMS.to_proto
enum_from_proto = FLEET_ENUMS.from_proto


def flavor_to_proto(flavor: model.Flavor) -> provisioning_pb2.Flavor:
    return provisioning_pb2.Flavor(
        name=f"flavors/{flavor.name}",
        hardware_model=flavor.hardware_model,
        cpu_cores=flavor.cpu_cores,
        cpu_model=flavor.cpu_model,
        memory_gib=flavor.memory_gib,
        local_disks=flavor.local_disks,
        local_disk_gb=flavor.local_disk_gb,
        evs_boot=flavor.evs_boot,
        public_images=[f"images/{image_id}" for image_id in flavor.public_image_ids],
        description=flavor.description,
    )


def server_to_proto(server: servers.Server) -> provisioning_pb2.Server:
    return provisioning_pb2.Server(
        name=f"servers/{server.id}",
        host_name=server.host_name,
        project=server.project,
        flavor=f"flavors/{server.flavor}",
        hardware_model=server.hardware_model,
        image=f"images/{server.image_id}",
        state=enum_to_proto(server.state),  # type: ignore[arg-type]
        state_reason=server.state_reason,
        network_state=enum_to_proto(server.network_state),  # type: ignore[arg-type]
        boot_source=enum_to_proto(server.boot_source),  # type: ignore[arg-type]
        system_disk_bytes=server.system_disk_bytes,
        ssh_key_fingerprint=server.ssh_key_fingerprint,
        data_disks_gb=server.data_disks_gb,
        task=server.task,
        create_time=timestamp_to_proto(server.create_time),
        update_time=timestamp_to_proto(server.update_time),
    )


def event_to_proto(event: servers.ServerEvent) -> provisioning_pb2.ServerEvent:
    return provisioning_pb2.ServerEvent(
        server=f"servers/{event.server_id}",
        stage=enum_to_proto(event.stage),  # type: ignore[arg-type]
        bytes_done=event.bytes_done,
        bytes_total=event.bytes_total,
        percent=event.percent,
        boot_source=enum_to_proto(event.boot_source),  # type: ignore[arg-type]
        state=enum_to_proto(event.state),  # type: ignore[arg-type]
        error_code=event.error_code,
        error_reason=event.error_reason,
        message=event.message,
        time=timestamp_to_proto(event.time),
    )


def deploy_request_from_proto(
    message: provisioning_pb2.CreateServersRequest,
) -> servers.DeployRequest:
    return servers.DeployRequest(
        flavor=flavor_name_from_resource(message.flavor, "flavor"),
        image_id=image_id_from_name(message.image, "image"),
        count=message.count,
        name_prefix=message.name_prefix,
        ssh_public_key=message.ssh_public_key,
        user_data=message.user_data,
        boot_source=enum_from_proto(servers.BootSource, message.boot_source, "boot_source")
        or servers.BootSource.UNSPECIFIED,
        data_disks_gb=list(message.data_disks_gb),
    )
