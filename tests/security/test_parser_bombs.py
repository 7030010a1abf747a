"""YAML bombs in user data against a real `bms-image serve` process: one
project sends CreateServers whose `#cloud-config` is a "billion laughs"
(a kilobyte of nested aliases, 9 ** 9 strings once expanded), a document
nested thousands of levels deep, or one of tens of thousands of nodes. Each
is answered INVALID_ARGUMENT INVALID_USER_DATA, while another project's
GetImage calls, sent in a loop all along, keep succeeding and the process's
resident memory stays within a generous bound. Before the bounded loader, the
alias bomb's `content` was expanded on the event loop: GetImage waited past
its deadline and the process grew by gigabytes.

Timing is not asserted: the deadlines are hang guards."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.images.adapters.catalog import public_image_id
from support.errors import expect_error
from support.parser_bombs import alias_bomb
from support.processes import ServerProcess
from support.tokens import bearer

pytestmark = pytest.mark.e2e

CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
FLAVOR = "flavors/physical.s4.large"
#: Hang guards, far above what any call takes on a quiet machine.
CALL_DEADLINE = 20.0
#: What the process may grow by while the bombs are answered (an expanded
#: alias bomb takes gigabytes).
RSS_GROWTH_BYTES = 200 * 1024 * 1024
ROUNDS = 5


BOMBS = {
    "alias bomb": alias_bomb(),
    "deep flow nesting": "#cloud-config\nwrite_files: " + "[" * 30_000 + "]" * 2,
    "deep block nesting": "#cloud-config\n"
    + "".join(" " * level + f"k{level}:\n" for level in range(250)),
    "a huge node count": "#cloud-config\nwrite_files: []\npad: ["
    + ",".join(["1"] * 15_000)
    + "]\n",
}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def test_yaml_bombs_are_refused_while_another_project_is_served(tmp_path: Path) -> None:
    for name, bomb in BOMBS.items():
        assert len(bomb.encode()) <= 32 * 1024, f"{name} is over the user data limit"
    server = ServerProcess(tmp_path, catalog_image_mib="1").start()
    assert server.process is not None
    pid = server.process.pid
    attacker = bearer(server.token("attacker"))
    bystander = bearer(server.token("bystander"))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            images = image_pb2_grpc.ImageServiceStub(channel)
            provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
            get = image_pb2.GetImageRequest(name=CENTOS)
            await images.GetImage(get, metadata=bystander, timeout=CALL_DEADLINE)
            baseline = rss_bytes(pid)
            peak = baseline
            served = 0
            attacking = True

            async def bystanding() -> None:
                nonlocal served, peak
                while attacking:
                    image = await images.GetImage(get, metadata=bystander, timeout=CALL_DEADLINE)
                    assert image.name == CENTOS
                    served += 1
                    peak = max(peak, rss_bytes(pid))
                    await asyncio.sleep(0.01)

            async def deploy(user_data: str) -> None:
                request = provisioning_pb2.CreateServersRequest(
                    flavor=FLAVOR, image=CENTOS, count=1, name_prefix="bomb", user_data=user_data
                )
                async for event in provisioning.CreateServers(
                    request, metadata=attacker, timeout=CALL_DEADLINE
                ):
                    raise AssertionError(f"the deployment started: {event}")

            bystander_task = asyncio.create_task(bystanding())
            try:
                for _ in range(ROUNDS):
                    for name, bomb in BOMBS.items():
                        refusals = [
                            expect_error(
                                deploy(bomb), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_USER_DATA"
                            )
                            for _ in range(3)
                        ]
                        for rich in await asyncio.gather(*refusals):
                            assert rich.fields == ["user_data"], name
                        peak = max(peak, rss_bytes(pid))
                        assert not bystander_task.done(), "the bystander's GetImage failed"
            finally:
                attacking = False
                with contextlib.suppress(asyncio.CancelledError):
                    await bystander_task  # raises what a failed GetImage raised
            assert served > 0
            assert peak - baseline < RSS_GROWTH_BYTES, (
                f"the process grew by {(peak - baseline) >> 20} MiB"
            )
            listed = await provisioning.ListServers(
                provisioning_pb2.ListServersRequest(), metadata=attacker, timeout=CALL_DEADLINE
            )
            assert list(listed.servers) == []
        server.stop()
    finally:
        server.kill()
