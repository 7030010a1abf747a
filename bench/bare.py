"""The bare baseline of the benchmarks: a minimal grpc.aio server with the
service's own transport options that moves bytes and messages and nothing else.

It answers UploadImageData (counts the bytes: no hashing, no disk) and
DownloadImageData (streams a deterministic payload from memory) under the
same method paths and with the same generated message types as the real
service, so one client drives both and the wire format is identical.

Run by `bench.dataplane` in its own process:

    python -m bench.bare --listen 127.0.0.1:0 --sizes 268435456,536870912

A download asks for `bare/<size>`; every size must be given with --sizes so
that the SHA-256 of its payload is computed before the server listens (the
real service keeps its digests in the database, so neither hashes while
streaming).

For `bench.metadata` it also answers the unary GetImage, CreateImage and
DeleteImage: they parse the request and echo a prebuilt Image, read from the
files given with --get-image and --create-image (serialized Images that the
real service returned, so the replies are byte for byte the same size), or
an Empty. No authentication, no database. It counts the calls it answered
and tells them through `/bench.bare.Stats/Counts` (JSON, no protobuf):

    python -m bench.bare --get-image get.bin --create-image create.bin
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import json
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from bms.image.v1 import image_pb2
from bms_image.common.config import Settings
from bms_image.common.eventloop import run_with
from bms_image.common.serving import server_options

#: The payload is this many pseudo-random bytes, repeated.
BLOCK_BYTES = 64 * 1024 * 1024
#: Fixed, so that every process generates the same payload.
SEED = 0x0B5_1AE6E
SERVICE = image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
NAME_PREFIX = "bare/"
#: The bare server's own method: JSON counts of the metadata calls answered.
STATS_METHOD = "/bench.bare.Stats/Counts"


def tune_malloc() -> bool:
    """Stops glibc from giving the top of the heap back to the kernel after
    every message and from mmap-ing each 1 MiB buffer afresh.

    With default settings a small process that streams 1 MiB messages grows
    and shrinks its heap by a few MiB per message: about 500 page faults per
    MiB streamed (first-touch zeroing, and on a VM the hypervisor's too),
    which doubles the CPU per byte. The real service does not show this (its
    larger heap has long-lived objects near the top: 0 to 100 faults per MiB),
    so a baseline with it would be slower than it needs to be and flatter our
    ratios. True when the settings took (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    trimmed = libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)
    mapped = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum
    return bool(trimmed and mapped)


def payload_block(block_bytes: int = BLOCK_BYTES, seed: int = SEED) -> bytes:
    """The block the payload repeats (random-ish, so nothing compresses it)."""
    return random.Random(seed).randbytes(block_bytes)


def iter_payload(block: bytes, size: int, chunk_bytes: int) -> Iterator[bytes]:
    """`size` bytes of `block` repeated, as chunks of at most `chunk_bytes`
    (one copy per chunk, as a read from a file would make)."""
    view = memoryview(block)
    offset = 0
    while offset < size:
        start = offset % len(block)
        length = min(chunk_bytes, size - offset, len(block) - start)
        yield bytes(view[start : start + length])
        offset += length


def payload_sha256(block: bytes, size: int) -> str:
    """SHA-256 (hex) of the `size`-byte payload."""
    digest = hashlib.sha256()
    view = memoryview(block)
    remaining = size
    while remaining:
        take = min(remaining, len(block))
        digest.update(view[:take])
        remaining -= take
    return digest.hexdigest()


class BareDataPlane:
    """The two data-plane methods with nothing but the transport behind them."""

    def __init__(self, block: bytes, chunk_bytes: int, digests: dict[int, str]) -> None:
        self._block = block
        self._chunk_bytes = chunk_bytes
        self._digests = digests

    async def upload(
        self,
        requests: AsyncIterator[image_pb2.UploadImageDataRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> image_pb2.Image:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("payload") != "metadata":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "metadata first")
            raise AssertionError("unreachable")
        received = 0
        async for message in requests:
            received += len(message.chunk)
        return image_pb2.Image(name=first.metadata.name, size_bytes=received)

    async def download(
        self,
        request: image_pb2.DownloadImageDataRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[image_pb2.DownloadImageDataResponse]:
        try:
            size = int(request.name.removeprefix(NAME_PREFIX))
            digest = self._digests[size]
        except (ValueError, KeyError):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"ask for {NAME_PREFIX}<size> of a --sizes size"
            )
            raise AssertionError("unreachable") from None
        Response = image_pb2.DownloadImageDataResponse
        offset = 0
        for chunk in iter_payload(self._block, size, self._chunk_bytes):
            yield Response(offset=offset, chunk=chunk, size_bytes=size)
            offset += len(chunk)
        yield Response(offset=offset, size_bytes=size, sha256=digest, last=True)


class BareMetadata:
    """GetImage, CreateImage and DeleteImage with nothing behind them: each
    parses its request (the transport's work) and echoes a prebuilt reply."""

    def __init__(self, get_reply: bytes, create_reply: bytes) -> None:
        self._get_reply = image_pb2.Image.FromString(get_reply)
        self._create_reply = image_pb2.Image.FromString(create_reply)
        self.counts: Counter[str] = Counter()

    async def get(
        self, request: image_pb2.GetImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> image_pb2.Image:
        if request.name != self._get_reply.name:  # proves the request arrived whole
            await context.abort(grpc.StatusCode.NOT_FOUND, f"only {self._get_reply.name}")
        self.counts["GetImage"] += 1
        return self._get_reply

    async def create(
        self, request: image_pb2.CreateImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> image_pb2.Image:
        if not request.image.display_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image.display_name")
        self.counts["CreateImage"] += 1
        return self._create_reply

    async def delete(
        self, request: image_pb2.DeleteImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name")
        self.counts["DeleteImage"] += 1
        return empty_pb2.Empty()

    async def stats(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return json.dumps(self.counts).encode()


def generic_handler(plane: BareDataPlane) -> grpc.GenericRpcHandler:
    """The bare methods under the real service's method paths."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "UploadImageData": grpc.stream_unary_rpc_method_handler(
                plane.upload,
                request_deserializer=image_pb2.UploadImageDataRequest.FromString,
                response_serializer=image_pb2.Image.SerializeToString,
            ),
            "DownloadImageData": grpc.unary_stream_rpc_method_handler(
                plane.download,
                request_deserializer=image_pb2.DownloadImageDataRequest.FromString,
                response_serializer=image_pb2.DownloadImageDataResponse.SerializeToString,
            ),
        },
    )


def metadata_handlers(metadata: BareMetadata) -> tuple[grpc.GenericRpcHandler, ...]:
    """The unary metadata methods under the real paths, and the stats method."""
    unary = grpc.unary_unary_rpc_method_handler
    service, stats_method = STATS_METHOD.strip("/").split("/")
    return (
        grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetImage": unary(
                    metadata.get,
                    request_deserializer=image_pb2.GetImageRequest.FromString,
                    response_serializer=image_pb2.Image.SerializeToString,
                ),
                "CreateImage": unary(
                    metadata.create,
                    request_deserializer=image_pb2.CreateImageRequest.FromString,
                    response_serializer=image_pb2.Image.SerializeToString,
                ),
                "DeleteImage": unary(
                    metadata.delete,
                    request_deserializer=image_pb2.DeleteImageRequest.FromString,
                    response_serializer=empty_pb2.Empty.SerializeToString,
                ),
            },
        ),
        grpc.method_handlers_generic_handler(service, {stats_method: unary(metadata.stats)}),
    )


async def serve(listen: str, sizes: list[int], metadata: BareMetadata | None = None) -> None:
    """Serves until SIGTERM or SIGINT; prints `bare listening on <host:port>`."""
    settings = Settings()
    block = payload_block() if sizes else b""  # no downloads: no 64 MiB block
    digests = {size: payload_sha256(block, size) for size in sizes}
    server = grpc.aio.server(options=server_options(settings))
    plane = BareDataPlane(block, settings.chunk_bytes, digests)
    server.add_generic_rpc_handlers((generic_handler(plane),))
    if metadata is not None:
        server.add_generic_rpc_handlers(metadata_handlers(metadata))
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"bare listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    parser.add_argument(
        "--sizes", default="", help="comma-separated payload sizes in bytes that can be downloaded"
    )
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's default trimming (slower)"
    )
    parser.add_argument("--get-image", type=Path, help="serialized Image that GetImage echoes")
    parser.add_argument(
        "--create-image", type=Path, help="serialized Image that CreateImage echoes"
    )
    args = parser.parse_args(argv)
    if not args.default_malloc:
        tune_malloc()
    sizes = [int(size) for size in args.sizes.split(",") if size]
    metadata = None
    if args.get_image or args.create_image:
        if not (args.get_image and args.create_image):
            parser.error("--get-image and --create-image go together")
        metadata = BareMetadata(args.get_image.read_bytes(), args.create_image.read_bytes())
    # The service's event loop (BMS_IMAGE_EVENT_LOOP), so that only what the
    # service does on top of moving messages differs.
    run_with(Settings.from_env().event_loop, lambda: serve(args.listen, sizes, metadata))
    return 0


if __name__ == "__main__":
    sys.exit(main())
