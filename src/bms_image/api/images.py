"""ImageService: proto <-> domain, nothing more."""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2

from bms.image.v1 import image_pb2, image_pb2_grpc

from ..domain import rules
from ..domain.images import ImageCatalog
from ..domain.model import Caller, Image
from .context import current_caller
from .convert import changes_from_proto, image_id_from_name, image_to_proto, new_image_from_proto

Context = Any


class ImageServicer(image_pb2_grpc.ImageServiceServicer):  # type: ignore[misc]
    def __init__(self, catalog: ImageCatalog) -> None:
        self._catalog = catalog

    def _proto(self, caller: Caller, image: Image) -> image_pb2.Image:
        return image_to_proto(
            image, rules.image_type_for(caller, image), self._catalog.supported_flavors(image)
        )

    async def ListImages(
        self, request: image_pb2.ListImagesRequest, context: Context
    ) -> image_pb2.ListImagesResponse:
        caller = current_caller()
        images, next_token = await self._catalog.list(
            caller, request.filter, request.page_size, request.page_token
        )
        return image_pb2.ListImagesResponse(
            images=[self._proto(caller, image) for image in images], next_page_token=next_token
        )

    async def GetImage(
        self, request: image_pb2.GetImageRequest, context: Context
    ) -> image_pb2.Image:
        caller = current_caller()
        image = await self._catalog.get(caller, image_id_from_name(request.name))
        return self._proto(caller, image)

    async def CreateImage(
        self, request: image_pb2.CreateImageRequest, context: Context
    ) -> image_pb2.Image:
        caller = current_caller()
        image = await self._catalog.create(
            caller, new_image_from_proto(request.image), request.request_id
        )
        return self._proto(caller, image)

    async def UpdateImage(
        self, request: image_pb2.UpdateImageRequest, context: Context
    ) -> image_pb2.Image:
        caller = current_caller()
        image_id = image_id_from_name(request.image.name, "image.name")
        changes = changes_from_proto(request.image, list(request.update_mask.paths))
        image = await self._catalog.update(caller, image_id, changes, request.image.etag)
        return self._proto(caller, image)

    async def DeleteImage(
        self, request: image_pb2.DeleteImageRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._catalog.delete(current_caller(), image_id_from_name(request.name), request.etag)
        return empty_pb2.Empty()

    async def DeprecateImage(
        self, request: image_pb2.DeprecateImageRequest, context: Context
    ) -> image_pb2.Image:
        caller = current_caller()
        image = await self._catalog.deprecate(caller, image_id_from_name(request.name))
        return self._proto(caller, image)
