"""Chunk objects in an S3-compatible bucket: `<prefix>chunks/<ab>/<name>`,
beside the blobs of an S3BlobStore and through its client (one connection
pool, one error translation, one bucket to provision).

S3 needs no temporary objects: a PUT is atomic (the object appears whole or
not at all) and durable once it succeeds, so `put` is just one PUT per object,
several in flight at once. The two-hex-digit folder mirrors LocalChunkObjects'
layout, so a bucket can be browsed (or copied to disk) the same way."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

from bms_image.images.adapters.blobs.s3 import CHUNKS_SUB_PREFIX, S3BlobStore
from bms_image.images.adapters.blobs.store import BlobNotFound
from bms_image.images.adapters.chunks.objects import ChunkMissing


def _check_name(name: str) -> None:
    # The same rule as LocalChunkObjects, so that a name valid for one
    # backend is valid for the other.
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid chunk object name {name!r}")


def _object_name(name: str) -> str:
    """The object's name relative to the store's prefix."""
    _check_name(name)
    return f"{CHUNKS_SUB_PREFIX}{name[:2]}/{name}"


def _chunk_name(object_name: str) -> str | None:
    """The chunk object name of a listed object, None for an object that
    is not one (a folder marker, a misplaced or hidden object)."""
    folder, slash, name = object_name.removeprefix(CHUNKS_SUB_PREFIX).partition("/")
    if not slash or not name or "/" in name or name.startswith(".") or folder != name[:2]:
        return None
    return name


class S3ChunkObjects:
    """ChunkObjects in the bucket of an S3BlobStore, which must be open
    while this is used (its owner opens and closes it)."""

    name = "s3"

    def __init__(self, store: S3BlobStore, *, put_concurrency: int = 8) -> None:
        """`put_concurrency` PUTs of one `put` are in flight at once: enough
        to hide a request's latency (a 1 MiB PUT is mostly round trips), few
        enough that concurrent puts leave connections of the store's pool to
        downloads."""
        if put_concurrency < 1:
            raise ValueError(f"put_concurrency must be at least 1, not {put_concurrency}")
        self.store = store
        self.put_concurrency = put_concurrency
        #: Requests sent, by kind (PUT, GET, DELETE, LIST, HEAD), since this
        #: was created: the benchmark reports them per GiB stored.
        self.requests: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"S3ChunkObjects({self.store!r})"

    async def put(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Returns once every PUT succeeded. On a failure the PUTs still in
        flight are cancelled and the first error is raised (UNAVAILABLE,
        STORAGE_FULL, ...); the objects already stored stay, each whole."""
        pending = iter([(_object_name(name), data) for name, data in items])

        async def worker() -> None:
            # The workers share one iterator: each takes the next object as
            # soon as its previous PUT is done.
            for object_name, data in pending:
                await self.store.put_object(object_name, data, requests=self.requests)

        workers = [
            asyncio.create_task(worker()) for _ in range(min(self.put_concurrency, len(items)))
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise

    async def get(self, name: str) -> bytes:
        try:
            return await self.store.get_object(_object_name(name), requests=self.requests)
        except BlobNotFound:
            raise ChunkMissing(name) from None

    async def exists(self, name: str) -> bool:
        return await self.store.has_object(_object_name(name), requests=self.requests)

    async def delete(self, names: Sequence[str]) -> None:
        if names:
            await self.store.delete_objects(
                [_object_name(name) for name in names], requests=self.requests
            )

    async def names(self) -> list[str]:
        listed = await self.store.list_object_keys(CHUNKS_SUB_PREFIX, requests=self.requests)
        return sorted(name for name in map(_chunk_name, listed) if name is not None)

    async def ping(self) -> None:
        self.requests["HEAD"] += 1
        await self.store.ping()
