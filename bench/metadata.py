"""`make bench` (metadata plane): the metadata calls of bms-image against a
bare baseline, and 1,000 long-lived streams on one process.

Like bench.dataplane it starts, each in its own process pinned to a core
other than this client's (client and server never share a GIL or a core):

- ours: the real service, `<venv>/bin/bms-image serve`, on a temporary data
  directory (SQLite, local blobs) exactly as bench.dataplane launches it, plus
  its Prometheus endpoint (`BMS_IMAGE_METRICS_LISTEN`), which counts the calls;
- bare: `bench.bare` with `--get-image/--create-image`, a grpc.aio server with
  the same transport options whose GetImage, CreateImage and DeleteImage parse
  the request and echo a prebuilt reply: the very Image messages ours returned
  (same bytes, same size). No token check, no database. It counts its calls too.

It then measures, in this order:

1. ListImages, pages of 100, one call at a time (a Python grpc.aio client,
   the time of each call as the client sees it), with 1,000 images stored,
   then with 100,000: a rotation of 3 callers (PROJECT, which sees most of
   the store, and two tenants that see the public images and their own) x 4
   filters (by flavor, none, `type = public`, OS and architecture; plus
   `type = shared` for PROJECT), each read to its 5th page, so that no memory
   of one answer can pass. The first walk is the warm-up: its server CPU is
   reported apart, not charged to the measured calls. The images are
   inserted in bulk straight into the service's SQLite database (SQLAlchemy
   Core executemany, while the service runs: WAL): 60 % public images of the
   platform's catalog (2 to 4 flavors each, some deprecated, some protected)
   and 40 % private images of 2,000 projects (their hardware models, tags,
   idempotency keys), 1 % of those shared with the caller's project, which
   also owns 20. The caller sees most of the store and every page is full:
   the heavy case for building a page. Every answer is checked: the 100
   images expected (computed from the rows inserted) in seq order, and a
   next-page token.
2. GetImage of a public catalog image (CentOS 7.6) with a bearer token:
   `h2load -c 1 -m 16` (one HTTP/2 connection, 16 streams in flight; gRPC
   framed by hand: a 5-byte prefix and the request), a fixed number of
   requests sized from a warm-up run to last `--get-seconds`, ours and bare
   interleaved. h2load counts any HTTP 200 as a success even when grpc-status
   is not 0, so every run is checked against the servers' own counts of OK
   calls (ours: `bms_image_rpcs_total`; bare: `/bench.bare.Stats/Counts`).
   QPS, and p50/p99 of the per-request times of h2load's `--log-file`.
3. CreateImage then DeleteImage (metadata only: no bytes), 16 workers each
   looping create -> delete (grpc.aio client), for `--pair-seconds`; pairs/s,
   checked against the servers' counts, and on ours that nothing is left.
4. 1,000 long-lived streams on ours: 10 CreateServers calls of 100 (EVS boot,
   the public CentOS image, physical.s4.large) and one WatchServer stream per
   server, opened as soon as its first event names it, followed to ACTIVE.
   Events, wall time, server RSS (idle before, peak during: VmRSS every 50 ms
   and VmHWM) and (peak - idle) / streams: an upper bound of the memory per
   stream, since it includes the deployments' own work. A stream opened after
   its server's deployment ended gets only the final state (one event): those
   are counted apart, as is the peak number of streams open at once.

Besides the rates it records the CPU seconds each server spent per call (from
/proc): they move less than QPS when other processes share the machine.

It prints one table and writes every figure to .bench/metadata.json. A missed
target is reported as MISSED and still exits 0; anything that breaks (a
server that does not start, a wrong answer, an RPC error, a count that does
not match) exits 1. A service failing under the 1,000 streams (an RPC error,
a FAILED deployment) is a missed target.

    python -m bench.metadata            # 100,000 images, 3 rounds, 1,000 streams
    python -m bench.metadata --quick    # 20,000 images, 1 round, 100 streams
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, Table, create_engine, func, insert, select

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.images.adapters.catalog import load_catalog, public_image_id
from bms_image.images.adapters.tables import (
    ImageFlavorRow,
    ImageMemberRow,
    ImageRow,
    ImageTagRow,
    ProjectRow,
)

from .bare import STATS_METHOD
from .dataplane import (
    BIN,
    CLIENT_OPTIONS,
    MIB,
    ROOT,
    BenchError,
    Metadata,
    RssSampler,
    ServerProcess,
    _interruptible,
    cpu_seconds,
    issue_token,
    launch,
    machine,
    own_cpu_seconds,
    place,
    publish,
    read_status,
    server_env,
    wait_listening,
)

RESULTS = ROOT / ".bench" / "metadata.json"
#: The project of issue_token's token: the caller of every call.
PROJECT = "bench"
IMAGE_SERVICE = image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
PROVISIONING_SERVICE = provisioning_pb2.DESCRIPTOR.services_by_name["ProvisioningService"].full_name
CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
FLAVOR = "physical.s4.large"
LIST_FILTER = f"flavor = {FLAVOR}"
PAGE_SIZE = 100
H2_STREAMS = 16
WORKERS = 16
BATCH = 100  # servers per CreateServers call: the API's maximum
CALL_TIMEOUT = 60.0
STREAMS_TIMEOUT = 900.0
#: Later pages read of each listing of the rotation, besides the first.
LIST_LATER_PAGES = 4
#: Tenants (of the store's 2,000) that list too: public images and their own.
LIST_TENANTS = ("tenant-0007", "tenant-1234")
#: The filters of the rotation, for every caller ("type = shared" for PROJECT).
LIST_FILTERS = (LIST_FILTER, "", "type = public", "os_type = linux AND architecture = x86_64")
LIST_MIN_SAMPLES = 20

GET_TARGET = 0.75
PAIRS_TARGET = 0.25
LIST_P99_TARGET_MS = 25.0
#: Server CPU per 100-image page at the large store (SQLite).
LIST_CPU_TARGET_MS = 2.0
LIST_GROWTH_TARGET = 1.5

#: The shape of the bulk-inserted store (the same at every size).
PUBLIC_SHARE = 0.60
DEPRECATED_SHARE = 0.05  # of the public images: hidden from default listings
PROTECTED_SHARE = 0.10  # of the public images
SHARED_SHARE = 0.01  # of the private images: shared with PROJECT
ACCEPTED_SHARE = 0.80  # of those: accepted (the others pending: not listed)
OWN_IMAGES = 20  # private images of PROJECT (quota 50: 16 workers still fit)
TENANTS = 2000
OS_VARIANTS = (  # os_type, os_distro, os_version, architecture
    ("linux", "centos", "7.6", "x86_64"),
    ("linux", "centos", "8.2", "x86_64"),
    ("linux", "ubuntu", "20.04", "x86_64"),
    ("linux", "ubuntu", "22.04", "x86_64"),
    ("linux", "euleros", "2.9", "x86_64"),
    ("linux", "openeuler", "22.03", "aarch64"),
    ("windows", "windows", "2019", "x86_64"),
)
TAGS = ("web", "db", "golden", "hardened", "gpu", "hpc", "sap", "prod", "staging", "backup")
LINUX_PLUGINS = [
    {"kind": "cloud_init", "version": "0.7.9"},
    {"kind": "bms_network_config", "version": "2.1.3"},
    {"kind": "sdi_inic_driver", "version": "1.2.0"},
]
WINDOWS_PLUGINS = [
    {"kind": "cloudbase_init", "version": "1.1.2"},
    {"kind": "bms_network_config", "version": "2.1.3"},
]


@dataclass
class Plan:
    mode: str
    get_seconds: float  # each measured h2load run lasts about this long
    get_rounds: int
    small_store: int
    large_store: int
    list_requests: int  # per store size, at most
    list_seconds: float  # per store size, at most (but LIST_MIN_SAMPLES calls)
    pair_seconds: float
    servers: int


# -- the servers -----------------------------------------------------------------


@dataclass
class Server:
    """One server as the client sees it."""

    label: str
    process: ServerProcess
    channel: grpc.aio.Channel
    images: Any  # image_pb2_grpc.ImageServiceStub (untyped generated code)
    metrics_port: int = 0  # ours: its Prometheus endpoint; bare: 0 (its Stats method)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    """The Prometheus text of ours. Blocking."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        return str(reply.read().decode())


def counters(text: str) -> Counter[str]:
    """Every `*_total` sample, keyed `name{label="value",...}` (labels sorted)."""
    values: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = ",".join(
                    f'{key}="{value}"' for key, value in sorted(sample.labels.items())
                )
                values[f"{sample.name}{{{labels}}}"] = int(sample.value)
    return values


_RPC_SAMPLE = re.compile(
    r'bms_image_rpcs_total\{code="(?P<code>\w+)",method="(?P<method>\w+)",'
    r'service="(?P<service>[\w.]+)"\}'
)


async def call_counts(server: Server) -> Counter[str]:
    """Calls the server answered, keyed `service/Method CODE`."""
    if server.metrics_port:
        text = await asyncio.to_thread(scrape, server.metrics_port)
        counts: Counter[str] = Counter()
        for key, value in counters(text).items():
            if match := _RPC_SAMPLE.fullmatch(key):
                counts[f"{match['service']}/{match['method']} {match['code']}"] = value
        return counts
    reply = await server.channel.unary_unary(STATS_METHOD)(b"", timeout=CALL_TIMEOUT)
    return Counter({f"{IMAGE_SERVICE}/{m} OK": n for m, n in json.loads(reply).items()})


async def check_calls(server: Server, before: Counter[str], expected: dict[str, int]) -> None:
    """The server counted exactly `expected[method]` OK calls of each method
    since `before`, and no failed call of any of them."""
    after = await call_counts(server)
    for method, count in expected.items():
        path = f"{IMAGE_SERVICE}/{method}"
        answered = after[f"{path} OK"] - before[f"{path} OK"]
        if answered != count:
            raise BenchError(
                f"{server.label}: the client completed {count} {method} calls, "
                f"the server counted {answered} OK"
            )
        failed = {
            key: after[key] - before[key]
            for key in after
            if key.startswith(f"{path} ") and not key.endswith(" OK") and after[key] > before[key]
        }
        if failed:
            raise BenchError(f"{server.label}: failed calls: {failed}")


def ours_env(workdir: Path, metrics_port: int) -> dict[str, str]:
    return {**server_env(workdir), "BMS_IMAGE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}


def start_bare(
    workdir: Path, get_reply: bytes, create_reply: bytes, pin: set[int] | None
) -> ServerProcess:
    """Launches bare with the replies ours gave (it needs ours up first)."""
    get_file, create_file = workdir / "get-image.bin", workdir / "create-image.bin"
    get_file.write_bytes(get_reply)
    create_file.write_bytes(create_reply)
    argv = [sys.executable, "-m", "bench.bare", "--get-image", str(get_file),
            "--create-image", str(create_file)]  # fmt: skip
    return launch("bare", argv, server_env(workdir), workdir / "bare.log", pin)


# -- the store -------------------------------------------------------------------


@dataclass
class Rows:
    """Rows for the service's tables, and what the caller must see of them."""

    images: list[dict[str, Any]] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)
    flavors: list[dict[str, Any]] = field(default_factory=list)
    members: list[dict[str, Any]] = field(default_factory=list)
    projects: set[str] = field(default_factory=set)
    #: Names of the images the listing must return, in insertion (seq) order.
    listed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Catalog:
    """What the seeded catalog defines: each flavor's hardware model, the
    flavors of each architecture (those its public images are published for)
    and the public images the listing returns, in seq order."""

    models: dict[str, str]
    x86_flavors: list[str]
    arm_flavors: list[str]
    listed: list[str]

    @classmethod
    def load(cls) -> Catalog:
        catalog = load_catalog()
        by_arch: dict[str, set[str]] = {"x86_64": set(), "aarch64": set()}
        for image in catalog.images:
            by_arch[image.architecture.value].update(image.supported_flavors)
        return cls(
            models={flavor["name"]: flavor["hardware_model"] for flavor in catalog.flavors},
            x86_flavors=sorted(by_arch["x86_64"]),
            arm_flavors=sorted(by_arch["aarch64"]),
            listed=[f"images/{i.id}" for i in catalog.images if FLAVOR in i.supported_flavors],
        )


class StoreBuilder:
    """Realistic image rows, deterministic for a seed (see the docstring)."""

    def __init__(self, catalog: Catalog, seed: int = 7) -> None:
        self._catalog = catalog
        self._rng = random.Random(seed)
        self._index = 0
        self.own_images = 0
        self._start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=730)

    def build(self, count: int) -> Rows:
        rows = Rows()
        for _ in range(count):
            self._index += 1
            if self._rng.random() < PUBLIC_SHARE:
                self._public(rows)
            else:
                self._private(rows)
        return rows

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _base(self, image_id: str) -> dict[str, Any]:
        rng = self._rng
        os_type, distro, version, arch = rng.choice(OS_VARIANTS)
        created = self._start + datetime.timedelta(seconds=60 * self._index)
        size = rng.randrange(1, 40) * 1024**3
        return {
            "id": image_id, "display_name": f"{distro}-{version}-{self._index}",
            "description": f"{distro} {version} {arch}, build {self._index}",
            "os_type": os_type, "os_distro": distro, "os_version": version,
            "architecture": arch, "disk_format": "raw", "size_bytes": size,
            "min_disk_gb": 40, "sha256": rng.randbytes(32).hex(), "uploaded_bytes": size,
            "status": "active", "status_reason": "", "hardware_model": "",
            "plugins": WINDOWS_PLUGINS if os_type == "windows" else LINUX_PLUGINS,
            "partitions": [], "source_server": "", "protected": False, "deprecated": False,
            "request_method": "create", "request_id": self._uuid(), "revision": 1,
            "create_time": created,
            "update_time": created,
        }  # fmt: skip

    def _tags(self, rows: Rows, image_id: str) -> None:
        for position, tag in enumerate(self._rng.sample(TAGS, self._rng.randrange(4))):
            rows.tags.append({"image_id": image_id, "tag": tag, "position": position})

    def _public(self, rows: Rows) -> None:
        rng, image_id = self._rng, self._uuid()
        image = self._base(image_id)
        arm = image["architecture"] == "aarch64"
        flavors = (
            self._catalog.arm_flavors
            if arm
            else rng.sample(self._catalog.x86_flavors, rng.randint(2, 4))
        )
        image.update(
            visibility="public", owner_project=None, creator_project="platform",
            protected=rng.random() < PROTECTED_SHARE,
            deprecated=rng.random() < DEPRECATED_SHARE,
        )  # fmt: skip
        rows.images.append(image)
        rows.flavors += [{"image_id": image_id, "flavor": name} for name in sorted(flavors)]
        self._tags(rows, image_id)
        if FLAVOR in flavors and not image["deprecated"]:
            rows.listed.append(f"images/{image_id}")

    def _private(self, rows: Rows) -> None:
        rng, image_id = self._rng, self._uuid()
        image = self._base(image_id)
        arm = image["architecture"] == "aarch64"
        flavor = rng.choice(self._catalog.arm_flavors if arm else self._catalog.x86_flavors)
        own = self.own_images < OWN_IMAGES and rng.random() < 0.05
        owner = PROJECT if own else f"tenant-{rng.randrange(TENANTS):04d}"
        self.own_images += own
        status = rng.choices(("active", "queued", "deactivated"), (92, 5, 3))[0]
        image.update(
            visibility="private", owner_project=owner, creator_project=owner, status=status,
            hardware_model=self._catalog.models[flavor],
            uploaded_bytes=0 if status == "queued" else image["size_bytes"],
        )  # fmt: skip
        rows.images.append(image)
        rows.projects.add(owner)
        self._tags(rows, image_id)
        accepted = False
        if not own and rng.random() < SHARED_SHARE:
            accepted = rng.random() < ACCEPTED_SHARE
            rows.members.append({
                "image_id": image_id, "project": PROJECT,
                "status": "accepted" if accepted else "pending",
                "create_time": image["create_time"], "update_time": image["create_time"],
            })  # fmt: skip
        if (own or accepted) and flavor == FLAVOR:
            rows.listed.append(f"images/{image_id}")


def _encoded(
    engine: Engine, table: Table, rows: Sequence[dict[str, Any]]
) -> tuple[str, list[tuple[Any, ...]]]:
    """The INSERT SQLAlchemy compiles for these columns, and the rows encoded
    by the columns' own types (JSON, DateTime, Boolean) for the driver."""
    columns = list(rows[0])
    missing = {c.name for c in table.columns if not c.nullable and c.server_default is None}
    missing -= set(columns) | {"seq"}
    if missing:
        raise BenchError(f"bench rows for {table.name} lack columns {sorted(missing)}")
    statement = (
        insert(table).prefix_with("OR IGNORE") if table.name == "projects" else insert(table)
    )
    compiled = statement.compile(dialect=engine.dialect, column_keys=columns)
    order = list(compiled.positiontup or ())  # the parameters' order in the SQL
    if sorted(order) != sorted(columns):
        raise BenchError(f"{table.name}: the INSERT binds {order}, the rows have {columns}")
    dialect = engine.dialect
    encode = [(c, table.c[c].type.dialect_impl(dialect).bind_processor(dialect)) for c in order]
    values = [tuple(p(row[c]) if p else row[c] for c, p in encode) for row in rows]
    return str(compiled), values


def _by_key(rows: list[dict[str, Any]], *key: str) -> list[dict[str, Any]]:
    """Sorted by primary key: B-tree appends instead of random inserts."""
    return sorted(rows, key=lambda row: tuple(row[k] for k in key))


def bulk_insert(database: Path, rows: Rows) -> float:
    """Inserts `rows` into the service's SQLite database in one transaction
    (executemany through SQLAlchemy Core); returns the seconds it took. The
    service keeps running: WAL lets its readers go on. Blocking."""
    started = time.perf_counter()
    engine = create_engine(f"sqlite:///{database}", connect_args={"timeout": 60})
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("PRAGMA cache_size = -262144")  # 256 MiB for the indexes
            now = datetime.datetime.now(datetime.UTC)
            projects = [{"id": p, "create_time": now} for p in sorted(rows.projects)]

            def insert_rows(table: object, table_rows: list[dict[str, Any]]) -> None:
                if table_rows:
                    assert isinstance(table, Table)
                    sql, values = _encoded(engine, table, table_rows)
                    connection.exec_driver_sql(sql, values)

            insert_rows(ImageRow.__table__, rows.images)  # in order: seq follows the list
            insert_rows(ImageTagRow.__table__, _by_key(rows.tags, "image_id", "tag"))
            insert_rows(ImageFlavorRow.__table__, _by_key(rows.flavors, "image_id", "flavor"))
            # A member row carries its image's seq, which the database chose.
            seqs: dict[str, int] = dict(
                connection.exec_driver_sql("SELECT id, seq FROM images").fetchall()
            )
            members = [{**m, "image_seq": seqs[m["image_id"]]} for m in rows.members]
            insert_rows(ImageMemberRow.__table__, _by_key(members, "image_id", "project"))
            insert_rows(ProjectRow.__table__, projects)
    finally:
        engine.dispose()
    return time.perf_counter() - started


def count_images(database: Path) -> int:
    """Images stored (not deleted). Blocking."""
    engine = create_engine(f"sqlite:///{database}", connect_args={"timeout": 60})
    statement = select(func.count()).select_from(ImageRow).where(ImageRow.status != "deleted")
    try:
        with engine.connect() as connection:
            return int(connection.scalar(statement) or 0)
    finally:
        engine.dispose()


# -- statistics --------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the two nearest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * fraction
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "samples": len(ms),
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "mean_ms": statistics.fmean(ms),
        "max_ms": max(ms),
    }


# -- 1. ListImages -----------------------------------------------------------------


ListCall = tuple[Metadata, image_pb2.ListImagesRequest]


async def listing_rotation(
    server: Server, metadata: Metadata, tenants: list[Metadata], expected: list[str]
) -> tuple[list[ListCall], dict[int, list[str]], list[float]]:
    """The calls of the rotation and the names each must answer, found by
    walking each listing (caller x filter) to its LIST_LATER_PAGES-th later
    page: different callers (PROJECT sees most of the store; tenants see the
    public images and their own), filters, first and later pages, so that no
    memory of one answer can pass. The walk is the warm-up; its latencies
    are returned apart. The first call (PROJECT's first page by flavor) must
    answer `expected`, computed from the rows inserted."""
    listings = [(metadata, text) for text in (*LIST_FILTERS, "type = shared")]
    listings += [(md, text) for md in tenants for text in LIST_FILTERS]
    calls: list[ListCall] = []
    answers: dict[int, list[str]] = {}
    warmup: list[float] = []
    for md, text in listings:
        token = ""
        for _ in range(1 + LIST_LATER_PAGES):
            request = image_pb2.ListImagesRequest(
                filter=text, page_size=PAGE_SIZE, page_token=token
            )
            started = time.perf_counter()
            reply = await server.images.ListImages(request, metadata=md, timeout=CALL_TIMEOUT)
            warmup.append(time.perf_counter() - started)
            answers[len(calls)] = [image.name for image in reply.images]
            calls.append((md, request))
            token = reply.next_page_token
            if not token:
                break
    if answers[0] != expected:
        raise BenchError(
            f"ListImages returned {len(answers[0])} images, expected {len(expected)} (or others)"
        )
    return calls, answers, warmup


async def list_latencies(
    server: Server, calls: list[ListCall], answers: dict[int, list[str]], plan: Plan
) -> list[float]:
    """Seconds per call, one call at a time, going round the rotation; every
    answer is checked against the one of the warm-up (nothing changes)."""
    latencies: list[float] = []
    deadline = time.monotonic() + plan.list_seconds
    while len(latencies) < plan.list_requests and (
        len(latencies) < LIST_MIN_SAMPLES or time.monotonic() < deadline
    ):
        index = len(latencies) % len(calls)
        md, request = calls[index]
        started = time.perf_counter()
        reply = await server.images.ListImages(request, metadata=md, timeout=CALL_TIMEOUT)
        latencies.append(time.perf_counter() - started)
        if [image.name for image in reply.images] != answers[index]:
            raise BenchError(f"ListImages call {index} of the rotation answered otherwise")
    return latencies


async def measure_listing(
    ours: Server, metadata: Metadata, tenants: list[Metadata], database: Path, plan: Plan
) -> dict[str, Any]:
    """Fills the store to the small size, measures, to the large, measures.
    The server CPU of the warm-up (the first walk, which renders every image
    it meets) is charged to the warm-up, not to the measured calls."""
    catalog = Catalog.load()
    builder = StoreBuilder(catalog)
    listed = list(catalog.listed)
    results: dict[str, Any] = {}
    for size in (plan.small_store, plan.large_store):
        stored = await asyncio.to_thread(count_images, database)
        rows = await asyncio.to_thread(builder.build, size - stored)
        seconds = await asyncio.to_thread(bulk_insert, database, rows)
        listed += rows.listed
        stored = await asyncio.to_thread(count_images, database)
        if stored != size:
            raise BenchError(f"{stored} images stored, expected {size}")
        print(f"  {size:,} images stored ({len(rows.images):,} inserted in {seconds:.1f} s); "
              f"{len(listed):,} listed for {PROJECT} with {LIST_FILTER!r}")  # fmt: skip
        if len(listed) < PAGE_SIZE:
            raise BenchError(f"only {len(listed)} images to list: the page would not be full")
        cpu = cpu_seconds(ours.process.pid)
        calls, answers, warmup = await listing_rotation(ours, metadata, tenants, listed[:PAGE_SIZE])
        warmup_cpu = cpu_seconds(ours.process.pid) - cpu
        cpu = cpu_seconds(ours.process.pid)
        latencies = await list_latencies(ours, calls, answers, plan)
        cpu = cpu_seconds(ours.process.pid) - cpu
        summary = latency_summary(latencies)
        results[str(size)] = {
            **summary,
            "stored": size,
            "listed_for_caller": len(listed),
            "insert_seconds": seconds,
            "inserted": len(rows.images),
            "rotation_calls": len(calls),
            "server_cpu_ms_per_call": cpu / len(latencies) * 1000,
            "warmup_p50_ms": percentile([s * 1000 for s in warmup], 0.50),
            "warmup_server_cpu_ms_per_call": warmup_cpu / len(warmup) * 1000,
            "caller_own_images": builder.own_images,
        }
        figures = results[str(size)]
        print(f"    ListImages p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms "
              f"({len(latencies)} calls round {len(calls)} pages of 3 callers, each checked; "
              f"server CPU {figures['server_cpu_ms_per_call']:.2f} ms/call; "
              f"warm-up {figures['warmup_server_cpu_ms_per_call']:.2f} ms/call)")  # fmt: skip
    return results


# -- 2. GetImage with h2load ---------------------------------------------------------


def grpc_body(request: Message, path: Path) -> Path:
    """The request as one uncompressed gRPC message: 0, length, bytes."""
    payload = request.SerializeToString()
    path.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
    return path


@dataclass
class LoadRun:
    """One h2load run."""

    label: str
    requests: int
    seconds: float
    server_cpu_seconds: float
    latencies: list[float]  # seconds, one per request

    @property
    def qps(self) -> float:
        return self.requests / self.seconds


_H2_DONE = re.compile(
    r"requests: (?P<total>\d+) total, \d+ started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored"
)
_H2_2XX = re.compile(r"status codes: (?P<ok>\d+) 2xx")


def read_h2load_log(path: Path, requests: int) -> tuple[list[float], float]:
    """Per-request seconds, and the seconds from the first start to the last
    end, from h2load's --log-file (start µs, HTTP status, elapsed µs)."""
    starts, ends, latencies = [], [], []
    for line in path.read_text().splitlines():
        start, status, elapsed = line.split("\t")[:3]
        if status != "200":
            raise BenchError(f"h2load: HTTP status {status}")
        starts.append(int(start))
        ends.append(int(start) + int(elapsed))
        latencies.append(int(elapsed) / 1e6)
    if len(latencies) != requests:
        raise BenchError(f"h2load logged {len(latencies)} requests of {requests}")
    return latencies, (max(ends) - min(starts)) / 1e6


async def h2load(
    server: Server, method: str, body: Path, headers: Sequence[str], requests: int, workdir: Path
) -> LoadRun:
    """`h2load -c 1 -m 16 -n requests`; checks that h2load and the server
    both counted `requests` successful calls."""
    log = workdir / f"h2load-{server.label}-{uuid.uuid4().hex[:8]}.log"  # h2load appends
    argv = ["h2load", "-c", "1", "-m", str(H2_STREAMS), "-n", str(requests),
            "--log-file", str(log), "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers"]  # fmt: skip
    for header in headers:
        argv += ["-H", header]
    argv.append(f"http://{server.process.address}/{IMAGE_SERVICE}/{method}")
    before = await call_counts(server)
    cpu = cpu_seconds(server.process.pid)
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    cpu = cpu_seconds(server.process.pid) - cpu
    text = out.decode(errors="replace")
    done, ok = _H2_DONE.search(text), _H2_2XX.search(text)
    if process.returncode != 0 or done is None or ok is None:
        raise BenchError(
            f"h2load failed ({process.returncode}): {text[-800:]}{err.decode()[-400:]}"
        )
    if int(done["succeeded"]) != requests or int(ok["ok"]) != requests:
        raise BenchError(f"h2load: {done.group(0)}; {ok.group(0)} (of {requests})")
    await check_calls(server, before, {method: requests})
    latencies, seconds = read_h2load_log(log, requests)
    log.unlink()
    return LoadRun(server.label, requests, seconds, cpu, latencies)


async def measure_get(
    servers: list[Server], token: str, plan: Plan, workdir: Path
) -> dict[str, list[LoadRun]]:
    """A warm-up run per server sizes the measured runs to last about
    `plan.get_seconds`; then `plan.get_rounds` rounds, the order alternating."""
    body = grpc_body(image_pb2.GetImageRequest(name=CENTOS), workdir / "get-image.req")
    headers = [f"authorization: Bearer {token}"]
    sizes: dict[str, int] = {}
    for server in servers:
        warm = await h2load(server, "GetImage", body, headers, 400, workdir)
        sizes[server.label] = max(400, round(warm.qps * plan.get_seconds))
        print(f"  GetImage {server.label:4} warm-up: {warm.qps:8.0f} QPS ({warm.requests} calls)")
    runs: dict[str, list[LoadRun]] = {server.label: [] for server in servers}
    for index in range(plan.get_rounds):
        for server in servers if index % 2 == 0 else servers[::-1]:
            run = await h2load(server, "GetImage", body, headers, sizes[server.label], workdir)
            runs[server.label].append(run)
            print(f"  GetImage {server.label:4} run {index + 1}: {run.qps:8.0f} QPS, "
                  f"p50 {percentile(run.latencies, 0.5) * 1000:.2f} ms, "
                  f"p99 {percentile(run.latencies, 0.99) * 1000:.2f} ms "
                  f"({run.requests} calls, all counted OK by the server; server CPU "
                  f"{run.server_cpu_seconds / run.requests * 1e6:.0f} µs/call)")  # fmt: skip
    return runs


def summarize_get(runs: list[LoadRun]) -> dict[str, Any]:
    latencies = [seconds for run in runs for seconds in run.latencies]
    return {
        "median_qps": statistics.median(run.qps for run in runs),
        "runs_qps": [round(run.qps, 1) for run in runs],
        "runs_requests": [run.requests for run in runs],
        **latency_summary(latencies),
        "server_cpu_us_per_call": statistics.median(
            run.server_cpu_seconds / run.requests * 1e6 for run in runs
        ),
    }


# -- 3. CreateImage + DeleteImage --------------------------------------------------


def new_image_request() -> image_pb2.CreateImageRequest:
    return image_pb2.CreateImageRequest(
        image=image_pb2.Image(
            display_name="bench-metadata",
            description="metadata benchmark: created and deleted at once",
            os_type=image_pb2.OS_TYPE_LINUX,
            os_distro="ubuntu",
            os_version="22.04",
            architecture=image_pb2.ARCHITECTURE_X86_64,
            hardware_model="s4-2288h-v5",
            tags=["bench", "metadata"],
        ),
        request_id=str(uuid.uuid4()),
    )


@dataclass
class PairRun:
    label: str
    pairs: int
    seconds: float
    server_cpu_seconds: float
    client_cpu_seconds: float
    latencies: list[float]  # seconds per pair

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds


async def create_delete(server: Server, metadata: Metadata, seconds: float) -> PairRun:
    """WORKERS workers loop create -> delete until `seconds` have passed."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    async def worker() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            image = await server.images.CreateImage(
                new_image_request(), metadata=metadata, timeout=CALL_TIMEOUT
            )
            if not image.name.startswith("images/"):
                raise BenchError(f"{server.label}: CreateImage answered {image.name!r}")
            await server.images.DeleteImage(
                image_pb2.DeleteImageRequest(name=image.name), metadata=metadata,
                timeout=CALL_TIMEOUT,
            )  # fmt: skip
            latencies.append(time.perf_counter() - started)

    before = await call_counts(server)
    cpu, client_cpu = cpu_seconds(server.process.pid), own_cpu_seconds()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    elapsed = time.perf_counter() - started
    cpu, client_cpu = cpu_seconds(server.process.pid) - cpu, own_cpu_seconds() - client_cpu
    pairs = len(latencies)
    await check_calls(server, before, {"CreateImage": pairs, "DeleteImage": pairs})
    return PairRun(server.label, pairs, elapsed, cpu, client_cpu, latencies)


async def own_private_images(server: Server, metadata: Metadata) -> int:
    """How many private images the caller has (ours): all pages."""
    count, token = 0, ""
    while True:
        reply = await server.images.ListImages(
            image_pb2.ListImagesRequest(filter="type = private", page_size=1000, page_token=token),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )
        count += len(reply.images)
        token = reply.next_page_token
        if not token:
            return count


async def measure_pairs(
    servers: list[Server], metadata: Metadata, plan: Plan, own_images: int
) -> dict[str, PairRun]:
    runs: dict[str, PairRun] = {}
    for server in servers:
        await create_delete(server, metadata, 1.0)  # warm-up: connections, caches
        run = await create_delete(server, metadata, plan.pair_seconds)
        runs[server.label] = run
        print(f"  CreateImage+DeleteImage {server.label:4}: {run.pairs_per_s:7.1f} pairs/s "
              f"({run.pairs} pairs, all counted OK by the server; server CPU "
              f"{run.server_cpu_seconds / run.pairs * 1000:.2f} ms/pair, client "
              f"{run.client_cpu_seconds / run.pairs * 1000:.2f} ms/pair)")  # fmt: skip
        if server.metrics_port:
            left = await own_private_images(server, metadata)
            if left != own_images:  # every image created was deleted again
                raise BenchError(f"ours: {left} private images after the run, not {own_images}")
    return runs


def summarize_pairs(run: PairRun) -> dict[str, Any]:
    return {
        "pairs_per_s": run.pairs_per_s,
        "pairs": run.pairs,
        "seconds": run.seconds,
        **latency_summary(run.latencies),
        "server_cpu_ms_per_pair": run.server_cpu_seconds / run.pairs * 1000,
        "client_cpu_ms_per_pair": run.client_cpu_seconds / run.pairs * 1000,
    }


# -- 4. 1,000 long-lived streams ----------------------------------------------------


@dataclass
class Watch:
    """One WatchServer stream."""

    server: str
    opened: float = 0.0
    closed: float = 0.0
    events: int = 0
    first_stage: str = ""
    last_stage: str = ""
    error: str = ""


def _stage(value: int) -> str:
    return str(provisioning_pb2.ProvisioningStage.Name(value)).removeprefix("PROVISIONING_STAGE_")


async def follow(provisioning: Any, metadata: Metadata, watch: Watch) -> None:
    watch.opened = time.perf_counter()
    try:
        call = provisioning.WatchServer(
            provisioning_pb2.WatchServerRequest(name=watch.server), metadata=metadata
        )
        async for event in call:
            watch.events += 1
            watch.first_stage = watch.first_stage or _stage(event.stage)
            watch.last_stage = _stage(event.stage)
    except grpc.aio.AioRpcError as error:
        watch.error = f"{error.code().name}: {error.details()}"
    watch.closed = time.perf_counter()


@dataclass
class Batch:
    """One CreateServers stream."""

    events: int = 0
    active: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    error: str = ""


def deploy_request(count: int, prefix: str) -> provisioning_pb2.CreateServersRequest:
    return provisioning_pb2.CreateServersRequest(
        flavor=f"flavors/{FLAVOR}",
        image=CENTOS,
        count=count,
        name_prefix=prefix,
        boot_source=provisioning_pb2.BOOT_SOURCE_EVS,
    )


async def deploy(
    provisioning: Any,
    metadata: Metadata,
    request: provisioning_pb2.CreateServersRequest,
    watches: dict[str, Watch] | None = None,
    tasks: list[asyncio.Task[None]] | None = None,
) -> Batch:
    """Follows a CreateServers stream; opens a WatchServer stream per server
    as soon as an event names it (when `watches` is given)."""
    batch = Batch()
    try:
        async for event in provisioning.CreateServers(request, metadata=metadata):
            batch.events += 1
            if watches is not None and tasks is not None and event.server not in watches:
                watches[event.server] = watch = Watch(event.server)
                tasks.append(asyncio.create_task(follow(provisioning, metadata, watch)))
            if event.stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE:
                batch.active.add(event.server)
            elif event.stage == provisioning_pb2.PROVISIONING_STAGE_FAILED:
                batch.failed[event.server] = f"{event.error_reason}: {event.message}"
    except grpc.aio.AioRpcError as error:
        batch.error = f"{error.code().name}: {error.details()}"
    return batch


def peak_open(watches: Iterable[Watch]) -> int:
    """The most streams open at the same moment."""
    edges = sorted(
        [(w.opened, 1) for w in watches] + [(w.closed, -1) for w in watches],
        key=lambda edge: (edge[0], edge[1]),
    )
    current = peak = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


async def deployments_done(ours: Server) -> int:
    text = await asyncio.to_thread(scrape, ours.metrics_port)
    return sum(
        value
        for key, value in counters(text).items()
        if key.startswith("bms_image_deployments_total{") and 'outcome="active"' in key
    )


async def measure_streams(ours: Server, metadata: Metadata, plan: Plan) -> dict[str, Any]:
    """`plan.servers` deployments followed by as many WatchServer streams."""
    provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(ours.channel)
    warm = await deploy(provisioning, metadata, deploy_request(1, "bench-warm"))
    if len(warm.active) != 1:  # the request itself must be right: that is ours to get right
        raise BenchError(f"warm-up deployment: {warm}")
    pid = ours.process.pid
    await asyncio.sleep(1.0)
    with RssSampler(pid) as idle_sampler:
        await asyncio.sleep(1.0)
    idle = int(statistics.median(idle_sampler.samples))
    hwm_before = read_status(pid)["VmHWM"]
    before, deployed_before = await call_counts(ours), await deployments_done(ours)
    watches: dict[str, Watch] = {}
    tasks: list[asyncio.Task[None]] = []
    sizes = [min(BATCH, plan.servers - start) for start in range(0, plan.servers, BATCH)]
    cpu, started = cpu_seconds(pid), time.perf_counter()
    calls = [
        deploy(provisioning, metadata, deploy_request(size, f"bench-{index}"), watches, tasks)
        for index, size in enumerate(sizes)
    ]
    with RssSampler(pid) as sampler:
        batches = await asyncio.wait_for(asyncio.gather(*calls), STREAMS_TIMEOUT)
        await asyncio.wait_for(asyncio.gather(*tasks), STREAMS_TIMEOUT)
    wall, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    hwm_after = read_status(pid)["VmHWM"]
    peak = max(sampler.peak, hwm_after if hwm_after > hwm_before else 0)
    after, deployed = await call_counts(ours), await deployments_done(ours) - deployed_before
    watched = after[f"{PROVISIONING_SERVICE}/WatchServer OK"]
    watched -= before[f"{PROVISIONING_SERVICE}/WatchServer OK"]
    figures = streams_figures(plan, batches, list(watches.values()), {
        "wall_seconds": wall, "server_cpu_seconds": cpu, "idle_bytes": idle, "peak_bytes": peak,
        "deployments_counted_active": deployed, "watch_calls_counted_ok": watched,
    })  # fmt: skip
    if figures["all_active"] and (deployed != plan.servers or watched != len(watches)):
        raise BenchError(
            f"ours: the client saw {plan.servers} servers ACTIVE through {len(watches)} watch "
            f"streams, the server counted {deployed} deployments and {watched} WatchServer OK"
        )
    return figures


def streams_figures(
    plan: Plan, batches: list[Batch], watches: list[Watch], measured: dict[str, Any]
) -> dict[str, Any]:
    errors = Counter(w.error.split(":")[0] for w in watches if w.error)
    errors.update(f"CreateServers {b.error.split(':')[0]}" for b in batches if b.error)
    failed = {name: reason for batch in batches for name, reason in batch.failed.items()}
    reached = sum(1 for w in watches if w.last_stage == "ACTIVE" and not w.error)
    growth = measured["peak_bytes"] - measured["idle_bytes"]
    figures = {
        "servers": plan.servers,
        "batches": len(batches),
        "watch_streams": len(watches),
        "watch_reached_active": reached,
        "watch_attached_in_progress": sum(1 for w in watches if w.events > 1),
        "watch_attached_after_end": sum(1 for w in watches if w.events == 1),
        "peak_open_watch_streams": peak_open(watches),
        "watch_events": sum(w.events for w in watches),
        "create_servers_events": sum(b.events for b in batches),
        "servers_active_per_create_streams": sum(len(b.active) for b in batches),
        "servers_failed": len(failed),
        "failed_reasons": dict(Counter(failed.values()).most_common(5)),
        "errors": dict(errors),
        # streams that ended OK but not on ACTIVE: what they ended with
        "ended_short_of_active": dict(
            Counter(
                f"{w.events} event(s), {w.first_stage} .. {w.last_stage}"
                for w in watches
                if w.last_stage != "ACTIVE" and not w.error
            )
        ),
        "first_error": next((w.error for w in watches if w.error), "")
        or next((b.error for b in batches if b.error), ""),
        **measured,
        "idle_mib": measured["idle_bytes"] / MIB,
        "peak_mib": measured["peak_bytes"] / MIB,
        "growth_mib": growth / MIB,
        "kib_per_stream_upper_bound": growth / 1024 / max(1, len(watches)),
    }
    figures["all_active"] = (
        reached == plan.servers == len(watches)
        and not errors
        and not failed
        and figures["servers_active_per_create_streams"] == plan.servers
    )
    return figures


# -- the run ---------------------------------------------------------------------------


async def connect(label: str, process: ServerProcess, metrics_port: int = 0) -> Server:
    channel = grpc.aio.insecure_channel(process.address, options=CLIENT_OPTIONS)
    await channel.channel_ready()
    return Server(label, process, channel, image_pb2_grpc.ImageServiceStub(channel), metrics_port)


async def replies_for_bare(ours: Server, metadata: Metadata) -> tuple[bytes, bytes]:
    """What bare will echo: ours' GetImage of CentOS and a CreateImage reply
    (that image deleted again)."""
    image = await ours.images.GetImage(
        image_pb2.GetImageRequest(name=CENTOS), metadata=metadata, timeout=CALL_TIMEOUT
    )
    if image.status != image_pb2.IMAGE_STATUS_ACTIVE or f"flavors/{FLAVOR}" not in list(
        image.supported_flavors
    ):
        raise BenchError(f"ours: {CENTOS} is not an active public image for {FLAVOR}: {image}")
    created = await ours.images.CreateImage(
        new_image_request(), metadata=metadata, timeout=CALL_TIMEOUT
    )
    await ours.images.DeleteImage(
        image_pb2.DeleteImageRequest(name=created.name), metadata=metadata, timeout=CALL_TIMEOUT
    )
    return image.SerializeToString(), created.SerializeToString()


@dataclass
class Setup:
    """Both servers up, and what the calls need."""

    ours: Server
    bare: Server
    token: str
    metadata: Metadata
    reply_bytes: dict[str, int]
    #: Call metadata of tenant projects that see other sets than PROJECT.
    tenants: list[Metadata]


async def start(
    workdir: Path, started: list[ServerProcess], pin: set[int] | None, servers: list[Server]
) -> Setup:
    """Starts ours, takes the replies bare will echo from it, starts bare.
    Every process goes to `started`, every connection to `servers`, at once
    (so that whatever happens they are stopped and closed)."""
    metrics_port = free_port()
    env = ours_env(workdir, metrics_port)
    process = launch("ours", [str(BIN / "bms-image"), "serve"], env, workdir / "ours.log", pin)
    started.append(process)
    await wait_listening(process, "bms-image listening on", pin)
    token = await issue_token(env, workdir / "data")
    metadata: Metadata = (("authorization", f"Bearer {token}"),)
    tenants: list[Metadata] = [
        (("authorization", f"Bearer {await issue_token(env, workdir / 'data', project)}"),)
        for project in LIST_TENANTS
    ]
    ours = await connect("ours", process, metrics_port)
    servers.append(ours)
    get_reply, create_reply = await replies_for_bare(ours, metadata)
    bare_process = start_bare(workdir, get_reply, create_reply, pin)
    started.append(bare_process)
    await wait_listening(bare_process, "bare listening on", pin)
    bare = await connect("bare", bare_process)
    servers.append(bare)
    replies = {"get_image": len(get_reply), "create_image": len(create_reply)}
    return Setup(ours, bare, token, metadata, replies, tenants)


async def measure(plan: Plan, workdir: Path, setup: Setup) -> dict[str, Any]:
    ours, servers, metadata = setup.ours, [setup.ours, setup.bare], setup.metadata
    print(f"ListImages, {PAGE_SIZE} a page, {LIST_FILTER!r}, one call at a time "
          "(grpc.aio client):")  # fmt: skip
    print(f"  store: {PUBLIC_SHARE:.0%} public images (2-4 flavors each, "
          f"{DEPRECATED_SHARE:.0%} of them deprecated), the rest private images of "
          f"{TENANTS:,} projects ({SHARED_SHARE:.0%} shared with {PROJECT}, which owns "
          f"{OWN_IMAGES}): the caller sees most of the store and every page is full, the "
          "heavy case for building a page")  # fmt: skip
    listing = await measure_listing(
        ours, metadata, setup.tenants, workdir / "data" / "bms-image.db", plan
    )
    print(f"GetImage {CENTOS}, h2load -c 1 -m {H2_STREAMS}, {plan.get_rounds} round(s):")
    gets = await measure_get(servers, setup.token, plan, workdir)
    print(f"CreateImage + DeleteImage, {WORKERS} workers (grpc.aio client):")
    own = listing[str(plan.large_store)]["caller_own_images"]
    pairs = await measure_pairs(servers, metadata, plan, own)
    print(f"{plan.servers} WatchServer streams following {plan.servers} EVS deployments "
          f"({len(range(0, plan.servers, BATCH))} CreateServers calls):")  # fmt: skip
    streams = await measure_streams(ours, metadata, plan)
    print(f"  {streams['watch_reached_active']}/{streams['watch_streams']} reached ACTIVE "
          f"in {streams['wall_seconds']:.1f} s; {streams['watch_events']} events; "
          f"peak {streams['peak_open_watch_streams']} open at once; RSS "
          f"{streams['idle_mib']:.1f} -> {streams['peak_mib']:.1f} MiB")  # fmt: skip
    return {
        "get_image": {label: summarize_get(r) for label, r in gets.items()},
        "list_images": listing,
        "create_delete": {label: summarize_pairs(r) for label, r in pairs.items()},
        "streams": streams,
        "reply_bytes": setup.reply_bytes,
        "server_peak_rss_mib": {
            s.label: read_status(s.process.pid)["VmHWM"] / MIB for s in servers
        },
    }


async def run(
    plan: Plan, workdir: Path, started: list[ServerProcess], pin: set[int] | None
) -> dict[str, Any]:
    if shutil.which("h2load") is None:
        raise BenchError("h2load not found: apt-get install nghttp2-client (make bench does)")
    servers: list[Server] = []
    try:
        return await measure(plan, workdir, await start(workdir, started, pin, servers))
    finally:
        for server in servers:
            await server.channel.close()


def verdicts(plan: Plan, figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    get, pairs, streams = figures["get_image"], figures["create_delete"], figures["streams"]
    small = figures["list_images"][str(plan.small_store)]
    large = figures["list_images"][str(plan.large_store)]
    get_ratio = get["ours"]["median_qps"] / get["bare"]["median_qps"]
    pair_ratio = pairs["ours"]["pairs_per_s"] / pairs["bare"]["pairs_per_s"]
    growth = large["p50_ms"] / small["p50_ms"]
    return {
        "get_image_qps": {"ratio": get_ratio, "target": f">= {GET_TARGET:.2f}",
                          "ok": get_ratio >= GET_TARGET},
        "list_large_p99": {"p99_ms": large["p99_ms"], "target": f"<= {LIST_P99_TARGET_MS:.0f} ms",
                           "ok": large["p99_ms"] <= LIST_P99_TARGET_MS},
        "list_large_cpu": {"cpu_ms": large["server_cpu_ms_per_call"],
                           "target": f"<= {LIST_CPU_TARGET_MS:.0f} ms/call",
                           "ok": large["server_cpu_ms_per_call"] <= LIST_CPU_TARGET_MS},
        "list_p50_growth": {"ratio": growth, "target": f"<= {LIST_GROWTH_TARGET:.1f}x",
                            "ok": growth <= LIST_GROWTH_TARGET},
        "create_delete_pairs": {"ratio": pair_ratio, "target": f">= {PAIRS_TARGET:.2f}",
                                "ok": pair_ratio >= PAIRS_TARGET},
        "streams_all_active": {"target": f"{plan.servers}/{plan.servers} ACTIVE, no error",
                               "ok": streams["all_active"]},
    }  # fmt: skip


def _count(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else f"{size:,}"


def table(plan: Plan, figures: dict[str, Any], checks: dict[str, dict[str, Any]]) -> str:
    get, pairs, streams = figures["get_image"], figures["create_delete"], figures["streams"]
    small = figures["list_images"][str(plan.small_store)]
    large = figures["list_images"][str(plan.large_store)]
    go, gb, po, pb = get["ours"], get["bare"], pairs["ours"], pairs["bare"]

    def ok(name: str) -> str:
        return "ok" if checks[name]["ok"] else "MISSED"

    rows = [
        ("what", "ours", "bare", "ratio", "target", "ok"),
        (f"GetImage QPS, h2load 1 conn x {H2_STREAMS} streams (median)",
         f"{go['median_qps']:.0f}", f"{gb['median_qps']:.0f}",
         f"{checks['get_image_qps']['ratio']:.2f}", checks["get_image_qps"]["target"],
         ok("get_image_qps")),
        ("GetImage p50 / p99, ms", f"{go['p50_ms']:.1f} / {go['p99_ms']:.1f}",
         f"{gb['p50_ms']:.1f} / {gb['p99_ms']:.1f}", "", "", ""),
        ("GetImage server CPU, µs/call", f"{go['server_cpu_us_per_call']:.0f}",
         f"{gb['server_cpu_us_per_call']:.0f}", "", "(info)", ""),
        (f"ListImages {PAGE_SIZE}/page, rotation, {_count(plan.small_store)} stored, "
         "p50 / p99 ms", f"{small['p50_ms']:.1f} / {small['p99_ms']:.1f}", "", "", "", ""),
        (f"ListImages, {_count(plan.large_store)} stored, p50 / p99 ms",
         f"{large['p50_ms']:.1f} / {large['p99_ms']:.1f}", "", "",
         checks["list_large_p99"]["target"] + " (p99)", ok("list_large_p99")),
        (f"ListImages server CPU, {_count(plan.large_store)} stored, ms/call (warm-up)",
         f"{large['server_cpu_ms_per_call']:.2f} ({large['warmup_server_cpu_ms_per_call']:.2f})",
         "", "", checks["list_large_cpu"]["target"], ok("list_large_cpu")),
        (f"ListImages p50 {_count(plan.large_store)} / {_count(plan.small_store)}",
         f"{checks['list_p50_growth']['ratio']:.2f}x", "", "",
         checks["list_p50_growth"]["target"], ok("list_p50_growth")),
        (f"CreateImage+DeleteImage pairs/s, {WORKERS} workers", f"{po['pairs_per_s']:.1f}",
         f"{pb['pairs_per_s']:.1f}", f"{checks['create_delete_pairs']['ratio']:.2f}",
         checks["create_delete_pairs"]["target"], ok("create_delete_pairs")),
        ("create+delete p50 / p99, ms", f"{po['p50_ms']:.1f} / {po['p99_ms']:.1f}",
         f"{pb['p50_ms']:.1f} / {pb['p99_ms']:.1f}", "", "", ""),
        ("create+delete server CPU, ms/pair", f"{po['server_cpu_ms_per_pair']:.2f}",
         f"{pb['server_cpu_ms_per_pair']:.2f}", "", "(info)", ""),
        (f"{plan.servers} WatchServer streams reaching ACTIVE",
         f"{streams['watch_reached_active']}/{streams['watch_streams']}", "", "",
         "all, no error", ok("streams_all_active")),
        ("  streams: peak open at once / attached after the end",
         f"{streams['peak_open_watch_streams']} / {streams['watch_attached_after_end']}",
         "", "", "(info)", ""),
        ("  events (watch streams), wall s",
         f"{streams['watch_events']}, {streams['wall_seconds']:.1f} s", "", "", "(info)", ""),
        ("  server RSS idle -> peak, MiB",
         f"{streams['idle_mib']:.1f} -> {streams['peak_mib']:.1f}", "", "", "", ""),
        ("  memory per stream (upper bound), KiB",
         f"{streams['kib_per_stream_upper_bound']:.1f}", "", "", "(info)", ""),
        ("server peak RSS over the whole run (VmHWM), MiB",
         f"{figures['server_peak_rss_mib']['ours']:.1f}",
         f"{figures['server_peak_rss_mib']['bare']:.1f}", "", "", ""),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: tuple[str, ...]) -> str:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def make_plan(args: argparse.Namespace) -> Plan:
    quick = bool(args.quick)
    return Plan(
        mode="quick" if quick else "full",
        get_seconds=args.get_seconds or (2.0 if quick else 5.0),
        get_rounds=1 if quick else 3,
        small_store=1000,
        large_store=args.images or (20_000 if quick else 100_000),
        list_requests=50 if quick else 200,
        list_seconds=5.0 if quick else 15.0,
        pair_seconds=args.pair_seconds or (3.0 if quick else 8.0),
        servers=args.servers or (100 if quick else 1000),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metadata",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="20k images, 1 round, 100 streams")
    parser.add_argument("--images", type=int, help="images stored for the large listing")
    parser.add_argument("--servers", type=int, help="deployments and WatchServer streams")
    parser.add_argument("--get-seconds", type=float, help="length of each h2load run")
    parser.add_argument("--pair-seconds", type=float, help="length of each create/delete run")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place client and servers"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    if args.images is not None and args.images <= 1000:
        parser.error("--images must be more than 1000 (the small store)")
    return args


def report(plan: Plan, results: dict[str, Any], output: Path) -> None:
    streams = results["streams"]
    notes = ""
    if streams["errors"] or streams["servers_failed"] or streams["ended_short_of_active"]:
        notes = (f"streams: errors {streams['errors']}, FAILED deployments "
                 f"{streams['servers_failed']} {streams['failed_reasons']}, watch streams that "
                 f"ended OK short of ACTIVE {streams['ended_short_of_active']}; "
                 f"first error: {streams['first_error'] or '-'}")  # fmt: skip
    publish(output, results, table(plan, results, results["checks"]), notes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    load_before = os.getloadavg()
    host = machine()  # before we pin ourselves
    placement = place(args.no_pin)
    client_cpus, server_cpus = placement.client_cpus, placement.server_cpus
    server_pin = placement.server_pin
    servers: list[ServerProcess] = []
    restore = _interruptible(servers)
    workdir = Path(tempfile.mkdtemp(prefix="bms-image-metadata-", dir="/tmp"))
    started = time.monotonic()
    print(
        f"bms-image metadata benchmark ({plan.mode}): client on cpus {sorted(client_cpus)}, "
        f"servers on cpus {sorted(server_cpus)}, work dir {workdir}",
        flush=True,
    )
    try:
        figures = asyncio.run(run(plan, workdir, servers, server_pin))
    except KeyboardInterrupt:
        print("interrupted: servers stopped, work dir removed", file=sys.stderr)
        return 130
    except (BenchError, grpc.RpcError, OSError, TimeoutError) as error:
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        for log in sorted(workdir.glob("*.log")):
            if log.name.startswith("h2load"):
                continue
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            print(f"--- {log.name} (last lines)\n{tail}", file=sys.stderr)
        return 1
    finally:
        for server in reversed(servers):
            server.stop()
        restore()
        shutil.rmtree(workdir, ignore_errors=True)
    checks = verdicts(plan, figures)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": plan.mode,
        "machine": host,
        "plan": {**asdict(plan), "page_size": PAGE_SIZE, "filter": LIST_FILTER,
                 "h2load_streams": H2_STREAMS, "workers": WORKERS, "caller": PROJECT,
                 "get_image": CENTOS,
                 "store_shape": {"public": PUBLIC_SHARE, "public_deprecated": DEPRECATED_SHARE,
                                 "private_shared_with_caller": SHARED_SHARE,
                                 "caller_own_images": OWN_IMAGES, "tenants": TENANTS},
                 "list_client": "grpc.aio, one call at a time, first page, client-side time",
                 "get_client": "h2load, times from --log-file"},
        "pinning": placement.as_json(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "elapsed_seconds": round(time.monotonic() - started, 1),
        **figures,
        "checks": checks,
        "missed": [name for name, check in checks.items() if not check["ok"]],
    }  # fmt: skip
    report(plan, results, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
