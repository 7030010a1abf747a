"""The chunk store's background work in a serving process: the collector's
sweeps, and the conversion of blobs stored whole by an earlier version."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from bms_image.images.adapters.chunks.store import ChunkStore

log = logging.getLogger(__name__)

#: Sweeps between two sweeps of orphan objects (which list the whole store).
ORPHAN_SWEEP_EVERY = 60


async def _sweeps(store: ChunkStore, seconds: float) -> None:
    sweep = 0
    while True:
        try:
            report = await store.collect_garbage(orphans=sweep % ORPHAN_SWEEP_EVERY == 0)
            if report.freed_chunks or report.orphan_objects or report.abandoned_puts:
                log.info(
                    "chunk store: freed %d chunks, %d orphan objects, %d abandoned puts",
                    report.freed_chunks,
                    report.orphan_objects,
                    report.abandoned_puts,
                )
        except Exception:  # a failed sweep (store unreachable) is retried at the next
            log.exception("chunk store: a garbage-collection sweep failed")
        sweep += 1
        await asyncio.sleep(seconds)


async def _conversion(store: ChunkStore) -> None:
    try:
        converted = await store.convert_legacy()
        if converted:
            log.info("chunk store: converted %d whole blobs into manifests", converted)
    except Exception:
        log.exception("chunk store: converting whole blobs failed; the next start goes on")


@contextlib.asynccontextmanager
async def housekeeping(store: ChunkStore, gc_seconds: float) -> AsyncIterator[None]:
    """Runs the sweeps (every gc_seconds; never with gc_seconds <= 0) and the
    conversion of whole blobs while the block runs; cancels them after."""
    tasks = [asyncio.create_task(_conversion(store), name="chunk-store-conversion")]
    if gc_seconds > 0:
        tasks.append(asyncio.create_task(_sweeps(store, gc_seconds), name="chunk-store-gc"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
