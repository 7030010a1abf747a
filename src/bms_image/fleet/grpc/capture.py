"""ServerCaptureService: the provisioner's side of captures asked for by an
ImageService in another process. Proto <-> domain, nothing more."""

from __future__ import annotations

from typing import Any

from bms.image.v1 import capture_pb2, capture_pb2_grpc
from bms_image.common.context import current_caller, current_token
from bms_image.common.convert import (
    capture_source_to_proto,
    image_id_from_name,
    server_id_from_name,
)
from bms_image.fleet.domain.fleet import Fleet

Context = Any


class CaptureServicer(capture_pb2_grpc.ServerCaptureServiceServicer):  # type: ignore[misc]
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def PrepareServerCapture(
        self, request: capture_pb2.PrepareServerCaptureRequest, context: Context
    ) -> capture_pb2.PrepareServerCaptureResponse:
        server_id = server_id_from_name(request.server, "server")
        source = await self._fleet.prepare_capture(current_caller(), current_token(), server_id)
        return capture_source_to_proto(source)

    async def StartServerCapture(
        self, request: capture_pb2.StartServerCaptureRequest, context: Context
    ) -> capture_pb2.StartServerCaptureResponse:
        server_id = server_id_from_name(request.server, "server")
        image_id = image_id_from_name(request.image, "image")
        await self._fleet.require_held(current_caller(), server_id)
        await self._fleet.start_capture(current_token(), server_id, image_id)
        return capture_pb2.StartServerCaptureResponse()

    async def ReleaseServerCapture(
        self, request: capture_pb2.ReleaseServerCaptureRequest, context: Context
    ) -> capture_pb2.ReleaseServerCaptureResponse:
        server_id = server_id_from_name(request.server, "server")
        await self._fleet.require_held(current_caller(), server_id)
        await self._fleet.release_capture(current_token(), server_id)
        return capture_pb2.ReleaseServerCaptureResponse()
