"""ProvisioningService: proto <-> domain, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import empty_pb2

from bms.image.v1 import provisioning_pb2, provisioning_pb2_grpc
from bms_image.common.context import current_caller, current_token
from bms_image.common.convert import (
    flavor_name_from_resource,
    image_id_from_name,
    server_id_from_name,
)
from bms_image.fleet.domain.flavors import FlavorDirectory
from bms_image.fleet.domain.fleet import Fleet
from bms_image.fleet.grpc.convert import (
    deploy_request_from_proto,
    event_to_proto,
    flavor_to_proto,
    server_to_proto,
)

Context = Any


class ProvisioningServicer(provisioning_pb2_grpc.ProvisioningServiceServicer):  # type: ignore[misc]
    def __init__(self, flavors: FlavorDirectory, fleet: Fleet) -> None:
        self._flavors = flavors
        self._fleet = fleet

    async def ListFlavors(
        self, request: provisioning_pb2.ListFlavorsRequest, context: Context
    ) -> provisioning_pb2.ListFlavorsResponse:
        flavors, next_token = await self._flavors.list(
            request.page_size, request.page_token, current_token()
        )
        return provisioning_pb2.ListFlavorsResponse(
            flavors=[flavor_to_proto(f) for f in flavors], next_page_token=next_token
        )

    async def GetFlavor(
        self, request: provisioning_pb2.GetFlavorRequest, context: Context
    ) -> provisioning_pb2.Flavor:
        flavor = await self._flavors.get(flavor_name_from_resource(request.name), current_token())
        return flavor_to_proto(flavor)

    async def CreateServers(
        self, request: provisioning_pb2.CreateServersRequest, context: Context
    ) -> AsyncIterator[provisioning_pb2.ServerEvent]:
        servers = await self._fleet.create_servers(
            current_caller(), current_token(), deploy_request_from_proto(request)
        )
        async for event in self._fleet.events.follow([s.id for s in servers]):
            yield event_to_proto(event)

    async def GetServer(
        self, request: provisioning_pb2.GetServerRequest, context: Context
    ) -> provisioning_pb2.Server:
        server = await self._fleet.get(current_caller(), server_id_from_name(request.name))
        return server_to_proto(server)

    async def ListServers(
        self, request: provisioning_pb2.ListServersRequest, context: Context
    ) -> provisioning_pb2.ListServersResponse:
        servers, next_token = await self._fleet.list_servers(
            current_caller(), request.page_size, request.page_token
        )
        return provisioning_pb2.ListServersResponse(
            servers=[server_to_proto(s) for s in servers], next_page_token=next_token
        )

    async def StartServer(
        self, request: provisioning_pb2.StartServerRequest, context: Context
    ) -> provisioning_pb2.Server:
        server = await self._fleet.start(current_caller(), server_id_from_name(request.name))
        return server_to_proto(server)

    async def StopServer(
        self, request: provisioning_pb2.StopServerRequest, context: Context
    ) -> provisioning_pb2.Server:
        server = await self._fleet.stop(current_caller(), server_id_from_name(request.name))
        return server_to_proto(server)

    async def DeleteServer(
        self, request: provisioning_pb2.DeleteServerRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._fleet.delete(current_caller(), server_id_from_name(request.name))
        return empty_pb2.Empty()

    async def ReinstallServer(
        self, request: provisioning_pb2.ReinstallServerRequest, context: Context
    ) -> AsyncIterator[provisioning_pb2.ServerEvent]:
        image_id = image_id_from_name(request.image, "image") if request.image else ""
        server = await self._fleet.reinstall(
            current_caller(),
            current_token(),
            server_id_from_name(request.name),
            image_id,
            request.ssh_public_key,
            request.user_data,
        )
        async for event in self._fleet.events.follow([server.id]):
            yield event_to_proto(event)

    async def InjectNetworkFault(
        self, request: provisioning_pb2.InjectNetworkFaultRequest, context: Context
    ) -> provisioning_pb2.Server:
        server = await self._fleet.inject_network_fault(
            current_caller(), server_id_from_name(request.name)
        )
        return server_to_proto(server)

    async def WatchServer(
        self, request: provisioning_pb2.WatchServerRequest, context: Context
    ) -> AsyncIterator[provisioning_pb2.ServerEvent]:
        server_id = server_id_from_name(request.name)
        async for event in self._fleet.watch(current_caller(), server_id):
            yield event_to_proto(event)
