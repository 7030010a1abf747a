"""A bounded soak on loopback: a real `bms-image serve` under mixed reads,
writes and streams from several concurrent clients for about a minute
(BMS_IMAGE_SOAK_SECONDS), with zero errors and a flat RSS. The figures are
printed (run with -s to see them) and written to .soak.json for the README."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from bms.image.v1 import image_pb2, provisioning_pb2, sharing_pb2
from bms_image.common.auth import TokenAuthority
from bms_image.images.adapters.catalog import public_image_id
from support.builders import private_image
from support.processes import ServerProcess
from support.services import ImageStub, ProvisioningStub, SharingStub
from support.tokens import Metadata, bearer

pytestmark = pytest.mark.e2e

SOAK_SECONDS = float(os.environ.get("BMS_IMAGE_SOAK_SECONDS", "50"))
WARMUP_SECONDS = 5.0
WORKERS_PER_KIND = 3
#: RSS may grow by this much over the soak (caches, allocator arenas);
#: a leak of a few KiB per request would exceed it many times over.
RSS_GROWTH_LIMIT_MIB = 48
CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
RESULTS = Path(__file__).resolve().parents[2] / ".soak.json"
PAYLOAD = os.urandom(256 * 1024)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@dataclass
class Tally:
    calls: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


class Clients:
    def __init__(self, channel: grpc.aio.Channel, server: ServerProcess) -> None:
        self.images = ImageStub(channel)
        self.sharing = SharingStub(channel)
        self.fleet = ProvisioningStub(channel)
        self.tokens: dict[str, Metadata] = {}
        # Signed in-process with the server's secret: minting through the CLI
        # would block the event loop that drives every worker.
        self.authority = TokenAuthority((server.data_dir / "token-secret").read_text().strip())

    def md(self, project: str) -> Metadata:
        if project not in self.tokens:
            token = self.authority.issue(project)
            self.tokens[project] = bearer(token)
        return self.tokens[project]


async def reads(clients: Clients, worker: int) -> int:
    md = clients.md(f"reader-{worker}")
    page = await clients.images.ListImages(
        image_pb2.ListImagesRequest(filter="flavor = physical.s4.large"), metadata=md, timeout=10
    )
    assert page.images
    await clients.images.GetImage(image_pb2.GetImageRequest(name=CENTOS), metadata=md, timeout=10)
    await clients.fleet.ListFlavors(provisioning_pb2.ListFlavorsRequest(), metadata=md, timeout=10)
    return 3


async def image_life(clients: Clients, worker: int) -> int:
    """Create, upload, share and accept, download and verify, delete."""
    owner, member = clients.md(f"owner-{worker}"), clients.md(f"member-{worker}")
    image = await clients.images.CreateImage(
        image_pb2.CreateImageRequest(image=private_image(f"soak-{worker}")),
        metadata=owner,
        timeout=10,
    )
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    uploaded = await clients.images.UploadImageData(
        iter(
            [
                image_pb2.UploadImageDataRequest(
                    metadata=image_pb2.UploadImageDataMetadata(
                        name=image.name, size_bytes=len(PAYLOAD), sha256=digest
                    )
                ),
                image_pb2.UploadImageDataRequest(chunk=PAYLOAD),
            ]
        ),
        metadata=owner,
        timeout=30,
    )
    assert uploaded.status == image_pb2.IMAGE_STATUS_ACTIVE
    project = f"member-{worker}"
    await clients.sharing.CreateImageMember(
        sharing_pb2.CreateImageMemberRequest(
            parent=image.name, member=sharing_pb2.ImageMember(member_project=project)
        ),
        metadata=owner,
        timeout=10,
    )
    await clients.sharing.UpdateImageMember(
        sharing_pb2.UpdateImageMemberRequest(
            member=sharing_pb2.ImageMember(
                name=f"{image.name}/members/{project}", status=sharing_pb2.MEMBER_STATUS_ACCEPTED
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=member,
        timeout=10,
    )
    received = hashlib.sha256()
    last = ""
    async for message in clients.images.DownloadImageData(
        image_pb2.DownloadImageDataRequest(name=image.name), metadata=member, timeout=30
    ):
        received.update(message.chunk)
        last = message.sha256 or last
    assert received.hexdigest() == last == digest
    await clients.images.DeleteImage(
        image_pb2.DeleteImageRequest(name=image.name), metadata=owner, timeout=10
    )
    return 6


async def deployments(clients: Clients, worker: int) -> int:
    """Deploy two servers from EVS, follow the stream, delete them."""
    md = clients.md(f"fleet-{worker}")
    stream = clients.fleet.CreateServers(
        provisioning_pb2.CreateServersRequest(
            flavor="flavors/physical.s4.large",
            image=CENTOS,
            count=2,
            name_prefix=f"soak{worker}",
            boot_source=provisioning_pb2.BOOT_SOURCE_EVS,
        ),
        metadata=md,
        timeout=60,
    )
    finals = [e async for e in stream if e.stage >= provisioning_pb2.PROVISIONING_STAGE_ACTIVE]
    assert [e.stage for e in finals] == [provisioning_pb2.PROVISIONING_STAGE_ACTIVE] * 2, finals
    for event in finals:
        await clients.fleet.DeleteServer(
            provisioning_pb2.DeleteServerRequest(name=event.server), metadata=md, timeout=10
        )
    return 3


async def run_worker(
    kind: str,
    work: Callable[[Clients, int], Awaitable[int]],
    clients: Clients,
    worker: int,
    until: float,
    tally: Tally,
) -> None:
    while time.monotonic() < until:
        try:
            tally.calls[kind] += await work(clients, worker)
        except (grpc.aio.AioRpcError, AssertionError) as error:
            tally.errors.append(f"{kind}: {error!r}"[:500])


async def test_a_minute_of_mixed_load_has_no_errors_and_a_flat_rss(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, catalog_image_mib="4").start()
    assert server.process is not None
    pid = server.process.pid
    kinds = {"reads": reads, "images": image_life, "deployments": deployments}
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            clients = Clients(channel, server)
            warmup, tally = Tally(), Tally()
            start = time.monotonic()
            await asyncio.gather(
                *(
                    run_worker(kind, work, clients, n, start + WARMUP_SECONDS, warmup)
                    for kind, work in kinds.items()
                    for n in range(WORKERS_PER_KIND)
                )
            )
            rss_start = rss_mib(pid)
            start = time.monotonic()
            await asyncio.gather(
                *(
                    run_worker(kind, work, clients, n, start + SOAK_SECONDS, tally)
                    for kind, work in kinds.items()
                    for n in range(WORKERS_PER_KIND)
                )
            )
            seconds = time.monotonic() - start
            rss_end = rss_mib(pid)
    finally:
        server.stop()
    figures = {
        "seconds": round(seconds, 1),
        "calls": dict(tally.calls),
        "calls_total": sum(tally.calls.values()),
        "calls_per_second": round(sum(tally.calls.values()) / seconds, 1),
        "errors": len(tally.errors) + len(warmup.errors),
        "rss_start_mib": round(rss_start, 1),
        "rss_end_mib": round(rss_end, 1),
        "workers": WORKERS_PER_KIND * len(kinds),
    }
    print("soak:", json.dumps(figures))
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    assert not warmup.errors and not tally.errors, (warmup.errors + tally.errors)[:5]
    assert all(tally.calls[kind] > 0 for kind in kinds), tally.calls
    assert rss_end - rss_start < RSS_GROWTH_LIMIT_MIB, figures
