"""ImageService: proto <-> domain, nothing more."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import empty_pb2

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common import model
from bms_image.common.context import current_caller, current_token
from bms_image.common.convert import enum_from_proto, image_id_from_name, server_id_from_name
from bms_image.common.errors import invalid_field
from bms_image.common.model import Caller, Image
from bms_image.images.domain.imagedata import ImageData, UploadDeclaration
from bms_image.images.domain.images import ImageCatalog
from bms_image.images.grpc.convert import changes_from_proto, new_image_from_proto
from bms_image.images.grpc.rendering import RenderedImages

Context = Any


class ImageServicer(image_pb2_grpc.ImageServiceServicer):  # type: ignore[misc]
    def __init__(self, catalog: ImageCatalog, data: ImageData, rendered: RenderedImages) -> None:
        self._catalog = catalog
        self._data = data
        self._rendered = rendered

    def _proto(self, caller: Caller, image: Image) -> image_pb2.Image:
        return self._rendered.message(caller, image)

    async def ListImages(self, request: image_pb2.ListImagesRequest, context: Context) -> bytes:
        """Answers with the serialized response (see images.grpc.rendering)."""
        caller = current_caller()
        return await self._rendered.page(
            caller,
            functools.partial(
                self._catalog.list, caller, request.filter, request.page_size, request.page_token
            ),
        )

    async def GetImage(
        self, request: image_pb2.GetImageRequest, context: Context
    ) -> image_pb2.Image:
        caller = current_caller()
        image = await self._catalog.describe(caller, image_id_from_name(request.name))
        return self._proto(caller, image)

    async def CreateImage(
        self, request: image_pb2.CreateImageRequest, context: Context
    ) -> image_pb2.Image:
        caller = current_caller()
        source = (
            server_id_from_name(request.source_server, "source_server")
            if request.source_server
            else ""
        )
        image = await self._catalog.create(
            caller,
            new_image_from_proto(request.image),
            request.request_id,
            source,
            current_token(),
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

    async def UploadImageData(
        self, requests: AsyncIterator[image_pb2.UploadImageDataRequest], context: Context
    ) -> image_pb2.Image:
        caller = current_caller()
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise invalid_field("metadata", "the first message of an upload must carry metadata")
        meta = first.metadata
        declared = UploadDeclaration(
            offset=meta.offset,
            size_bytes=meta.size_bytes,
            sha256=meta.sha256,
            disk_format=enum_from_proto(model.DiskFormat, meta.disk_format, "metadata.disk_format"),
        )

        async def chunks() -> AsyncIterator[bytes]:
            async for message in requests:
                if message.WhichOneof("payload") != "chunk":
                    raise invalid_field("metadata", "only the first message may carry metadata")
                yield message.chunk

        image = await self._data.upload(
            caller, image_id_from_name(meta.name, "metadata.name"), declared, chunks()
        )
        return self._proto(caller, image)

    async def DownloadImageData(
        self, request: image_pb2.DownloadImageDataRequest, context: Context
    ) -> AsyncIterator[image_pb2.DownloadImageDataResponse]:
        image, chunks = await self._data.open_download(
            current_caller(), image_id_from_name(request.name), request.offset
        )
        offset, size = request.offset, image.size_bytes
        Response = image_pb2.DownloadImageDataResponse
        async for chunk in chunks:
            yield Response(offset=offset, chunk=chunk, size_bytes=size)
            offset += len(chunk)
        yield Response(offset=offset, size_bytes=size, sha256=image.sha256, last=True)
