"""ProvisioningService: the flavor part."""

from __future__ import annotations

from typing import Any

from bms.image.v1 import provisioning_pb2, provisioning_pb2_grpc

from ..domain.flavors import FlavorDirectory
from .convert import flavor_name_from_resource, flavor_to_proto

Context = Any


class ProvisioningServicer(provisioning_pb2_grpc.ProvisioningServiceServicer):  # type: ignore[misc]
    def __init__(self, flavors: FlavorDirectory) -> None:
        self._flavors = flavors

    async def ListFlavors(
        self, request: provisioning_pb2.ListFlavorsRequest, context: Context
    ) -> provisioning_pb2.ListFlavorsResponse:
        flavors, next_token = await self._flavors.list(request.page_size, request.page_token)
        return provisioning_pb2.ListFlavorsResponse(
            flavors=[flavor_to_proto(f) for f in flavors], next_page_token=next_token
        )

    async def GetFlavor(
        self, request: provisioning_pb2.GetFlavorRequest, context: Context
    ) -> provisioning_pb2.Flavor:
        flavor = await self._flavors.get(flavor_name_from_resource(request.name))
        return flavor_to_proto(flavor)
