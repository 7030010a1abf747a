"""Captures by a provisioner in another process: the image service's
CaptureProvider over ServerCaptureService, acting with the caller's token
and presenting the image service's own service credential (the provisioner
refuses ServerCaptureService calls without it)."""

from __future__ import annotations

from typing import Any

import grpc

from bms.image.v1 import capture_pb2, capture_pb2_grpc
from bms_image.common.auth import ServiceCredential
from bms_image.common.convert import capture_source_from_proto
from bms_image.common.model import Caller, CaptureSource
from bms_image.common.remote import bearer, domain_error

#: A capture's preparation reads the disk; far less than this in practice.
CALL_TIMEOUT_SECONDS = 60.0


class RemoteCaptures:
    def __init__(self, channel: grpc.aio.Channel, credential: ServiceCredential) -> None:
        self._stub = capture_pb2_grpc.ServerCaptureServiceStub(channel)
        self._credential = credential

    async def prepare_capture(self, caller: Caller, token: str, server_id: str) -> CaptureSource:
        request = capture_pb2.PrepareServerCaptureRequest(server=f"servers/{server_id}")
        answer = await self._call(self._stub.PrepareServerCapture, request, token)
        return capture_source_from_proto(server_id, answer)

    async def start_capture(self, token: str, server_id: str, image_id: str) -> None:
        request = capture_pb2.StartServerCaptureRequest(
            server=f"servers/{server_id}", image=f"images/{image_id}"
        )
        await self._call(self._stub.StartServerCapture, request, token)

    async def release_capture(self, token: str, server_id: str) -> None:
        request = capture_pb2.ReleaseServerCaptureRequest(server=f"servers/{server_id}")
        await self._call(self._stub.ReleaseServerCapture, request, token)

    async def _call(self, method: Any, request: object, token: str) -> Any:
        try:
            return await method(
                request,
                metadata=(bearer(token), self._credential.metadata()),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error(error, "provisioner") from None
