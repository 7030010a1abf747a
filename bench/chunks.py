"""`make bench` (chunk store): what the deduplicating chunk store of bms-image
stores and what it costs, in one run.

It starts, each in its own process pinned to the server cores (the client,
this process, on its own core, as in bench.dataplane):

- ours: `<venv>/bin/bms-image serve` on a temporary data directory (local
  chunk objects, SQLite), with its Prometheus endpoint
  (`BMS_IMAGE_METRICS_LISTEN`) and a collector sweeping every second;
- floor: `bench.floor`, the work an upload into a chunk store cannot avoid
  (SHA-256 of the stream, BLAKE3 of each 1 MiB chunk, each chunk written to
  a file, fsynced per batch of 32 and renamed into place) and no more;
- bare: `bench.bare`, which only counts uploaded bytes and streams
  downloads from memory.

Then, with the same client code against all of them:

1. fresh uploads of a random `--size` image (bytes the store has never
   seen: each run's chunks differ), ours, floor and bare interleaved; MB/s
   and server CPU seconds per GiB (from /proc);
2. the base image (random, os.urandom: never a zero chunk, which the store
   would not keep) uploaded once, then its bytes again as a new image of
   another project: the new bytes stored, read from the service's
   `bms_image_store_stored_bytes` (chunks plus its estimate of the records);
3. downloads of the base, ours against bare, every download's SHA-256
   checked (ours: against the SHA-256 of the bytes sent);
4. `--variants` images, each the base with ~1 % of its chunks (10 of 1,024)
   replaced at random aligned positions, uploaded as new images in four
   projects: the bytes stored for the base and its variants, against the
   base's size; one variant downloaded and checked;
5. with the S3 backend (`BMS_IMAGE_BLOB_BACKEND=s3`) against a moto server
   started here: the requests to the chunks' backend per GiB uploaded and
   downloaded, from `bms_image_store_requests_total{kind}` (and, to compare,
   what moto's access log shows). If the chunks do not go to S3 (the
   service keeps them on local disk with that backend), the part is skipped
   with the reason.

It prints one table and writes every figure to .bench/chunks.json. A missed
target is reported as MISSED and still exits 0; anything that breaks (a
server that does not start, a wrong digest, an RPC error) exits 1.

    python -m bench.chunks            # 1 GiB base, 20 variants, 3 runs, S3 1 GiB
    python -m bench.chunks --quick    # 256 MiB base, 5 variants, 2 runs, S3 256 MiB
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import os
import random
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.config import Settings

from .bare import NAME_PREFIX, payload_block, payload_sha256, tune_malloc
from .dataplane import (
    BIN,
    CLIENT_OPTIONS,
    GIB,
    MIB,
    ROOT,
    BenchError,
    Metadata,
    ServerProcess,
    Target,
    Transfer,
    _interruptible,
    cpu_seconds,
    hardware_model,
    issue_token,
    launch,
    machine,
    own_cpu_seconds,
    place,
    publish,
    server_env,
    wait_listening,
)
from .floor import CLEAR_METHOD
from .metadata import free_port, scrape

RESULTS = ROOT / ".bench" / "chunks.json"
STORE_CHUNK = 1024 * 1024
WARMUP_BYTES = 8 * MIB
#: ~1 % of a variant's chunks are its own (10 of 1,024).
VARIANT_SHARE = 10 / 1024
PROJECTS = ("bench", "bench-b", "bench-c", "bench-d")
REUPLOAD_TARGET_BYTES = MIB
STORED_TARGET = 1.5  # x the base's size, for the base and its variants
CPU_TARGET = 1.15  # ours / floor
UPLOAD_TARGET = 0.20  # ours / bare
DOWNLOAD_TARGET = 0.80  # ours / bare
GC_TIMEOUT = 120.0
S3_BUCKET = "bms-bench"
S3_KEY = "bench-access-key"
S3_SECRET = "bench-secret-key"


# -- what is uploaded ------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """`size` bytes of the base, with whole chunks replaced (a variant) or
    each chunk's first 16 bytes replaced by (salt, index) (fresh bytes: no
    chunk the store has seen)."""

    base: bytes
    size: int
    salt: int | None = None
    replaced: dict[int, bytes] = field(default_factory=dict)

    def chunks(self) -> Iterator[bytes]:
        """The bytes, one store chunk (1 MiB, one message) at a time; one
        copy each, as a read from a file would make."""
        view = memoryview(self.base)
        for index, start in enumerate(range(0, self.size, STORE_CHUNK)):
            end = min(start + STORE_CHUNK, self.size)
            if index in self.replaced:
                yield self.replaced[index]
            elif self.salt is not None:
                yield struct.pack(">QQ", self.salt, index) + view[start + 16 : end]
            else:
                yield bytes(view[start:end])

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()


def random_base(size: int) -> bytes:
    """`size` random bytes (os.urandom, in 64 MiB blocks)."""
    blocks = [os.urandom(min(64 * MIB, size - start)) for start in range(0, size, 64 * MIB)]
    base = b"".join(blocks)
    zero = bytes(STORE_CHUNK)
    if any(
        base[i : i + STORE_CHUNK] == zero[: min(STORE_CHUNK, size - i)]
        for i in range(0, size, STORE_CHUNK)
    ):
        raise BenchError("a random chunk came out all zeros")
    return base


def variant(base: bytes, size: int, number: int) -> Payload:
    """The base with ~1 % of its chunks replaced at random aligned positions."""
    chunks = -(-size // STORE_CHUNK)
    count = max(1, round(chunks * VARIANT_SHARE))
    positions = random.Random(number).sample(range(chunks), count)
    replaced = {
        index: os.urandom(min(STORE_CHUNK, size - index * STORE_CHUNK)) for index in positions
    }
    return Payload(base, size, replaced=replaced)


# -- calls -------------------------------------------------------------------------


async def create_image(target: Target, model: str, label: str) -> str:
    image = await target.stub.CreateImage(
        image_pb2.CreateImageRequest(
            image=image_pb2.Image(
                display_name=f"bench-{label}",
                description="chunk-store benchmark",
                os_type=image_pb2.OS_TYPE_LINUX,
                os_distro="ubuntu",
                os_version="22.04",
                architecture=image_pb2.ARCHITECTURE_X86_64,
                hardware_model=model,
            ),
            request_id=str(uuid.uuid4()),
        ),
        metadata=target.metadata,
    )
    target.images.append(image.name)
    return str(image.name)


async def upload(target: Target, name: str, payload: Payload, digest: str) -> Transfer:
    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(
                name=name,
                size_bytes=payload.size,
                sha256=digest,
                disk_format=image_pb2.DISK_FORMAT_RAW,
            )
        )
        for chunk in payload.chunks():
            yield image_pb2.UploadImageDataRequest(chunk=chunk)
        sent.append(time.perf_counter())

    sent: list[float] = []
    cpu, client_cpu = cpu_seconds(target.server.pid), own_cpu_seconds()
    started = time.perf_counter()
    reply = await target.stub.UploadImageData(requests(), metadata=target.metadata)
    finished = time.perf_counter()
    cpu, client_cpu = cpu_seconds(target.server.pid) - cpu, own_cpu_seconds() - client_cpu
    if reply.size_bytes != payload.size:
        raise BenchError(
            f"{target.label}: uploaded {payload.size} bytes, the server says {reply.size_bytes}"
        )
    if target.label != "bare" and reply.sha256 != digest:
        raise BenchError(f"{target.label}: stored SHA-256 {reply.sha256}, sent {digest}")
    tail = finished - sent[-1] if sent else 0.0
    return Transfer(finished - started, payload.size, cpu, client_cpu, tail)


async def download(target: Target, name: str, size: int, expected: str | None) -> Transfer:
    """Downloads, hashing what arrives: it must match the last message's
    SHA-256 and, when given, `expected` (the SHA-256 of what was uploaded)."""
    digest = hashlib.sha256()
    received = 0
    last: image_pb2.DownloadImageDataResponse | None = None
    cpu, client_cpu = cpu_seconds(target.server.pid), own_cpu_seconds()
    started = time.perf_counter()
    call = target.stub.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=name), metadata=target.metadata
    )
    async for message in call:
        if last is not None:
            raise BenchError(f"{target.label}: a message arrived after the last one")
        if message.last:
            last = message
            continue
        if message.offset != received:
            raise BenchError(f"{target.label}: chunk at {message.offset}, expected {received}")
        digest.update(message.chunk)
        received += len(message.chunk)
    seconds = time.perf_counter() - started
    cpu, client_cpu = cpu_seconds(target.server.pid) - cpu, own_cpu_seconds() - client_cpu
    if last is None:
        raise BenchError(f"{target.label}: the download of {name} ended without a last message")
    if received != size or last.size_bytes != size:
        raise BenchError(f"{target.label}: received {received} of {size} bytes of {name}")
    got = digest.hexdigest()
    if last.sha256 != got:
        raise BenchError(f"{target.label}: {name} hashes to {got}, the server says {last.sha256}")
    if expected is not None and got != expected:
        raise BenchError(f"{target.label}: {name} hashes to {got}, uploaded {expected}")
    return Transfer(seconds, size, cpu, client_cpu)


async def delete_images(target: Target) -> None:
    while target.images:
        await target.stub.DeleteImage(
            image_pb2.DeleteImageRequest(name=target.images.pop()), metadata=target.metadata
        )


async def clear_floor(channel: grpc.aio.Channel) -> None:
    await channel.unary_unary(CLEAR_METHOD)(b"", timeout=120)


def describe(label: str, what: str, transfer: Transfer) -> str:
    return (
        f"  {what} {label:5}: {transfer.mb_per_s:7.1f} MB/s ({transfer.seconds:.2f} s, "
        f"{transfer.tail_seconds:.2f} s after the last chunk; CPU server "
        f"{transfer.server_cpu_seconds:.2f} s, client {transfer.client_cpu_seconds:.2f} s)"
    )


# -- the service's own figures -------------------------------------------------


@dataclass(frozen=True)
class StoreSnapshot:
    """The chunk store as ours' Prometheus endpoint shows it."""

    logical_bytes: int
    stored_bytes: int
    chunks: int
    unreferenced_chunks: int
    dedup_ratio: float
    requests: dict[str, int]


def parse_store(text: str) -> StoreSnapshot:
    gauges: dict[str, float] = {}
    requests: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bms_image_store_requests_total":
                requests[sample.labels["kind"]] = int(sample.value)
            elif sample.name.startswith("bms_image_store_"):
                gauges[sample.name] = sample.value
    wanted = (
        "bms_image_store_logical_bytes",
        "bms_image_store_stored_bytes",
        "bms_image_store_chunks",
        "bms_image_store_unreferenced_chunks",
        "bms_image_store_dedup_ratio",
    )
    missing = [name for name in wanted if name not in gauges]
    if missing:
        raise BenchError(f"ours: the metrics endpoint has no {', '.join(missing)}")
    return StoreSnapshot(
        logical_bytes=int(gauges["bms_image_store_logical_bytes"]),
        stored_bytes=int(gauges["bms_image_store_stored_bytes"]),
        chunks=int(gauges["bms_image_store_chunks"]),
        unreferenced_chunks=int(gauges["bms_image_store_unreferenced_chunks"]),
        dedup_ratio=float(gauges["bms_image_store_dedup_ratio"]),
        requests=requests,
    )


async def snapshot(metrics_port: int) -> StoreSnapshot:
    return parse_store(await asyncio.to_thread(scrape, metrics_port))


async def collected(metrics_port: int) -> StoreSnapshot:
    """Waits for the collector to free every unreferenced chunk."""
    deadline = time.monotonic() + GC_TIMEOUT
    while True:
        found = await snapshot(metrics_port)
        if found.unreferenced_chunks == 0:
            return found
        if time.monotonic() > deadline:
            raise BenchError(
                f"ours: {found.unreferenced_chunks} chunks still unreferenced after "
                f"{GC_TIMEOUT:.0f} s (is the collector running?)"
            )
        await asyncio.sleep(0.5)


# -- moto's access log ----------------------------------------------------------

_LOG_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+')


def moto_requests(log: Path, bucket: str) -> Counter[str]:
    """The requests moto logged (werkzeug prints one line each), by kind:
    PUT, GET (objects), HEAD, LIST, DELETE (batches), other."""
    counts: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        match = _LOG_LINE.search(line)
        if match is None:
            continue
        method, path = match["method"], match["path"]
        resource, _, query = path.partition("?")
        key = resource.lstrip("/").removeprefix(bucket).lstrip("/")
        if method == "POST" and "delete" in query:
            counts["DELETE"] += 1
        elif method == "DELETE":
            counts["DELETE"] += 1
        elif method == "HEAD":
            counts["HEAD"] += 1
        elif method == "GET" and not key:
            counts["LIST"] += 1
        elif method in ("GET", "PUT"):
            counts[method] += 1
        else:
            counts["other"] += 1
    return counts


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}


def _local_chunk_files(data_dir: Path) -> int:
    root = data_dir / "blobs" / "chunks"
    if not root.is_dir():
        return 0
    return sum(1 for path in root.rglob("*") if path.is_file() and not path.name.startswith("."))


# -- the run -------------------------------------------------------------------


@dataclass
class Plan:
    mode: str
    size: int
    variants: int
    repeats: int
    s3_size: int
    s3: bool = True


def summarize(transfers: list[Transfer]) -> dict[str, Any]:
    return {
        "median_mb_s": statistics.median(t.mb_per_s for t in transfers),
        "runs_mb_s": [round(t.mb_per_s, 1) for t in transfers],
        "runs_seconds": [round(t.seconds, 3) for t in transfers],
        "runs_tail_seconds": [round(t.tail_seconds, 3) for t in transfers],
        "runs_server_cpu_seconds": [round(t.server_cpu_seconds, 2) for t in transfers],
        "server_cpu_seconds_per_gib": statistics.median(
            t.server_cpu_seconds / (t.bytes / GIB) for t in transfers
        ),
        "client_cpu_seconds_per_gib": statistics.median(
            t.client_cpu_seconds / (t.bytes / GIB) for t in transfers
        ),
    }


def _human(size: int) -> str:
    return f"{size // GIB} GiB" if size % GIB == 0 else f"{size // MIB} MiB"


def ours_env(workdir: Path, metrics_port: int) -> dict[str, str]:
    return {
        **server_env(workdir),
        "BMS_IMAGE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "BMS_IMAGE_GC_SECONDS": "1",
    }


async def tokens(env: dict[str, str], data_dir: Path) -> dict[str, Metadata]:
    issued = await asyncio.gather(*(issue_token(env, data_dir, p) for p in PROJECTS))
    return {p: (("authorization", f"Bearer {t}"),) for p, t in zip(PROJECTS, issued, strict=True)}


async def local_part(
    plan: Plan, workdir: Path, servers: list[ServerProcess], server_pin: set[int] | None
) -> dict[str, Any]:
    """Phases 1-4 against ours (local chunk objects), floor and bare."""
    metrics_port = free_port()
    env = ours_env(workdir, metrics_port)
    data_dir = workdir / "data"
    ours = launch("ours", [str(BIN / "bms-image"), "serve"], env, workdir / "ours.log", server_pin)
    servers.append(ours)
    floor_argv = [sys.executable, "-m", "bench.floor", "--root", str(workdir / "floor-chunks")]
    floor = launch("floor", floor_argv, env, workdir / "floor.log", server_pin)
    servers.append(floor)
    bare_argv = [sys.executable, "-m", "bench.bare", "--sizes", f"{WARMUP_BYTES},{plan.size}"]
    bare = launch("bare", bare_argv, env, workdir / "bare.log", server_pin)
    servers.append(bare)

    # The payloads are made here while the servers start over there.
    base = await asyncio.to_thread(random_base, plan.size)
    base_payload = Payload(base, plan.size)
    base_digest = await asyncio.to_thread(base_payload.sha256)
    fresh = [Payload(base, plan.size, salt=run + 1) for run in range(plan.repeats)]
    fresh_digests = await asyncio.gather(*(asyncio.to_thread(p.sha256) for p in fresh))
    warm = Payload(base, WARMUP_BYTES, salt=10_000)
    warm_digest = warm.sha256()
    await wait_listening(ours, "bms-image listening on", server_pin)
    await wait_listening(floor, "floor listening on", server_pin)
    await wait_listening(bare, "bare listening on", server_pin)
    metadata = await tokens(env, data_dir)
    bare_digest = await asyncio.to_thread(payload_sha256, payload_block(), plan.size)

    async with (
        grpc.aio.insecure_channel(ours.address, options=CLIENT_OPTIONS) as ours_channel,
        grpc.aio.insecure_channel(floor.address, options=CLIENT_OPTIONS) as floor_channel,
        grpc.aio.insecure_channel(bare.address, options=CLIENT_OPTIONS) as bare_channel,
    ):

        def target(label: str, server: ServerProcess, channel: grpc.aio.Channel, p: str) -> Target:
            return Target(label, server, image_pb2_grpc.ImageServiceStub(channel), metadata[p])

        t_ours = target("ours", ours, ours_channel, PROJECTS[0])
        t_floor = target("floor", floor, floor_channel, PROJECTS[0])
        t_bare = target("bare", bare, bare_channel, PROJECTS[0])
        model = await hardware_model(ours_channel, metadata[PROJECTS[0]])

        async def name_for(t: Target, label: str, size: int) -> str:
            if t.label == "ours":
                return await create_image(t, model, label)
            return f"{NAME_PREFIX}{size}"

        # Warm-up: connect, start thread pools, touch every code path.
        for t in (t_ours, t_floor, t_bare):
            name = await name_for(t, "warmup", WARMUP_BYTES)
            await upload(t, name, warm, warm_digest)
            if t.label != "floor":
                await download(t, name, WARMUP_BYTES, warm_digest if t.label == "ours" else None)
        await delete_images(t_ours)
        await clear_floor(floor_channel)

        # 1. Fresh uploads, interleaved.
        print(f"fresh uploads, {_human(plan.size)}, {plan.repeats} runs each:", flush=True)
        uploads: dict[str, list[Transfer]] = {"ours": [], "floor": [], "bare": []}
        order = [t_ours, t_floor, t_bare]
        for run in range(plan.repeats):
            for t in order if run % 2 == 0 else order[::-1]:
                name = await name_for(t, f"fresh-{run}", plan.size)
                transfer = await upload(t, name, fresh[run], fresh_digests[run])
                uploads[t.label].append(transfer)
                print(describe(t.label, f"upload   run {run + 1}", transfer), flush=True)
                if t.label == "ours":
                    await delete_images(t_ours)
                elif t.label == "floor":
                    await clear_floor(floor_channel)
        start = await collected(metrics_port)

        # 2. The base, then its bytes again as a new image of another project.
        print(f"base image {_human(plan.size)}, then its bytes again as a new image:", flush=True)
        base_name = await create_image(t_ours, model, "base")
        base_upload = await upload(t_ours, base_name, base_payload, base_digest)
        print(describe("ours", "upload   base ", base_upload), flush=True)
        after_base = await snapshot(metrics_port)
        other = target("ours", ours, ours_channel, PROJECTS[1])
        again_name = await create_image(other, model, "base-again")
        again_upload = await upload(other, again_name, base_payload, base_digest)
        print(describe("ours", "upload   again", again_upload), flush=True)
        after_again = await snapshot(metrics_port)
        grown = after_again.logical_bytes - after_base.logical_bytes
        if grown != plan.size:
            raise BenchError(f"ours: logical bytes grew by {grown} with a {plan.size}-byte image")
        again_download = await download(other, again_name, plan.size, base_digest)
        await delete_images(other)

        # 3. Downloads of the base, ours against bare.
        print(f"downloads, {_human(plan.size)}, {plan.repeats} runs each:", flush=True)
        downloads: dict[str, list[Transfer]] = {"ours": [], "bare": []}
        for run in range(plan.repeats):
            for t in (t_ours, t_bare) if run % 2 == 0 else (t_bare, t_ours):
                if t.label == "ours":
                    transfer = await download(t, base_name, plan.size, base_digest)
                else:
                    transfer = await download(
                        t, f"{NAME_PREFIX}{plan.size}", plan.size, bare_digest
                    )
                downloads[t.label].append(transfer)
                print(describe(t.label, f"download run {run + 1}", transfer), flush=True)

        # 4. Variants sharing ~99 % of their chunks with the base.
        print(f"{plan.variants} variants of the base in {len(PROJECTS)} projects:", flush=True)
        variant_uploads: list[Transfer] = []
        current = await asyncio.to_thread(variant, base, plan.size, 1)
        hashing = asyncio.ensure_future(asyncio.to_thread(current.sha256))
        replaced_each = len(current.replaced)
        last: tuple[Target, str, str] | None = None
        for number in range(1, plan.variants + 1):
            payload, digest = current, await hashing
            if number < plan.variants:  # the next one's bytes and hash meanwhile
                current = await asyncio.to_thread(variant, base, plan.size, number + 1)
                hashing = asyncio.ensure_future(asyncio.to_thread(current.sha256))
            owner = target("ours", ours, ours_channel, PROJECTS[number % len(PROJECTS)])
            name = await create_image(owner, model, f"variant-{number}")
            transfer = await upload(owner, name, payload, digest)
            variant_uploads.append(transfer)
            last = (owner, name, digest)
            print(describe("ours", f"upload   variant {number:2}", transfer), flush=True)
        if last is None:
            raise BenchError("--variants must be at least 1")
        after_variants = await collected(metrics_port)
        variant_download = await download(last[0], last[1], plan.size, last[2])
        print(describe("ours", "download last variant", variant_download), flush=True)

    again_new = after_again.stored_bytes - after_base.stored_bytes
    stored = after_variants.stored_bytes - start.stored_bytes
    logical = after_variants.logical_bytes - start.logical_bytes
    return {
        "upload": {label: summarize(t) for label, t in uploads.items()},
        "download": {label: summarize(t) for label, t in downloads.items()},
        "base_upload": summarize([base_upload]),
        "reupload": {
            **summarize([again_upload]),
            "new_stored_bytes": again_new,
            "new_chunks": after_again.chunks - after_base.chunks,
            "download": summarize([again_download]),
        },
        "variants": {
            "count": plan.variants,
            "replaced_chunks_each": replaced_each,
            "projects": list(PROJECTS),
            "stored_bytes": stored,
            "logical_bytes": logical,
            "chunks": after_variants.chunks - start.chunks,
            "stored_over_base": stored / plan.size,
            "dedup_ratio_whole_store": after_variants.dedup_ratio,
            "uploads": summarize(variant_uploads),
            "last_download": summarize([variant_download]),
        },
        "store_snapshots": {
            "start": asdict(start),
            "after_base": asdict(after_base),
            "after_reupload": asdict(after_again),
            "after_variants": asdict(after_variants),
        },
        "stored_bytes_source": "Prometheus bms_image_store_stored_bytes (chunks + records)",
    }


async def s3_part(
    plan: Plan, workdir: Path, servers: list[ServerProcess], server_pin: set[int] | None
) -> dict[str, Any]:
    """Phase 5: ours on the S3 backend against moto; requests per GiB."""
    moto_log = workdir / "moto.log"
    moto = launch("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", "0"],
                  dict(os.environ), moto_log, None)  # fmt: skip
    servers.append(moto)
    await wait_listening(moto, " * Running on http://", None)
    s3dir = workdir / "s3"
    s3dir.mkdir()
    metrics_port = free_port()
    env = {
        **ours_env(s3dir, metrics_port),
        "BMS_IMAGE_BLOB_BACKEND": "s3",
        "BMS_IMAGE_S3_ENDPOINT_URL": f"http://{moto.address}",
        "BMS_IMAGE_S3_BUCKET": S3_BUCKET,
        "BMS_IMAGE_S3_REGION": "us-east-1",
        "BMS_IMAGE_S3_ACCESS_KEY": S3_KEY,
        "BMS_IMAGE_S3_SECRET_KEY": S3_SECRET,
        "AWS_CONFIG_FILE": str(s3dir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(s3dir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    data_dir = s3dir / "data"
    ours = launch("ours-s3", [str(BIN / "bms-image"), "serve"], env, s3dir / "ours.log", server_pin)
    servers.append(ours)
    size = plan.s3_size
    base = await asyncio.to_thread(random_base, size)
    payload = Payload(base, size)
    digest = await asyncio.to_thread(payload.sha256)
    warm = Payload(base, WARMUP_BYTES, salt=1)
    await wait_listening(ours, "bms-image listening on", server_pin)
    metadata = await issue_token(env, data_dir)
    async with grpc.aio.insecure_channel(ours.address, options=CLIENT_OPTIONS) as channel:
        t = Target("ours-s3", ours, image_pb2_grpc.ImageServiceStub(channel),
                   (("authorization", f"Bearer {metadata}"),))  # fmt: skip
        model = await hardware_model(channel, t.metadata)
        name = await create_image(t, model, "s3-warmup")
        await upload(t, name, warm, warm.sha256())
        await download(t, name, WARMUP_BYTES, warm.sha256())
        local_files = _local_chunk_files(data_dir)
        if local_files:
            return {
                "skipped": (
                    f"with BMS_IMAGE_BLOB_BACKEND=s3 the service stored its chunks on local "
                    f"disk ({local_files} files under {data_dir / 'blobs' / 'chunks'}): the S3 "
                    "chunk backend is not wired into bootstrap yet"
                )
            }
        await delete_images(t)
        await collected(metrics_port)
        print(f"S3 backend (moto), {_human(size)}:", flush=True)
        before, moto_before = await snapshot(metrics_port), moto_requests(moto_log, S3_BUCKET)
        name = await create_image(t, model, "s3")
        up = await upload(t, name, payload, digest)
        print(describe("ours-s3", "upload  ", up), flush=True)
        middle, moto_middle = await snapshot(metrics_port), moto_requests(moto_log, S3_BUCKET)
        down = await download(t, name, size, digest)
        print(describe("ours-s3", "download", down), flush=True)
        after, moto_after = await snapshot(metrics_port), moto_requests(moto_log, S3_BUCKET)
    up_requests = _delta(middle.requests, before.requests)
    down_requests = _delta(after.requests, middle.requests)
    gib = size / GIB
    return {
        "size_bytes": size,
        "upload": summarize([up]),
        "download": summarize([down]),
        "source": "bms_image_store_requests_total{kind} (the chunks' backend)",
        "upload_requests": up_requests,
        "download_requests": down_requests,
        "upload_requests_per_gib": {k: v / gib for k, v in up_requests.items()},
        "download_requests_per_gib": {k: v / gib for k, v in down_requests.items()},
        "moto_log_upload_requests": dict(_delta(moto_middle, moto_before)),
        "moto_log_download_requests": dict(_delta(moto_after, moto_middle)),
    }


def verdicts(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    up, down = figures["upload"], figures["download"]
    new = figures["reupload"]["new_stored_bytes"]
    stored = figures["variants"]["stored_over_base"]
    cpu = up["ours"]["server_cpu_seconds_per_gib"] / up["floor"]["server_cpu_seconds_per_gib"]
    up_ratio = up["ours"]["median_mb_s"] / up["bare"]["median_mb_s"]
    down_ratio = down["ours"]["median_mb_s"] / down["bare"]["median_mb_s"]
    return {
        "reupload_new_bytes": {"value": new, "target": "<= 1 MiB",
                               "ok": new <= REUPLOAD_TARGET_BYTES},
        "variants_stored": {"ratio": stored, "target": f"<= {STORED_TARGET:.2f}x base",
                            "ok": stored <= STORED_TARGET},
        "upload_cpu": {"ratio": cpu, "target": f"<= {CPU_TARGET:.2f}x floor",
                       "ok": cpu <= CPU_TARGET},
        "upload": {"ratio": up_ratio, "target": f">= {UPLOAD_TARGET:.2f}",
                   "ok": up_ratio >= UPLOAD_TARGET},
        "download": {"ratio": down_ratio, "target": f">= {DOWNLOAD_TARGET:.2f}",
                     "ok": down_ratio >= DOWNLOAD_TARGET},
    }  # fmt: skip


def table(plan: Plan, figures: dict[str, Any], checks: dict[str, dict[str, Any]]) -> str:
    up, down = figures["upload"], figures["download"]
    variants, s3 = figures["variants"], figures["s3"]
    size = _human(plan.size)

    def ok(name: str) -> str:
        return "ok" if checks[name]["ok"] else "MISSED"

    def cpu(d: dict[str, Any], label: str) -> str:
        return f"{d[label]['server_cpu_seconds_per_gib']:.2f}"

    def cpu_ratio(d: dict[str, Any], label: str, reference: str) -> str:
        key = "server_cpu_seconds_per_gib"
        return f"{d[label][key] / d[reference][key]:.2f}" if d[reference][key] else "-"

    rows = [
        ("what", "ours", "reference", "ratio", "target", "ok"),
        (f"re-upload of the {size} base as a new image: new bytes stored",
         f"{figures['reupload']['new_stored_bytes'] / 1024:.1f} KiB", f"{size} sent",
         f"{figures['reupload']['new_stored_bytes'] / plan.size:.5f}", "<= 1 MiB",
         ok("reupload_new_bytes")),
        (f"stored bytes, base + {variants['count']} variants (~1 % own chunks each)",
         f"{variants['stored_bytes'] / GIB:.3f} GiB",
         f"{variants['logical_bytes'] / GIB:.2f} GiB logical",
         f"{variants['stored_over_base']:.3f}x base", f"<= {STORED_TARGET:.2f}x base",
         ok("variants_stored")),
        (f"fresh upload {size}, server CPU s/GiB (floor)", cpu(up, "ours"), cpu(up, "floor"),
         f"{checks['upload_cpu']['ratio']:.2f}", checks["upload_cpu"]["target"], ok("upload_cpu")),
        (f"fresh upload {size}, MB/s (median; bare)", f"{up['ours']['median_mb_s']:.1f}",
         f"{up['bare']['median_mb_s']:.1f}", f"{checks['upload']['ratio']:.2f}",
         checks["upload"]["target"], ok("upload")),
        (f"download {size}, MB/s (median; bare)", f"{down['ours']['median_mb_s']:.1f}",
         f"{down['bare']['median_mb_s']:.1f}", f"{checks['download']['ratio']:.2f}",
         checks["download"]["target"], ok("download")),
        ("fresh upload, MB/s (median; floor)", f"{up['ours']['median_mb_s']:.1f}",
         f"{up['floor']['median_mb_s']:.1f}",
         f"{up['ours']['median_mb_s'] / up['floor']['median_mb_s']:.2f}", "(info)", ""),
        ("fresh upload, server CPU s/GiB (bare)", cpu(up, "ours"), cpu(up, "bare"),
         cpu_ratio(up, "ours", "bare"),
         "(info)", ""),
        ("download, server CPU s/GiB (bare)", cpu(down, "ours"), cpu(down, "bare"),
         cpu_ratio(down, "ours", "bare"),
         "(info)", ""),
    ]  # fmt: skip
    if "skipped" in s3:
        rows.append(
            ("S3 requests per GiB uploaded / downloaded", "skipped", "", "", "reported", "")
        )
    else:
        s3_size = _human(s3["size_bytes"])

        def per_gib(counts: dict[str, float]) -> str:
            return ", ".join(f"{k} {v:.0f}" for k, v in counts.items() if v) or "none"

        rows.append((f"S3 requests per GiB, upload {s3_size}",
                     per_gib(s3["upload_requests_per_gib"]), "moto: " + per_gib(
                         {k: v / (s3["size_bytes"] / GIB)
                          for k, v in s3["moto_log_upload_requests"].items()}),
                     "", "reported", ""))  # fmt: skip
        rows.append((f"S3 requests per GiB, download {s3_size}",
                     per_gib(s3["download_requests_per_gib"]), "moto: " + per_gib(
                         {k: v / (s3["size_bytes"] / GIB)
                          for k, v in s3["moto_log_download_requests"].items()}),
                     "", "reported", ""))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: tuple[str, ...]) -> str:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


async def run(
    plan: Plan, workdir: Path, servers: list[ServerProcess], server_pin: set[int] | None
) -> dict[str, Any]:
    figures = await local_part(plan, workdir, servers, server_pin)
    for server in reversed(servers):  # the S3 part runs alone
        server.stop()
    servers.clear()
    if plan.s3:
        figures["s3"] = await s3_part(plan, workdir, servers, server_pin)
    else:
        figures["s3"] = {"skipped": "--no-s3"}
    if "skipped" in figures["s3"]:
        print(f"S3 part skipped: {figures['s3']['skipped']}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chunks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB, 5 variants, 2 runs")
    parser.add_argument("--size", type=int, help="base image size in MiB")
    parser.add_argument("--variants", type=int, help="variants of the base")
    parser.add_argument("--repeats", type=int, help="fresh-upload and download runs per server")
    parser.add_argument("--s3-size", type=int, help="S3 part: image size in MiB")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 part")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place client and servers"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    plan = Plan(
        mode="quick" if args.quick else "full",
        size=(args.size or (256 if args.quick else 1024)) * MIB,
        variants=args.variants or (5 if args.quick else 20),
        repeats=args.repeats or (2 if args.quick else 3),
        s3_size=(args.s3_size or (256 if args.quick else 1024)) * MIB,
        s3=not args.no_s3,
    )
    if Settings().chunk_bytes != STORE_CHUNK:
        print("the service's message size is not the store's chunk size", file=sys.stderr)
        return 1
    client_malloc_tuned = tune_malloc()  # the client's heap: the same rule as bench.dataplane
    load_before = os.getloadavg()
    host = machine()
    placement = place(args.no_pin)
    server_pin = placement.server_pin
    servers: list[ServerProcess] = []
    restore = _interruptible(servers)
    workdir = Path(tempfile.mkdtemp(prefix="bms-image-bench-chunks-", dir="/tmp"))
    started = time.monotonic()
    print(
        f"bms-image chunk-store benchmark ({plan.mode}): client on cpus "
        f"{sorted(placement.client_cpus)}, servers on cpus {sorted(placement.server_cpus)}, "
        f"work dir {workdir}",
        flush=True,
    )
    try:
        figures = asyncio.run(run(plan, workdir, servers, server_pin))
    except KeyboardInterrupt:
        print("interrupted: servers stopped, work dir removed", file=sys.stderr)
        return 130
    except (BenchError, grpc.RpcError, OSError) as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        for log in sorted([*workdir.glob("*.log"), *workdir.glob("s3/*.log")]):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            print(f"--- {log.name} (last lines)\n{tail}", file=sys.stderr)
        return 1
    finally:
        for server in reversed(servers):
            server.stop()
        restore()
        shutil.rmtree(workdir, ignore_errors=True)
    checks = verdicts(figures)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": plan.mode,
        "machine": host,
        "plan": {**asdict(plan), "chunk_bytes": STORE_CHUNK, "mb": "10^6 bytes"},
        "pinning": placement.as_json(),
        "malloc": {"ours": "glibc default (the service as it ships)",
                   "floor": "tune_malloc()", "bare": "tune_malloc()",
                   "client_tuned": client_malloc_tuned},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "elapsed_seconds": round(time.monotonic() - started, 1),
        **figures,
        "checks": checks,
        "missed": [name for name, check in checks.items() if not check["ok"]],
    }  # fmt: skip
    notes = ""
    if "skipped" in figures["s3"]:
        notes = f"S3 part skipped: {figures['s3']['skipped']}"
    publish(args.output, results, table(plan, figures, checks), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
