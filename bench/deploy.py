"""`make bench` (second part): the deployment benchmark of bms-image.

It starts the real service, `<venv>/bin/bms-image serve` (the fleet embedded,
local blobs, SQLite, a temporary data directory), in its own process pinned to
a core other than this client's, exactly as bench.dataplane does, and measures:

1. the upload of a private image (a BMSDISK built by bms_image.common.disk_format.write_disk
   with Cloud-Init, bms-network-config and the SDI iNIC driver, hardware model
   s4-2288h-v5) of `--size` bytes, until it is ACTIVE;
2. the download MB/s of that image through DownloadImageData, the client
   verifying its SHA-256 (median of 3): the reference;
3. a local-disk deployment of 1 server (flavor physical.s4.large) with a cold
   image cache: wall time from the CreateServers call to the ACTIVE event, and
   MB/s = image size / time, against the download MB/s (target >= 0.70);
4. a quick (EVS) deployment of 1 server of the same image, now in the image
   cache (target: local time / EVS time >= 20), and, for
   honesty, an EVS deployment of a second copy of the image with a cold cache;
5. a batch of 50 EVS clones of a third copy (cold cache): wall time, and how
   many times the image was pulled from the image service (files in
   `<data_dir>/fleet/image-cache` for that image, and the bytes the fleet's
   progress events report as streamed): exactly once is the target.

It prints one table and writes every figure to .bench/deploy.json. A missed
target is reported as MISSED and still exits 0; anything that breaks (a
server that does not start, a FAILED deployment, an RPC error) exits 1.

    python -m bench.deploy            # 1 GiB image
    python -m bench.deploy --quick    # 256 MiB image
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.common.config import Settings
from bms_image.common.disk_format import DiskSpec, write_disk
from bms_image.common.model import Plugin, PluginKind

from .dataplane import (
    BIN,
    CLIENT_OPTIONS,
    MIB,
    ROOT,
    BenchError,
    Metadata,
    ServerProcess,
    Target,
    _human,
    _interruptible,
    download,
    issue_token,
    launch,
    machine,
    place,
    publish,
    server_env,
    wait_listening,
)

RESULTS = ROOT / ".bench" / "deploy.json"
FLAVOR = "flavors/physical.s4.large"
HARDWARE_MODEL = "s4-2288h-v5"
BATCH = 50
DOWNLOAD_REPEATS = 3
LOCAL_TARGET = 0.70
EVS_SPEEDUP_TARGET = 20.0
DEPLOY_TIMEOUT = 240.0
PLUGINS = (
    Plugin(PluginKind.CLOUD_INIT, "0.7.9"),
    Plugin(PluginKind.BMS_NETWORK_CONFIG, "2.1.3"),
    Plugin(PluginKind.SDI_INIC_DRIVER, "1.2.0"),
)
PLUGIN_KINDS = {
    PluginKind.CLOUD_INIT: image_pb2.PLUGIN_KIND_CLOUD_INIT,
    PluginKind.BMS_NETWORK_CONFIG: image_pb2.PLUGIN_KIND_BMS_NETWORK_CONFIG,
    PluginKind.SDI_INIC_DRIVER: image_pb2.PLUGIN_KIND_SDI_INIC_DRIVER,
}
OS_RELEASE = {
    "NAME": "Ubuntu",
    "ID": "ubuntu",
    "VERSION_ID": "22.04",
    "PRETTY_NAME": "Ubuntu 22.04 LTS (bench)",
    "BMS_OS_TYPE": "linux",
    "BMS_ARCHITECTURE": "x86_64",
}


@dataclass
class Plan:
    mode: str
    size: int  # bulk bytes of the disk; the image is a few KiB larger
    batch: int


@dataclass
class Deployment:
    """One CreateServers call followed to the end."""

    boot_source: str
    count: int
    seconds: float  # from the call to the last ACTIVE event
    first_active_seconds: float
    streamed_bytes: int  # the most bytes_done any streaming/cloning event reported
    image_bytes: int
    #: Seconds from the call to the first event of each step (of any server).
    timeline: dict[str, float]


@dataclass
class Client:
    images: Any  # image_pb2_grpc.ImageServiceStub (untyped generated code)
    provisioning: Any  # provisioning_pb2_grpc.ProvisioningServiceStub
    metadata: Metadata
    server: ServerProcess


# -- steps -------------------------------------------------------------------------


def build_disk(path: Path, size: int) -> tuple[str, int, float]:
    """Writes the image file; returns its SHA-256, size and the seconds it
    took. Blocking."""
    started = time.perf_counter()
    write_disk(
        path,
        DiskSpec(os_release=OS_RELEASE, plugins=PLUGINS, bulk_bytes=size, seed="bench"),
    )
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return digest, path.stat().st_size, time.perf_counter() - started


def distinct_copy(path: Path, label: str) -> tuple[bytes, str]:
    """A 4 KiB tail that makes copy `label` of the image other bytes, and the
    SHA-256 of the file with it: the image cache is content-addressed, so
    the same bytes again would deploy from a warm cache. Blocking."""
    tail = f"bench copy {label}\n".encode().ljust(4096, b"\0")
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
    digest.update(tail)
    return tail, digest.hexdigest()


async def upload_image(
    client: Client, path: Path, size: int, digest: str, label: str, tail: bytes = b""
) -> tuple[str, float]:
    """A new private image from `path` (and `tail` after it), uploaded and
    waited for until ACTIVE; returns its name and the seconds it took
    (create to ACTIVE)."""
    started = time.perf_counter()
    image = await client.images.CreateImage(
        image_pb2.CreateImageRequest(
            image=image_pb2.Image(
                display_name=f"bench-deploy-{label}",
                description="deployment benchmark",
                os_type=image_pb2.OS_TYPE_LINUX,
                os_distro="ubuntu",
                os_version="22.04",
                architecture=image_pb2.ARCHITECTURE_X86_64,
                hardware_model=HARDWARE_MODEL,
                plugins=[
                    image_pb2.Plugin(kind=PLUGIN_KINDS[p.kind], version=p.version) for p in PLUGINS
                ],
            ),
            request_id=str(uuid.uuid4()),
        ),
        metadata=client.metadata,
    )
    name = str(image.name)
    chunk_bytes = Settings().chunk_bytes
    size += len(tail)

    async def requests() -> AsyncIterator[image_pb2.UploadImageDataRequest]:
        yield image_pb2.UploadImageDataRequest(
            metadata=image_pb2.UploadImageDataMetadata(
                name=name, size_bytes=size, sha256=digest, disk_format=image_pb2.DISK_FORMAT_RAW
            )
        )
        with open(path, "rb") as handle:  # noqa: ASYNC230 - reads go to a thread below
            while chunk := await asyncio.to_thread(handle.read, chunk_bytes):
                yield image_pb2.UploadImageDataRequest(chunk=chunk)
        if tail:
            yield image_pb2.UploadImageDataRequest(chunk=tail)

    reply = await client.images.UploadImageData(requests(), metadata=client.metadata)
    if reply.size_bytes != size or reply.sha256 != digest:
        raise BenchError(f"{name}: stored {reply.size_bytes} bytes / {reply.sha256}")
    deadline = time.monotonic() + 60
    while True:
        current = await client.images.GetImage(
            image_pb2.GetImageRequest(name=name), metadata=client.metadata
        )
        if current.status == image_pb2.IMAGE_STATUS_ACTIVE:
            break
        if current.status == image_pb2.IMAGE_STATUS_KILLED or time.monotonic() > deadline:
            raise BenchError(
                f"{name} is {image_pb2.ImageStatus.Name(current.status)}: {current.status_reason}"
            )
        await asyncio.sleep(0.05)
    return name, time.perf_counter() - started


async def deploy(client: Client, image: str, count: int, boot_source: int) -> Deployment:
    """CreateServers, followed until every server is ACTIVE (any FAILED breaks)."""
    request = provisioning_pb2.CreateServersRequest(
        flavor=FLAVOR,
        image=image,
        count=count,
        name_prefix="bench",
        boot_source=boot_source,  # type: ignore[arg-type]
    )
    active: set[str] = set()
    streamed = 0
    image_bytes = 0
    first_active = 0.0
    chosen = ""
    timeline: dict[str, float] = {}
    started = time.perf_counter()

    async def follow() -> None:
        nonlocal streamed, image_bytes, first_active, chosen
        call = client.provisioning.CreateServers(request, metadata=client.metadata)
        async for event in call:
            step = (
                provisioning_pb2.ProvisioningStage.Name(event.stage)
                .removeprefix("PROVISIONING_STAGE_")
                .lower()
            )
            if event.message == "fetching the image":
                step = "image fetched" if event.bytes_done == event.bytes_total else "fetching"
            timeline.setdefault(step, round(time.perf_counter() - started, 4))
            if event.stage == provisioning_pb2.PROVISIONING_STAGE_FAILED:
                raise BenchError(
                    f"{event.server} FAILED: {event.error_code} {event.error_reason}: "
                    f"{event.message}"
                )
            if event.stage in (
                provisioning_pb2.PROVISIONING_STAGE_IMAGE_STREAMING,
                provisioning_pb2.PROVISIONING_STAGE_EVS_CLONING,
            ):
                chosen = provisioning_pb2.BootSource.Name(event.boot_source)
                image_bytes = max(image_bytes, event.bytes_total)
                if event.message == "fetching the image":  # the image service's bytes
                    streamed = max(streamed, event.bytes_done)
            if event.stage == provisioning_pb2.PROVISIONING_STAGE_ACTIVE:
                active.add(event.server)
                if not first_active:
                    first_active = time.perf_counter() - started
                if len(active) == count:
                    return

    await asyncio.wait_for(follow(), DEPLOY_TIMEOUT)
    seconds = time.perf_counter() - started
    if len(active) != count:
        raise BenchError(f"{image}: {len(active)} of {count} servers became ACTIVE")
    return Deployment(chosen, count, seconds, first_active, streamed, image_bytes, timeline)


def cache_files(data_dir: Path, sha256: str) -> list[Path]:
    """The verified copies of an image's bytes in the fleet's image cache
    (named by their SHA-256)."""
    return sorted((data_dir / "fleet" / "image-cache").glob(f"{sha256}.raw"))


# -- the run -------------------------------------------------------------------------


async def run(
    plan: Plan,
    workdir: Path,
    server: ServerProcess,
    server_pin: set[int] | None,
    provisioner: tuple[ServerProcess, set[int] | None] | None = None,
) -> dict[str, Any]:
    env = server_env(workdir)
    data_dir = workdir / "data"
    disk = workdir / "image.disk"
    building = asyncio.create_task(asyncio.to_thread(build_disk, disk, plan.size))
    try:
        await wait_listening(server, "bms-image listening on", server_pin)
    except BaseException:
        building.cancel()
        raise
    digest, size, build_seconds = await building
    fleet_address = server.address
    if provisioner is not None:  # the fleet as its own process, on the client's idle core
        await wait_listening(provisioner[0], "bms-image listening on", provisioner[1])
        fleet_address = provisioner[0].address
    print(f"  image file: {size} bytes ({_human(plan.size)} bulk), built and hashed "
          f"in {build_seconds:.1f} s (while the service started)")  # fmt: skip
    token = await issue_token(env, data_dir)
    metadata: Metadata = (("authorization", f"Bearer {token}"),)
    async with (
        grpc.aio.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel,
        grpc.aio.insecure_channel(fleet_address, options=CLIENT_OPTIONS) as fleet_channel,
    ):
        client = Client(
            image_pb2_grpc.ImageServiceStub(channel),
            provisioning_pb2_grpc.ProvisioningServiceStub(fleet_channel),
            metadata,
            server,
        )
        image, upload_seconds = await upload_image(client, disk, size, digest, "a")
        print(f"  upload {_human(plan.size)} to ACTIVE: {upload_seconds:.2f} s "
              f"({size / upload_seconds / 1e6:.1f} MB/s), {image}")  # fmt: skip

        target = Target("ours", server, client.images, metadata)
        downloads = []
        for run_number in range(DOWNLOAD_REPEATS):
            transfer = await download(target, image, size)
            downloads.append(transfer.mb_per_s)
            print(f"  download run {run_number + 1}: {transfer.mb_per_s:.1f} MB/s "
                  f"({transfer.seconds:.2f} s, SHA-256 verified)")  # fmt: skip
        download_mb_s = statistics.median(downloads)

        if cache_files(data_dir, digest):
            raise BenchError(f"{image} is already in the image cache: not a cold deployment")
        local = await deploy(client, image, 1, provisioning_pb2.BOOT_SOURCE_LOCAL_DISK)
        print(f"  local disk, cold cache: {local.seconds:.2f} s "
              f"({size / local.seconds / 1e6:.1f} MB/s, {local.boot_source}); steps at "
              + ", ".join(f"{k} {v:.2f}" for k, v in local.timeline.items()))  # fmt: skip
        evs = await deploy(client, image, 1, provisioning_pb2.BOOT_SOURCE_EVS)
        print(f"  EVS, image cached: {evs.seconds:.3f} s ({evs.boot_source})")

        tail_b, digest_b = await asyncio.to_thread(distinct_copy, disk, "b")
        image_b, _ = await upload_image(client, disk, size, digest_b, "b", tail_b)
        evs_cold = await deploy(client, image_b, 1, provisioning_pb2.BOOT_SOURCE_EVS)
        print(f"  EVS, cold cache (second copy {image_b}): {evs_cold.seconds:.2f} s; steps at "
              + ", ".join(f"{k} {v:.2f}" for k, v in evs_cold.timeline.items()))  # fmt: skip

        tail_c, digest_c = await asyncio.to_thread(distinct_copy, disk, "c")
        image_c, _ = await upload_image(client, disk, size, digest_c, "c", tail_c)
        batch = await deploy(client, image_c, plan.batch, provisioning_pb2.BOOT_SOURCE_EVS)
        pulled = cache_files(data_dir, digest_c)
        pulled_bytes = sum(path.stat().st_size for path in pulled)
        print(f"  batch of {plan.batch} ({batch.boot_source}), cold cache: {batch.seconds:.2f} s "
              f"(first ACTIVE after {batch.first_active_seconds:.2f} s); image cache: "
              f"{len(pulled)} file(s), {pulled_bytes} bytes; streamed per events: "
              f"{batch.streamed_bytes} bytes")  # fmt: skip
    return {
        "image": {"name": image, "size_bytes": size, "sha256": digest,
                  "upload_to_active_seconds": upload_seconds,
                  "upload_mb_s": size / upload_seconds / 1e6},
        "download": {"median_mb_s": download_mb_s, "runs_mb_s": downloads},
        "local_cold": {**asdict(local), "mb_s": size / local.seconds / 1e6},
        "evs_warm": asdict(evs),
        "evs_cold": {**asdict(evs_cold), "image": image_b, "mb_s": size / evs_cold.seconds / 1e6},
        "batch": {**asdict(batch), "image": image_c, "image_size_bytes": size + len(tail_c),
                  "cache_files": len(pulled),
                  "cache_bytes": pulled_bytes},
    }  # fmt: skip


def verdicts(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    batch = figures["batch"]
    local_ratio = figures["local_cold"]["mb_s"] / figures["download"]["median_mb_s"]
    speedup = figures["local_cold"]["seconds"] / figures["evs_warm"]["seconds"]
    # The batch deploys a distinct copy (4 KiB longer), so that it starts cold.
    batch_size = batch["image_size_bytes"]
    pulled_once = batch["cache_files"] == 1 and batch["cache_bytes"] == batch_size
    pulled_once = pulled_once and batch["streamed_bytes"] == batch_size
    return {
        "local_vs_download": {"ratio": local_ratio, "target": f">= {LOCAL_TARGET:.2f}",
                              "ok": local_ratio >= LOCAL_TARGET},
        "evs_speedup": {"ratio": speedup, "target": f">= {EVS_SPEEDUP_TARGET:.0f}x",
                        "ok": speedup >= EVS_SPEEDUP_TARGET},
        "batch_pulled_once": {"target": "1 cache file, image size streamed",
                              "ok": pulled_once},
    }  # fmt: skip


def table(plan: Plan, figures: dict[str, Any], checks: dict[str, dict[str, Any]]) -> str:
    down = figures["download"]["median_mb_s"]
    local, evs, cold = figures["local_cold"], figures["evs_warm"], figures["evs_cold"]
    batch = figures["batch"]
    human = _human(plan.size)

    def ok(name: str) -> str:
        return "ok" if checks[name]["ok"] else "MISSED"

    rows = [
        ("what", "value", "reference", "ratio", "target", "ok"),
        (f"upload {human} to ACTIVE, MB/s", f"{figures['image']['upload_mb_s']:.1f}",
         "", "", "(info)", ""),
        (f"download {human}, MB/s (median, sha256 checked)", f"{down:.1f}", "", "", "", ""),
        ("local-disk deploy x1, cold cache, MB/s", f"{local['mb_s']:.1f}", f"{down:.1f} (download)",
         f"{checks['local_vs_download']['ratio']:.2f}", checks["local_vs_download"]["target"],
         ok("local_vs_download")),
        ("local-disk deploy x1, cold cache, s", f"{local['seconds']:.2f}", "", "", "", ""),
        ("EVS deploy x1, image cached, s", f"{evs['seconds']:.3f}",
         f"{local['seconds']:.2f} (local)", f"{checks['evs_speedup']['ratio']:.1f}x",
         checks["evs_speedup"]["target"], ok("evs_speedup")),
        ("EVS deploy x1, cold cache, s", f"{cold['seconds']:.2f}",
         f"{local['seconds']:.2f} (local)", f"{local['seconds'] / cold['seconds']:.1f}x",
         "(info)", ""),
        (f"batch x{plan.batch} {batch['boot_source']}, cold cache, s", f"{batch['seconds']:.2f}",
         f"{cold['seconds']:.2f} (x1 cold)", f"{batch['seconds'] / cold['seconds']:.2f}",
         "(info)", ""),
        (f"batch x{plan.batch}: image pulls (cache files)", str(batch["cache_files"]), "1", "",
         "pulled once", ok("batch_pulled_once")),
        (f"batch x{plan.batch}: bytes streamed", str(batch["streamed_bytes"]),
         f"{batch['image_size_bytes']} (image)",
         f"{batch['streamed_bytes'] / batch['image_size_bytes']:.2f}",
         f"= image, not x{plan.batch}", ok("batch_pulled_once")),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: tuple[str, ...]) -> str:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB image")
    parser.add_argument("--size", type=int, help="image size in MiB")
    parser.add_argument("--batch", type=int, default=BATCH, help="servers in the batch (<= 100)")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place client and server"
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="run the fleet as its own process (bms-image provisioner) on the client's core",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    plan = Plan(
        mode="quick" if args.quick else "full",
        size=(args.size or (256 if args.quick else 1024)) * MIB,
        batch=args.batch,
    )
    load_before = os.getloadavg()
    host = machine()
    placement = place(args.no_pin)
    client_cpus, server_cpus = placement.client_cpus, placement.server_cpus
    server_pin = placement.server_pin
    servers: list[ServerProcess] = []
    restore = _interruptible(servers)
    workdir = Path(tempfile.mkdtemp(prefix="bms-image-deploy-", dir="/tmp"))
    started = time.monotonic()
    print(
        f"bms-image deployment benchmark ({plan.mode}, {_human(plan.size)} image): client on "
        f"cpus {sorted(client_cpus)}, server on cpus {sorted(server_cpus)}, work dir {workdir}",
        flush=True,
    )
    try:
        serve = [str(BIN / "bms-image"), "serve"] + (
            ["--provisioner", "none"] if args.split else []
        )
        server = launch("ours", serve, server_env(workdir), workdir / "ours.log", server_pin)
        servers.append(server)
        provisioner = None
        if args.split:
            fleet_pin = client_cpus if placement.pinning else None
            # The provisioner needs the image service's address to start.
            asyncio.run(wait_listening(server, "bms-image listening on", server_pin))
            fleet = launch(
                "fleet",
                [str(BIN / "bms-image"), "provisioner", "--image-service", server.address,
                 "--listen", "127.0.0.1:0"],
                server_env(workdir), workdir / "fleet.log", fleet_pin,
            )  # fmt: skip
            servers.append(fleet)
            provisioner = (fleet, fleet_pin)
        figures = asyncio.run(run(plan, workdir, server, server_pin, provisioner))
    except KeyboardInterrupt:
        print("interrupted: server stopped, work dir removed", file=sys.stderr)
        return 130
    except (BenchError, grpc.RpcError, OSError, TimeoutError) as error:
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        for log in sorted(workdir.glob("*.log")):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            print(f"--- {log.name} (last lines)\n{tail}", file=sys.stderr)
        return 1
    finally:
        for process in reversed(servers):
            process.stop()
        restore()
        shutil.rmtree(workdir, ignore_errors=True)
    checks = verdicts(figures)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": plan.mode + (" split" if args.split else ""),
        "machine": host,
        "plan": {**asdict(plan), "flavor": FLAVOR, "hardware_model": HARDWARE_MODEL,
                 "download_repeats": DOWNLOAD_REPEATS, "mb": "10^6 bytes"},
        "pinning": placement.as_json(),
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
