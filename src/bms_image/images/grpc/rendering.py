"""Images as the caller sees them, serialized once and reused.

A console or scheduler pages through the same images all day. Building an
Image message and serializing it costs more than finding the image, so each
rendering is kept as bytes, under a key that covers everything those bytes
depend on:

- the image's id and revision (every change of an image bumps it);
- the type the caller sees (public, private to its owner, shared with others);
- the flavor catalog, which names the flavors of a private image's model.

A ListImages page is then the concatenation of its images' bytes, each
already framed as field 1 of ListImagesResponse, plus the page token: no
message is built on the way out. The memory is bounded by bytes, least
recently used first out."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import grpc

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.model import Caller, Image, ImageType
from bms_image.images.domain import rules
from bms_image.images.domain.images import ImageCatalog
from bms_image.images.domain.query import ListedImage
from bms_image.images.grpc.convert import image_to_proto

#: Default bound of the rendered images kept, in bytes (about 300 bytes an
#: image plus its key: 64 MiB holds some 100,000 renderings).
DEFAULT_RENDERED_BYTES = 64 * 1024 * 1024

_IMAGES_FIELD = b"\x0a"  # ListImagesResponse.images: field 1, length-delimited
_TOKEN_FIELD = b"\x12"  # ListImagesResponse.next_page_token: field 2

RenderKey = tuple[str, int, ImageType, int]
#: Lists a page: (named images, images read for those not known, next token).
PageFetch = Callable[
    [Callable[[ListedImage], bool] | None],
    Awaitable[tuple[list[ListedImage], list[Image], str]],
]
#: What an entry costs besides its bytes (its key, the dict slot, the bytes
#: object's header): counted against the limit.
_ENTRY_OVERHEAD = 256


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _framed(field: bytes, payload: bytes) -> bytes:
    return field + _varint(len(payload)) + payload


class RenderedImages:
    """Serialized Image messages by RenderKey, each framed as a
    ListImagesResponse entry, at most `limit_bytes` of them in all."""

    def __init__(self, catalog: ImageCatalog, limit_bytes: int = DEFAULT_RENDERED_BYTES) -> None:
        self._catalog = catalog
        self._limit = limit_bytes
        self._used = 0
        self._kept: OrderedDict[RenderKey, bytes] = OrderedDict()

    @property
    def kept_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._kept)

    def key(self, caller: Caller, image: Image | ListedImage) -> RenderKey:
        return (
            image.id,
            image.revision,
            rules.image_type_for(caller, image),
            self._catalog.flavors_fingerprint,
        )

    def entry(self, key: RenderKey) -> bytes | None:
        """The framed entry kept under key, if any."""
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
        return kept

    def render(self, caller: Caller, image: Image) -> tuple[RenderKey, bytes]:
        """The image's framed entry, rendered now unless kept."""
        key = self.key(caller, image)
        kept = self.entry(key)
        if kept is not None:
            return key, kept
        message = image_to_proto(image, key[2], self._catalog.supported_flavors(image))
        payload = message.SerializeToString()
        framed = _framed(_IMAGES_FIELD, payload)
        self._kept[key] = framed
        self._used += len(framed) + _ENTRY_OVERHEAD
        while self._used > self._limit and self._kept:
            _, dropped = self._kept.popitem(last=False)
            self._used -= len(dropped) + _ENTRY_OVERHEAD
        return key, framed

    def message(self, caller: Caller, image: Image) -> image_pb2.Image:
        """The image as a message (GetImage and the other single answers)."""
        _, framed = self.render(caller, image)
        return image_pb2.Image.FromString(framed[len(framed) - _payload_length(framed) :])

    def knows(self, caller: Caller, item: ListedImage) -> bool:
        """Whether the image is kept as the caller sees it. Only reads: the
        listing calls it from a database thread."""
        return self.key(caller, item) in self._kept

    async def page(self, caller: Caller, fetch: PageFetch) -> bytes:
        """A serialized ListImagesResponse. `fetch(known)` lists the page and
        reads, in the same unit of work, the images `known` says are not
        kept: so every image shown is one the listing admitted, as it was
        then. An entry evicted by other calls meanwhile sends the page back
        to a fetch that reads every image."""
        for known in (functools.partial(self.knows, caller), None):
            listed, read, next_page_token = await fetch(known)
            images = {image.id: image for image in read}
            parts: list[bytes] = []
            for item in listed:
                image = images.get(item.id)
                framed = (
                    self.render(caller, image)[1]
                    if image is not None
                    else self.entry(self.key(caller, item))
                )
                if framed is None:
                    break
                parts.append(framed)
            else:
                if next_page_token:
                    parts.append(_framed(_TOKEN_FIELD, next_page_token.encode()))
                return b"".join(parts)
        raise AssertionError("a fetch of every image left one out")


def _payload_length(framed: bytes) -> int:
    """The payload length a frame header names (after its one-byte tag)."""
    length, shift, index = 0, 0, 1
    while True:
        byte = framed[index]
        length |= (byte & 0x7F) << shift
        index += 1
        if byte < 0x80:
            return length
        shift += 7


def _list_response_bytes(response: bytes | image_pb2.ListImagesResponse) -> bytes:
    """ListImages answers with bytes already serialized (see RenderedImages.page)."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()


class _Registrar:
    """Takes what the generated add_ImageServiceServicer_to_server registers
    and registers it on the server with ListImages' serializer swapped."""

    def __init__(self, server: grpc.aio.Server, swaps: dict[str, Callable[..., bytes]]) -> None:
        self._server = server
        self._swaps = swaps

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Ignored: add_registered_method_handlers registers both kinds."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        swapped = {
            name: (
                handler._replace(response_serializer=self._swaps[name])
                if name in self._swaps
                else handler
            )
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, swapped),)
        )
        self._server.add_registered_method_handlers(service, swapped)


def add_image_service(
    servicer: image_pb2_grpc.ImageServiceServicer, server: grpc.aio.Server
) -> None:
    """add_ImageServiceServicer_to_server, except that ListImages may answer
    with the serialized response (bytes) as well as with a message."""
    image_pb2_grpc.add_ImageServiceServicer_to_server(
        servicer, _Registrar(server, {"ListImages": _list_response_bytes})
    )
