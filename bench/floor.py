"""The floor of the chunk store's upload: a grpc.aio server with the service's
own transport options that does, for an upload, the work the chunk store
cannot avoid and nothing else.

For each UploadImageData it computes the SHA-256 of the whole stream (and
checks it against the declared one), cuts the bytes into 1 MiB chunks,
names each by its BLAKE3 hash (package `blake3`, as the service does), and
writes each chunk to a file under `<root>/<first two hex digits>/<id>`:
batches of 32 chunks, each file written to a temporary name and fsynced,
then renamed into place, then each directory the batch touched fsynced once
(what bms_image's LocalChunkObjects does). Then it answers. No database,
no staging file, no authentication.

A batch is written in a worker thread while the next one arrives (at most
one batch in flight), so the transport is not stalled by the disk.

`/bench.floor.Floor/Clear` (bytes in, bytes out) removes what the uploads
wrote, so that the benchmark frees the disk between runs outside the
measured calls.

Run by `bench.chunks` in its own process:

    python -m bench.floor --listen 127.0.0.1:0 --root /tmp/floor-chunks
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from blake3 import blake3

from bms.image.v1 import image_pb2
from bms_image.common.config import Settings
from bms_image.common.eventloop import run_with
from bms_image.common.serving import server_options
from bms_image.images.adapters.chunks.chunking import Chunker

from .bare import SERVICE, tune_malloc

CHUNK_BYTES = 1024 * 1024
BATCH_CHUNKS = 32
CLEAR_METHOD = "/bench.floor.Floor/Clear"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_batch(root: Path, chunks: Sequence[bytes]) -> None:
    """BLAKE3 of each chunk, each written to a temporary file and fsynced,
    renamed under its id, every directory touched fsynced. Blocking."""
    directories: set[Path] = set()
    temps: list[tuple[Path, Path]] = []
    for data in chunks:
        name = blake3(data, max_threads=1).hexdigest()
        directory = root / name[:2]
        directory.mkdir(exist_ok=True)
        temp = directory / f".tmp-{uuid.uuid4().hex}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        temps.append((temp, directory / name))
    for temp, target in temps:
        os.replace(temp, target)
        directories.add(target.parent)
    for directory in directories:
        _fsync_directory(directory)


class FloorUpload:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    async def upload(
        self,
        requests: AsyncIterator[image_pb2.UploadImageDataRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> image_pb2.Image:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("payload") != "metadata":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "metadata first")
            raise AssertionError("unreachable")
        digest = hashlib.sha256()
        chunker = Chunker(CHUNK_BYTES)  # the service's: a 1 MiB message is a chunk, uncopied
        received = 0
        writing: asyncio.Future[None] | None = None

        async def flush(final: bool) -> None:
            nonlocal writing
            chunks = chunker.take(final)
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(asyncio.to_thread(write_batch, self.root, chunks))

        async for message in requests:
            chunk = message.chunk
            digest.update(chunk)
            received += len(chunk)
            chunker.add(chunk)
            if chunker.ready >= BATCH_CHUNKS:
                await flush(final=False)
        if chunker.buffered:
            await flush(final=True)
        if writing is not None:
            await writing
        sha256 = digest.hexdigest()
        if first.metadata.sha256 and sha256 != first.metadata.sha256:
            await context.abort(grpc.StatusCode.DATA_LOSS, "SHA-256 mismatch")
        return image_pb2.Image(name=first.metadata.name, size_bytes=received, sha256=sha256)

    async def clear(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        def remove() -> None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)

        await asyncio.to_thread(remove)
        return b""


def handlers(floor: FloorUpload) -> tuple[grpc.GenericRpcHandler, ...]:
    service, clear_method = CLEAR_METHOD.strip("/").split("/")
    return (
        grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "UploadImageData": grpc.stream_unary_rpc_method_handler(
                    floor.upload,
                    request_deserializer=image_pb2.UploadImageDataRequest.FromString,
                    response_serializer=image_pb2.Image.SerializeToString,
                )
            },
        ),
        grpc.method_handlers_generic_handler(
            service, {clear_method: grpc.unary_unary_rpc_method_handler(floor.clear)}
        ),
    )


async def serve(listen: str, root: Path) -> None:
    """Serves until SIGTERM or SIGINT; prints `floor listening on <host:port>`."""
    settings = Settings()
    server = grpc.aio.server(options=server_options(settings))
    server.add_generic_rpc_handlers(handlers(FloorUpload(root)))
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"floor listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    parser.add_argument("--root", type=Path, required=True, help="directory of the chunk files")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's default trimming (slower)"
    )
    args = parser.parse_args(argv)
    if not args.default_malloc:
        tune_malloc()  # the same rule as bench.bare
    run_with(Settings.from_env().event_loop, lambda: serve(args.listen, args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
