"""`make bench` (bystander): what YAML bombs cost another project.

It starts the real service (`<venv>/bin/bms-image serve`, SQLite, local
blobs, on cores of its own as bench.dataplane does) and measures one
project's GetImage of the public CentOS image, one call at a time as the
client sees it, twice for `--seconds` each:

1. quiet: nothing else runs;
2. under attack: meanwhile another project sends CreateServers whose
   `#cloud-config` user data is a YAML bomb (a "billion laughs" of nested
   aliases, a document nested thousands of levels deep, one of 15,000
   nodes), `--attackers` calls at a time in a loop. Every one must be
   refused INVALID_ARGUMENT INVALID_USER_DATA, or the run is broken.

It prints p50/p99 of both and their ratio (attack / quiet), with the bombs
refused per second and the server's RSS growth, and writes the figures to
.bench/bystander.json. There is no latency target: the parse is bounded and
off the event loop, but it is CPU work on the server's core(s), so the ratio
says what a flood of refused bombs costs a bystander; what must hold (every
GetImage answered, every bomb refused INVALID_USER_DATA) breaks the run
(exit 1) when it does not.

    python -m bench.bystander            # 10 s each
    python -m bench.bystander --quick    # 3 s each
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bms.image.v1 import image_pb2, image_pb2_grpc, provisioning_pb2, provisioning_pb2_grpc
from bms_image.images.adapters.catalog import public_image_id

from .dataplane import (
    BIN,
    CLIENT_OPTIONS,
    ROOT,
    BenchError,
    Metadata,
    RssSampler,
    ServerProcess,
    _interruptible,
    issue_token,
    launch,
    machine,
    place,
    publish,
    read_status,
    server_env,
    wait_listening,
)
from .metadata import latency_summary

RESULTS = ROOT / ".bench" / "bystander.json"
CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
FLAVOR = "flavors/physical.s4.large"
CALL_TIMEOUT = 30.0


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["#cloud-config", "a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * width) + "]" for n in range(1, levels)]
    return "\n".join([*lines, "write_files:", "- path: /x", f"  content: *a{levels - 1}"]) + "\n"


BOMBS = [
    _alias_bomb(),
    "#cloud-config\nwrite_files: " + "[" * 30_000,
    "#cloud-config\npad: [" + ",".join(["1"] * 15_000) + "]\n",
]


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


async def attacker_token(env: dict[str, str], data_dir: Path) -> str:
    argv = [str(BIN / "bms-image"), "token", "--project", "attacker", "--data-dir", str(data_dir)]
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise BenchError(f"bms-image token failed: {err.decode(errors='replace')}")
    return out.decode().strip()


async def bystand(images: Any, metadata: Metadata, seconds: float) -> list[float]:
    request = image_pb2.GetImageRequest(name=CENTOS)
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        image = await images.GetImage(request, metadata=metadata, timeout=CALL_TIMEOUT)
        times.append(time.perf_counter() - started)
        if image.name != CENTOS:
            raise BenchError(f"GetImage answered {image.name}")
    return times


async def attack(provisioning: Any, metadata: Metadata, stop: asyncio.Event, index: int) -> int:
    """Sends bombs until stopped; returns how many were refused."""
    refused = 0
    while not stop.is_set():
        request = provisioning_pb2.CreateServersRequest(
            flavor=FLAVOR, image=CENTOS, count=1, name_prefix="bomb",
            user_data=BOMBS[(index + refused) % len(BOMBS)],
        )  # fmt: skip
        try:
            async for event in provisioning.CreateServers(
                request, metadata=metadata, timeout=CALL_TIMEOUT
            ):
                raise BenchError(f"a bomb was deployed: {event}")
        except grpc.aio.AioRpcError as error:
            reason = _reason(error)
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT or reason != "INVALID_USER_DATA":
                raise BenchError(
                    f"a bomb got {error.code().name} {reason}: {error.details()}"
                ) from None
            refused += 1
            continue
        raise BenchError("a bomb's CreateServers ended without an error")
    return refused


async def run(args: argparse.Namespace, workdir: Path, servers: list[ServerProcess]) -> Any:
    placement = place(args.no_pin)
    env = server_env(workdir)
    pin = placement.server_pin
    process = launch("ours", [str(BIN / "bms-image"), "serve"], env, workdir / "ours.log", pin)
    servers.append(process)
    await wait_listening(process, "bms-image listening on", pin)
    bystander: Metadata = (("authorization", f"Bearer {await issue_token(env, workdir / 'data')}"),)
    attacker: Metadata = (
        ("authorization", f"Bearer {await attacker_token(env, workdir / 'data')}"),
    )
    async with grpc.aio.insecure_channel(process.address, options=CLIENT_OPTIONS) as channel:
        await channel.channel_ready()
        images = image_pb2_grpc.ImageServiceStub(channel)
        provisioning = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
        await bystand(images, bystander, min(1.0, args.seconds))  # warm-up
        quiet = await bystand(images, bystander, args.seconds)
        idle_rss = read_status(process.pid)["VmRSS"]
        stop = asyncio.Event()
        with RssSampler(process.pid) as sampler:
            attackers = [
                asyncio.create_task(attack(provisioning, attacker, stop, n))
                for n in range(args.attackers)
            ]
            started = time.monotonic()
            try:
                attacked = await bystand(images, bystander, args.seconds)
            finally:
                stop.set()
                refused = sum(await asyncio.gather(*attackers))
        elapsed = time.monotonic() - started
    peak_rss = sampler.peak
    quiet_summary, attacked_summary = latency_summary(quiet), latency_summary(attacked)
    return {
        "pinning": placement.as_json(),
        "quiet": quiet_summary,
        "under_attack": attacked_summary,
        "p50_ratio": attacked_summary["p50_ms"] / quiet_summary["p50_ms"],
        "p99_ratio": attacked_summary["p99_ms"] / quiet_summary["p99_ms"],
        "bombs_refused": refused,
        "bombs_per_second": refused / elapsed,
        "rss_growth_mib": max(0, peak_rss - idle_rss) / 2**20,
    }


def table(figures: dict[str, Any]) -> str:
    quiet, attacked = figures["quiet"], figures["under_attack"]
    rows = [
        "GetImage of another project  |  p50 ms  |  p99 ms  |  calls",
        f"quiet                        | {quiet['p50_ms']:8.2f} | {quiet['p99_ms']:8.2f} | "
        f"{quiet['samples']:6d}",
        f"while bombs are refused      | {attacked['p50_ms']:8.2f} | {attacked['p99_ms']:8.2f} | "
        f"{attacked['samples']:6d}",
        f"ratio (attack / quiet)       | {figures['p50_ratio']:8.2f} | "
        f"{figures['p99_ratio']:8.2f} |",
        f"bombs refused: {figures['bombs_refused']} ({figures['bombs_per_second']:.0f}/s), "
        f"server RSS growth: {figures['rss_growth_mib']:.1f} MiB",
    ]
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bystander", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 s per phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--attackers", type=int, default=4, help="bombs in flight at once")
    parser.add_argument("--no-pin", action="store_true", help="share every core")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 3.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    host = machine()
    servers: list[ServerProcess] = []
    restore = _interruptible(servers)
    workdir = Path(tempfile.mkdtemp(prefix="bms-image-bystander-", dir="/tmp"))
    started = time.monotonic()
    print(f"bms-image bystander benchmark: {args.seconds:g} s per phase, work dir {workdir}")
    try:
        figures = asyncio.run(run(args, workdir, servers))
    except KeyboardInterrupt:
        print("interrupted: servers stopped, work dir removed", file=sys.stderr)
        return 130
    except (BenchError, grpc.RpcError, OSError, TimeoutError) as error:
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        for server in servers:
            print(f"--- {server.label} (last lines)\n{server.log_tail(20)}", file=sys.stderr)
        return 1
    finally:
        for server in reversed(servers):
            server.stop()
        restore()
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": host,
        "plan": {"seconds": args.seconds, "attackers": args.attackers, "get_image": CENTOS},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "elapsed_seconds": round(time.monotonic() - started, 1),
        **figures,
        "checks": {},
        "missed": [],
    }
    publish(args.output, results, table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
