"""`make bench`: the data-plane benchmark of bms-image against a bare baseline.

In one run it starts two servers, each in its own process and pinned to a
core other than this client's (so that client and server never share a GIL
or a core):

- ours: the real service, `<venv>/bin/bms-image serve`, on a temporary data
  directory (local blobs, SQLite), exactly as it ships;
- bare: `bench.bare`, a grpc.aio server with the same transport options that
  only counts uploaded bytes and streams downloads from memory (its glibc heap
  trimming is turned off, and so is this client's: see bench.bare.tune_malloc).

It then measures, with the same client code against both:

1. server RSS (VmRSS sampled every 50 ms, and VmHWM) while an image of
   `--rss-size` bytes is uploaded and then downloaded: idle, peak, growth;
2. upload throughput of a `--size` image (SHA-256 declared up front, so ours
   verifies it), median of `--repeats` runs, ours and bare interleaved;
3. download throughput of that image, the client hashing what it receives and
   checking it against the SHA-256 of the last message (for both servers).

Besides MB/s it records the CPU seconds per GiB of each server and of the
client (from /proc and getrusage): those hardly move when other processes
compete for the machine, the MB/s do.

It prints one table and writes every figure to .bench/dataplane.json. A
missed target is reported as MISSED and still exits 0; anything that breaks
(a server that does not start, a wrong digest, an RPC error) exits 1.

    python -m bench.dataplane            # 1 GiB throughput, 4 GiB RSS, 5 runs
    python -m bench.dataplane --quick    # 256 MiB, 512 MiB, 3 runs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import google.protobuf
import grpc

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.common.config import Settings

from .bare import NAME_PREFIX, iter_payload, payload_block, payload_sha256, tune_malloc

MIB = 1024 * 1024
GIB = 1024 * MIB
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / ".bench" / "dataplane.json"
BIN = Path(sys.executable).parent
WARMUP_BYTES = 8 * MIB
SAMPLE_SECONDS = 0.05
START_TIMEOUT = 90.0
UPLOAD_TARGET = 0.70
DOWNLOAD_TARGET = 0.80
RSS_GROWTH_TARGET_MIB = 100.0
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * MIB),
    ("grpc.max_send_message_length", 8 * MIB),
]

Metadata = tuple[tuple[str, str], ...]


class BenchError(RuntimeError):
    """Something broke: the run is invalid (exit 1)."""


# -- processes, cores, memory ------------------------------------------------


def _cores() -> tuple[set[int], set[int]]:
    """(client cores, server cores): disjoint when this machine allows it."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return {available[0]}, set(available[1:])


@dataclass(frozen=True)
class Placement:
    """Where the client (this process) and the servers run."""

    client_cpus: set[int]
    server_cpus: set[int]
    #: Disjoint cores: this process is pinned to client_cpus, servers go to server_cpus.
    pinning: bool

    @property
    def server_pin(self) -> set[int] | None:
        return self.server_cpus if self.pinning else None

    def as_json(self) -> dict[str, Any]:
        pin = self.server_pin
        return {
            "client_cpus": sorted(self.client_cpus),
            "server_cpus": sorted(pin) if pin else None,
        }


def place(no_pin: bool) -> Placement:
    """Pins this process (the client) to its own cores when the machine has
    two or more, unless no_pin: then everything shares every core."""
    client_cpus, server_cpus = _cores()
    if no_pin:
        client_cpus = server_cpus = set(os.sched_getaffinity(0))
    pinning = client_cpus.isdisjoint(server_cpus)
    if pinning:
        pin_process(os.getpid(), client_cpus)
    return Placement(client_cpus, server_cpus, pinning)


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pins every thread of `pid` (sched_setaffinity on a pid moves only
    its main thread; threads started later inherit from their creator)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def own_cpu_seconds() -> float:
    """User + system CPU time of this (the client) process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples VmRSS of a process every 50 ms in a background thread."""

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(read_status(self.pid)["VmRSS"])
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


@dataclass
class ServerProcess:
    label: str
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL to its process group, at once (safe in a signal handler)."""
        if self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after a few seconds."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        except ProcessLookupError:
            pass


def launch(
    label: str,
    argv: list[str],
    env: dict[str, str],
    log_path: Path,
    cpus: set[int] | None,
) -> ServerProcess:
    """Starts a server in its own session (Ctrl-C reaches only us; we stop it)."""
    if cpus is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ServerProcess(label, process, log_path)


async def wait_listening(server: ServerProcess, marker: str, cpus: set[int] | None) -> None:
    """Waits for `<marker> <host:port>` in the server's output."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(
                f"{server.label} server exited with {server.process.returncode}:\n"
                + server.log_tail()
            )
        for line in server.log_path.read_text(errors="replace").splitlines():
            if line.startswith(marker):
                server.address = line.removeprefix(marker).strip()
                if cpus is not None:
                    pin_process(server.pid, cpus)
                return
        await asyncio.sleep(0.1)
    raise BenchError(f"{server.label} server did not listen within {START_TIMEOUT:.0f}s")


# -- the client ----------------------------------------------------------------


@dataclass
class Transfer:
    """One timed call."""

    seconds: float
    bytes: int
    server_cpu_seconds: float
    client_cpu_seconds: float
    #: Upload only: from the last chunk handed to gRPC to the reply (the
    #: server finishing: flushing, verifying, storing).
    tail_seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


@dataclass
class Target:
    """One server as the client sees it."""

    label: str
    server: ServerProcess
    stub: Any  # image_pb2_grpc.ImageServiceStub (untyped generated code)
    metadata: Metadata
    images: list[str] = field(default_factory=list)


async def upload(target: Target, name: str, block: bytes, size: int, digest: str) -> Transfer:
    chunk_bytes = Settings().chunk_bytes

    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(
                name=name, size_bytes=size, sha256=digest, disk_format=image_pb2.DISK_FORMAT_RAW
            )
        )
        for chunk in iter_payload(block, size, chunk_bytes):
            yield image_pb2.UploadImageDataRequest(chunk=chunk)
        sent.append(time.perf_counter())

    sent: list[float] = []
    cpu, client_cpu = cpu_seconds(target.server.pid), own_cpu_seconds()
    started = time.perf_counter()
    reply = await target.stub.UploadImageData(requests(), metadata=target.metadata)
    finished = time.perf_counter()
    seconds = finished - started
    cpu, client_cpu = cpu_seconds(target.server.pid) - cpu, own_cpu_seconds() - client_cpu
    if reply.size_bytes != size:
        raise BenchError(f"{target.label}: uploaded {size} bytes, server says {reply.size_bytes}")
    if target.label == "ours" and reply.sha256 != digest:
        raise BenchError(f"ours: stored SHA-256 {reply.sha256}, sent {digest}")
    return Transfer(seconds, size, cpu, client_cpu, finished - sent[-1] if sent else 0.0)


async def download(target: Target, name: str, size: int) -> Transfer:
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
        chunk = message.chunk
        digest.update(chunk)
        received += len(chunk)
    seconds = time.perf_counter() - started
    cpu, client_cpu = cpu_seconds(target.server.pid) - cpu, own_cpu_seconds() - client_cpu
    if last is None:
        raise BenchError(f"{target.label}: the download ended without a last message")
    if received != size or last.size_bytes != size:
        raise BenchError(f"{target.label}: received {received} of {size} bytes")
    if last.sha256 != digest.hexdigest():
        raise BenchError(
            f"{target.label}: received bytes hash to {digest.hexdigest()}, "
            f"the last message says {last.sha256}"
        )
    return Transfer(seconds, size, cpu, client_cpu)


async def issue_token(env: dict[str, str], data_dir: Path, project: str = "bench") -> str:
    """`bms-image token --project <project>` with the server's data dir (its secret)."""
    argv = [str(BIN / "bms-image"), "token", "--project", project, "--data-dir", str(data_dir)]
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise BenchError(f"bms-image token failed: {err.decode(errors='replace')}")
    return out.decode().strip()


async def hardware_model(channel: grpc.aio.Channel, metadata: Metadata) -> str:
    stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
    reply = await stub.ListFlavors(provisioning_pb2.ListFlavorsRequest(), metadata=metadata)
    for flavor in reply.flavors:
        if flavor.hardware_model:
            return str(flavor.hardware_model)
    raise BenchError("ours: the catalog has no flavors to take a hardware model from")


async def new_image(target: Target, model: str, size: int) -> str:
    """A queued private image on ours; a `bare/<size>` name on bare."""
    if target.label == "bare":
        return f"{NAME_PREFIX}{size}"
    image = await target.stub.CreateImage(
        image_pb2.CreateImageRequest(
            image=image_pb2.Image(
                display_name=f"bench-{size // MIB}mib",
                description="data-plane benchmark",
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


async def delete_images(target: Target) -> None:
    """Frees the disk between phases."""
    while target.images:
        name = target.images.pop()
        await target.stub.DeleteImage(
            image_pb2.DeleteImageRequest(name=name), metadata=target.metadata
        )


# -- phases --------------------------------------------------------------------


@dataclass
class RssFigures:
    idle_bytes: int
    peak_bytes: int
    vmhwm_before_bytes: int
    vmhwm_after_bytes: int
    samples: int
    upload_peak_bytes: int
    download_peak_bytes: int
    after_bytes: int
    upload_mb_s: float
    download_mb_s: float

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.idle_bytes


async def measure_rss(
    target: Target, model: str, block: bytes, size: int, digests: dict[int, str]
) -> RssFigures:
    """Idle RSS (median over 1 s after a warm-up), then the peak while `size`
    bytes are uploaded and downloaded. A VmHWM that rose during the transfer
    counts as a peak too (it catches spikes between two samples)."""
    pid = target.server.pid
    await asyncio.sleep(0.5)
    with RssSampler(pid) as idle:
        await asyncio.sleep(1.0)
    idle_bytes = int(statistics.median(idle.samples))
    hwm_before = read_status(pid)["VmHWM"]
    name = await new_image(target, model, size)
    with RssSampler(pid) as uploading:
        up = await upload(target, name, block, size, digests[size])
    with RssSampler(pid) as downloading:
        down = await download(target, name, size)
    status = read_status(pid)
    hwm_after = status["VmHWM"]
    peak = max(uploading.peak, downloading.peak, hwm_after if hwm_after > hwm_before else 0)
    await delete_images(target)
    return RssFigures(
        idle_bytes=idle_bytes,
        peak_bytes=peak,
        vmhwm_before_bytes=hwm_before,
        vmhwm_after_bytes=hwm_after,
        samples=len(uploading.samples) + len(downloading.samples),
        upload_peak_bytes=uploading.peak,
        download_peak_bytes=downloading.peak,
        after_bytes=status["VmRSS"],
        upload_mb_s=up.mb_per_s,
        download_mb_s=down.mb_per_s,
    )


async def measure_throughput(
    targets: list[Target], model: str, block: bytes, size: int, digest: str, repeats: int
) -> tuple[dict[str, list[Transfer]], dict[str, list[Transfer]]]:
    """`repeats` uploads then `repeats` downloads per target, the order of the
    targets alternating from one run to the next."""
    uploads: dict[str, list[Transfer]] = {t.label: [] for t in targets}
    downloads: dict[str, list[Transfer]] = {t.label: [] for t in targets}
    kept: dict[str, str] = {}
    for run in range(repeats):
        for target in targets if run % 2 == 0 else targets[::-1]:
            name = await new_image(target, model, size)
            transfer = await upload(target, name, block, size, digest)
            uploads[target.label].append(transfer)
            print(
                f"  upload   {target.label:4} run {run + 1}: {transfer.mb_per_s:7.1f} MB/s "
                f"({transfer.seconds:.2f} s, of which {transfer.tail_seconds:.2f} s after the "
                f"last chunk; CPU server {transfer.server_cpu_seconds:.2f} s, "
                f"client {transfer.client_cpu_seconds:.2f} s)"
            )
            if target.label not in kept:
                kept[target.label] = name
            elif target.images:  # keep one image for the downloads, free the disk
                await target.stub.DeleteImage(
                    image_pb2.DeleteImageRequest(name=target.images.pop()),
                    metadata=target.metadata,
                )
    for run in range(repeats):
        for target in targets if run % 2 == 0 else targets[::-1]:
            transfer = await download(target, kept[target.label], size)
            downloads[target.label].append(transfer)
            print(
                f"  download {target.label:4} run {run + 1}: {transfer.mb_per_s:7.1f} MB/s "
                f"({transfer.seconds:.2f} s; CPU server {transfer.server_cpu_seconds:.2f} s, "
                f"client {transfer.client_cpu_seconds:.2f} s)"
            )
    for target in targets:
        await delete_images(target)
    return uploads, downloads


# -- the run -------------------------------------------------------------------


@dataclass
class Plan:
    mode: str
    size: int
    rss_size: int
    repeats: int
    bare_default_malloc: bool = False


def summarize(transfers: list[Transfer]) -> dict[str, Any]:
    return {
        "median_mb_s": statistics.median(t.mb_per_s for t in transfers),
        "best_mb_s": max(t.mb_per_s for t in transfers),
        "runs_mb_s": [round(t.mb_per_s, 1) for t in transfers],
        "runs_seconds": [round(t.seconds, 3) for t in transfers],
        "runs_server_cpu_seconds": [round(t.server_cpu_seconds, 2) for t in transfers],
        "runs_client_cpu_seconds": [round(t.client_cpu_seconds, 2) for t in transfers],
        "client_cpu_seconds_per_gib": statistics.median(
            t.client_cpu_seconds / (t.bytes / GIB) for t in transfers
        ),
        "runs_tail_seconds": [round(t.tail_seconds, 3) for t in transfers],
        "server_cpu_seconds_per_gib": statistics.median(
            t.server_cpu_seconds / (t.bytes / GIB) for t in transfers
        ),
    }


def _rss_dict(figures: RssFigures) -> dict[str, Any]:
    values = asdict(figures)
    values["growth_bytes"] = figures.growth_bytes
    for key in (
        "idle", "peak", "growth", "vmhwm_before", "vmhwm_after",
        "upload_peak", "download_peak", "after",
    ):  # fmt: skip
        values[f"{key}_mib"] = round(values[f"{key}_bytes"] / MIB, 1)
    return values


def _human(size: int) -> str:
    return f"{size // GIB} GiB" if size % GIB == 0 else f"{size // MIB} MiB"


def _sizes(plan: Plan) -> list[int]:
    return sorted({WARMUP_BYTES, plan.size, plan.rss_size})


def server_env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BMS_IMAGE_LISTEN": "127.0.0.1:0",  # any free port; the service prints the one it got
        "BMS_IMAGE_DATA_DIR": str(workdir / "data"),
        "BMS_IMAGE_CATALOG_IMAGE_MIB": "1",
        "BMS_IMAGE_SHUTDOWN_GRACE_SECONDS": "2",
        "BMS_IMAGE_BLOB_BACKEND": "local",
        "BMS_IMAGE_DATABASE_URL": "",
        "PYTHONUNBUFFERED": "1",
    }


def start_servers(
    plan: Plan, workdir: Path, server_pin: set[int] | None, started: list[ServerProcess]
) -> tuple[ServerProcess, ServerProcess]:
    """Launches ours and bare, appending each to `started` at once (so that
    an interrupt at any moment finds every process to stop)."""
    env = server_env(workdir)
    ours = launch("ours", [str(BIN / "bms-image"), "serve"], env, workdir / "ours.log", server_pin)
    started.append(ours)
    bare_argv = [sys.executable, "-m", "bench.bare", "--sizes", ",".join(map(str, _sizes(plan)))]
    if plan.bare_default_malloc:
        bare_argv.append("--default-malloc")
    bare = launch("bare", bare_argv, env, workdir / "bare.log", server_pin)
    started.append(bare)
    return ours, bare


async def run(
    plan: Plan,
    workdir: Path,
    ours: ServerProcess,
    bare: ServerProcess,
    client_cpus: set[int],
    server_pin: set[int] | None,
) -> dict[str, Any]:
    env = server_env(workdir)
    data_dir = workdir / "data"
    sizes = _sizes(plan)
    block = payload_block()
    # Hash the payloads here while the servers start over there.
    hashing = asyncio.gather(*(asyncio.to_thread(payload_sha256, block, size) for size in sizes))
    try:
        await wait_listening(ours, "bms-image listening on", server_pin)
        await wait_listening(bare, "bare listening on", server_pin)
    except BaseException:
        hashing.cancel()
        raise
    digests = dict(zip(sizes, await hashing, strict=True))
    token = await issue_token(env, data_dir)
    metadata: Metadata = (("authorization", f"Bearer {token}"),)
    async with (
        grpc.aio.insecure_channel(ours.address, options=CLIENT_OPTIONS) as ours_channel,
        grpc.aio.insecure_channel(bare.address, options=CLIENT_OPTIONS) as bare_channel,
    ):
        targets = [
            Target("ours", ours, image_pb2_grpc.ImageServiceStub(ours_channel), metadata),
            Target("bare", bare, image_pb2_grpc.ImageServiceStub(bare_channel), metadata),
        ]
        model = await hardware_model(ours_channel, metadata)
        for target in targets:  # connect, start thread pools, touch every code path
            name = await new_image(target, model, WARMUP_BYTES)
            await upload(target, name, block, WARMUP_BYTES, digests[WARMUP_BYTES])
            await download(target, name, WARMUP_BYTES)
            await delete_images(target)

        print(f"RSS while moving {_human(plan.rss_size)} (upload, then download):")
        rss = {}
        for target in targets:
            rss[target.label] = figures = await measure_rss(
                target, model, block, plan.rss_size, digests
            )
            print(
                f"  {target.label:4}: idle {figures.idle_bytes / MIB:.1f} MiB, "
                f"peak {figures.peak_bytes / MIB:.1f} MiB (uploading "
                f"{figures.upload_peak_bytes / MIB:.1f}, downloading "
                f"{figures.download_peak_bytes / MIB:.1f}), growth "
                f"{figures.growth_bytes / MIB:.1f} MiB, after {figures.after_bytes / MIB:.1f} MiB"
            )
        print(f"throughput, {_human(plan.size)}, {plan.repeats} runs each:")
        uploads, downloads = await measure_throughput(
            targets, model, block, plan.size, digests[plan.size], plan.repeats
        )
    return {
        "pinning": {
            "client_cpus": sorted(client_cpus),
            "server_cpus": sorted(server_pin) if server_pin else None,
        },
        "upload": {label: summarize(t) for label, t in uploads.items()},
        "download": {label: summarize(t) for label, t in downloads.items()},
        "rss": {label: _rss_dict(f) for label, f in rss.items()},
    }


def verdicts(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    up, down, rss = figures["upload"], figures["download"], figures["rss"]
    up_ratio = up["ours"]["median_mb_s"] / up["bare"]["median_mb_s"]
    down_ratio = down["ours"]["median_mb_s"] / down["bare"]["median_mb_s"]
    growth = rss["ours"]["growth_bytes"] / MIB
    return {
        "upload": {"ratio": up_ratio, "target": f">= {UPLOAD_TARGET:.2f}",
                   "ok": up_ratio >= UPLOAD_TARGET},
        "download": {"ratio": down_ratio, "target": f">= {DOWNLOAD_TARGET:.2f}",
                     "ok": down_ratio >= DOWNLOAD_TARGET},
        "rss_growth": {"ours_mib": growth, "target": f"< {RSS_GROWTH_TARGET_MIB:.0f} MiB",
                       "ok": growth < RSS_GROWTH_TARGET_MIB},
    }  # fmt: skip


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "-"


def table(plan: Plan, figures: dict[str, Any], checks: dict[str, dict[str, Any]]) -> str:
    up, down, rss = figures["upload"], figures["download"], figures["rss"]

    def ok(check: dict[str, Any]) -> str:
        return "ok" if check["ok"] else "MISSED"

    rows = [
        ("what", "ours", "bare", "ratio", "target", "ok"),
        (
            f"upload {_human(plan.size)}, MB/s (median)",
            f"{up['ours']['median_mb_s']:.1f}",
            f"{up['bare']['median_mb_s']:.1f}",
            f"{checks['upload']['ratio']:.2f}",
            checks["upload"]["target"],
            ok(checks["upload"]),
        ),
        (
            f"download {_human(plan.size)}, MB/s (median)",
            f"{down['ours']['median_mb_s']:.1f}",
            f"{down['bare']['median_mb_s']:.1f}",
            f"{checks['download']['ratio']:.2f}",
            checks["download"]["target"],
            ok(checks["download"]),
        ),
        ("server idle RSS, MiB", f"{rss['ours']['idle_mib']:.1f}",
         f"{rss['bare']['idle_mib']:.1f}", "", "", ""),
        (f"server peak RSS moving {_human(plan.rss_size)}, MiB", f"{rss['ours']['peak_mib']:.1f}",
         f"{rss['bare']['peak_mib']:.1f}", "", "", ""),
        ("server RSS growth, MiB", f"{rss['ours']['growth_mib']:.1f}",
         f"{rss['bare']['growth_mib']:.1f}", "", checks["rss_growth"]["target"],
         ok(checks["rss_growth"])),
        ("server CPU s/GiB, upload", f"{up['ours']['server_cpu_seconds_per_gib']:.2f}",
         f"{up['bare']['server_cpu_seconds_per_gib']:.2f}",
         _ratio(up['bare']['server_cpu_seconds_per_gib'],
                up['ours']['server_cpu_seconds_per_gib']), "(info)", ""),
        ("server CPU s/GiB, download", f"{down['ours']['server_cpu_seconds_per_gib']:.2f}",
         f"{down['bare']['server_cpu_seconds_per_gib']:.2f}",
         _ratio(down['bare']['server_cpu_seconds_per_gib'],
                down['ours']['server_cpu_seconds_per_gib']), "(info)", ""),
        ("client CPU s/GiB, upload", f"{up['ours']['client_cpu_seconds_per_gib']:.2f}",
         f"{up['bare']['client_cpu_seconds_per_gib']:.2f}", "", "(info)", ""),
        ("client CPU s/GiB, download", f"{down['ours']['client_cpu_seconds_per_gib']:.2f}",
         f"{down['bare']['client_cpu_seconds_per_gib']:.2f}", "", "(info)", ""),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            + " |"
        )

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def machine() -> dict[str, Any]:
    uname = os.uname()
    return {
        "sysname": uname.sysname,
        "nodename": uname.nodename,
        "release": uname.release,
        "version": uname.version,
        "machine": uname.machine,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
    }


def publish(output: Path, results: dict[str, Any], table_text: str, notes: str = "") -> None:
    """What every part of `make bench` ends with: the JSON results file, the
    table, `notes` (if any), the missed targets, and a word on the load."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table_text)
    print()
    if notes:
        print(notes)
    if results["missed"]:
        print("MISSED: " + ", ".join(results["missed"]) + " (see the table above)")
    else:
        print("all targets met")
    load = results["load_average"]
    if max(load["before"][0], load["after"][0]) > 1.5:
        print(
            f"note: load average {load['before'][0]:.1f} -> {load['after'][0]:.1f} on "
            f"{os.cpu_count()} cpus: other processes competed, figures are noisy"
        )
    print(f"results: {output} ({results['elapsed_seconds']} s)")


def _interruptible(servers: list[ServerProcess]) -> Callable[[], None]:
    """Ctrl-C and SIGTERM (e.g. make being killed) kill the servers at once,
    which fails any call in flight, and unwind as KeyboardInterrupt. (asyncio's
    own SIGINT handling only cancels the main task, and a gRPC call in flight
    can swallow that cancellation.) Returns what restores the handlers."""

    def handler(signum: int, frame: FrameType | None) -> None:
        for server in servers:
            server.kill()
        raise KeyboardInterrupt

    previous = {
        signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)
    }

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dataplane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB / 512 MiB, 3 runs")
    parser.add_argument("--size", type=int, help="throughput image size in MiB")
    parser.add_argument("--rss-size", type=int, help="RSS-phase image size in MiB")
    parser.add_argument("--repeats", type=int, help="throughput runs per server")
    parser.add_argument(
        "--bare-default-malloc",
        action="store_true",
        help="run bare with glibc's default heap trimming (see bench.bare.tune_malloc)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place client and servers"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    plan = Plan(
        mode="quick" if args.quick else "full",
        size=(args.size or (256 if args.quick else 1024)) * MIB,
        rss_size=(args.rss_size or (512 if args.quick else 4096)) * MIB,
        repeats=args.repeats or (3 if args.quick else 5),
        bare_default_malloc=args.bare_default_malloc,
    )
    client_malloc_tuned = tune_malloc()  # the client's own heap: same rule as bare's
    load_before = os.getloadavg()
    host = machine()  # before we pin ourselves
    placement = place(args.no_pin)
    client_cpus, server_cpus = placement.client_cpus, placement.server_cpus
    server_pin = placement.server_pin
    servers: list[ServerProcess] = []
    restore = _interruptible(servers)
    workdir = Path(tempfile.mkdtemp(prefix="bms-image-bench-", dir="/tmp"))
    started = time.monotonic()
    print(
        f"bms-image data-plane benchmark ({plan.mode}): client on cpus {sorted(client_cpus)}, "
        f"servers on cpus {sorted(server_cpus)}, work dir {workdir}",
        flush=True,
    )
    try:
        ours, bare = start_servers(plan, workdir, server_pin, servers)
        figures = asyncio.run(run(plan, workdir, ours, bare, client_cpus, server_pin))
    except KeyboardInterrupt:
        print("interrupted: servers stopped, work dir removed", file=sys.stderr)
        return 130
    except (BenchError, grpc.RpcError, OSError) as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        for log in sorted(workdir.glob("*.log")):
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
        "plan": {**asdict(plan), "chunk_bytes": Settings().chunk_bytes,
                 "rss_sample_seconds": SAMPLE_SECONDS, "mb": "10^6 bytes"},
        "malloc": {"ours": "glibc default (the service as it ships)",
                   "bare": "glibc default" if plan.bare_default_malloc else "tune_malloc()",
                   "client_tuned": client_malloc_tuned},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "elapsed_seconds": round(time.monotonic() - started, 1),
        **figures,
        "checks": checks,
        "missed": [name for name, check in checks.items() if not check["ok"]],
    }  # fmt: skip
    publish(args.output, results, table(plan, figures, checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
