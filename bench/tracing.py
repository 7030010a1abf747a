"""`make bench` (tracing): what tracing costs the image service per call.

Starts `<venv>/bin/bms-image serve` twice, each on its own data directory and
pinned to the server core (bench.dataplane.place): one with tracing off (no
OTEL_* variable: no interceptor, no SDK), one with it on, exporting over
OTLP/gRPC to a sink in this process (a TraceService that counts the spans it
receives: the collector's side costs the server nothing). With tracing on
every call is sampled (the SDK's default, parentbased_always_on, and no
caller's traceparent: each GetImage is a root span), so this is the dearest
case: one server span per call, batched and exported by the SDK's thread.

Then, in alternating rounds (off, on, off, on, ...), 16 grpc.aio workers loop
GetImage of the public CentOS image with a bearer token for `--seconds`;
each round records the server's CPU seconds (from /proc) per call and the
calls per second. A run is checked: every call OK, and, tracing on, the sink
received one GetImage server span per call (after the last batch is flushed
by a SIGTERM). A third server has tracing on but samples every call out
(OTEL_TRACES_SAMPLER=always_off): what the interceptor alone costs. It
prints one table and writes .bench/tracing.json.

    python -m bench.tracing            # 3 rounds of 8 s each
    python -m bench.tracing --quick    # 1 round of 3 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.images.adapters.catalog import public_image_id

from .dataplane import (
    BIN,
    CLIENT_OPTIONS,
    ROOT,
    BenchError,
    Metadata,
    ServerProcess,
    _interruptible,
    cpu_seconds,
    issue_token,
    launch,
    machine,
    place,
    publish,
    server_env,
    wait_listening,
)

RESULTS = ROOT / ".bench" / "tracing.json"
CENTOS = f"images/{public_image_id('centos-7.6-x86_64')}"
GET_IMAGE = "/bms.image.v1.ImageService/GetImage"
WORKERS = 16
#: Tracing off; on with every call sampled and exported; on with every call
#: sampled out (the interceptor runs, the span records and exports nothing).
LABELS = ("off", "on", "unsampled")
CALL_TIMEOUT = 30.0


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """Counts the spans it receives, by name."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.counts[span.name] = self.counts.get(span.name, 0) + 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def count(self, name: str) -> int:
        with self._lock:
            return self.counts.get(name, 0)


@dataclass
class Round:
    label: str
    calls: int
    seconds: float
    server_cpu_seconds: float

    @property
    def cpu_us_per_call(self) -> float:
        return self.server_cpu_seconds / self.calls * 1e6

    @property
    def qps(self) -> float:
        return self.calls / self.seconds


async def load(server: ServerProcess, metadata: Metadata, seconds: float) -> Round:
    """WORKERS workers looping GetImage for `seconds`; the server's CPU per call."""
    async with grpc.aio.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
        stub = image_pb2_grpc.ImageServiceStub(channel)
        request = image_pb2.GetImageRequest(name=CENTOS)
        for _ in range(50):  # warm: connection, caches
            await stub.GetImage(request, metadata=metadata, timeout=CALL_TIMEOUT)
        calls = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal calls
            while time.monotonic() < deadline:
                image = await stub.GetImage(request, metadata=metadata, timeout=CALL_TIMEOUT)
                if image.name != CENTOS:
                    raise BenchError(f"{server.label}: GetImage answered {image.name}")
                calls += 1

        cpu, started = cpu_seconds(server.pid), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        elapsed, cpu = time.monotonic() - started, cpu_seconds(server.pid) - cpu
    return Round(server.label, calls, elapsed, cpu)


async def run(
    workdir: Path, rounds: int, seconds: float, pin: set[int] | None, started: list[ServerProcess]
) -> dict[str, Any]:
    sink = SpanSink()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        servers: dict[str, ServerProcess] = {}
        metadata: dict[str, Metadata] = {}
        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        for label, otel in (
            ("off", {}),
            ("on", endpoint),
            ("unsampled", {**endpoint, "OTEL_TRACES_SAMPLER": "always_off"}),
        ):
            directory = workdir / label
            env = {k: v for k, v in server_env(directory).items() if not k.startswith("OTEL_")}
            env.update(otel)
            process = launch(
                label, [str(BIN / "bms-image"), "serve"], env, workdir / f"{label}.log", pin
            )
            started.append(process)
            await wait_listening(process, "bms-image listening on", pin)
            token = await issue_token(env, directory / "data")
            servers[label], metadata[label] = process, (("authorization", f"Bearer {token}"),)
        done: list[Round] = []
        warm_spans = 50
        for number in range(rounds):
            for label in LABELS:
                one = await load(servers[label], metadata[label], seconds)
                done.append(one)
                print(
                    f"round {number + 1} tracing {label}: {one.calls} calls, "
                    f"{one.qps:,.0f}/s, {one.cpu_us_per_call:.0f} µs of server CPU a call",
                    flush=True,
                )
        servers["on"].stop()  # SIGTERM: the SDK exports its last batch
        traced = sum(r.calls for r in done if r.label == "on") + warm_spans * rounds
        exported = sink.count(GET_IMAGE)
        if exported != traced:
            raise BenchError(f"tracing on: {traced} GetImage calls, {exported} spans exported")
    finally:
        collector.stop(0)

    def median(label: str, figure: str) -> float:
        return statistics.median(getattr(r, figure) for r in done if r.label == label)

    figures: dict[str, Any] = {
        label: {"cpu_us_per_call": median(label, "cpu_us_per_call"), "qps": median(label, "qps")}
        for label in LABELS
    }
    off_us = figures["off"]["cpu_us_per_call"]
    return {
        "rounds": [r.__dict__ | {"cpu_us_per_call": r.cpu_us_per_call} for r in done],
        **figures,
        "tracing_us_per_call": figures["on"]["cpu_us_per_call"] - off_us,
        "unsampled_us_per_call": figures["unsampled"]["cpu_us_per_call"] - off_us,
        "spans_exported": exported,
    }


def table(figures: dict[str, Any]) -> str:
    off, on, unsampled = figures["off"], figures["on"], figures["unsampled"]

    def more(figure: dict[str, float]) -> str:
        base = off["cpu_us_per_call"]
        extra = figure["cpu_us_per_call"] - base
        return f"{figure['cpu_us_per_call']:.0f} ({extra:+.0f} µs, {extra / base:+.0%})"

    rows = [
        ("what", "tracing off", "on, every call exported", "on, sampled out (always_off)"),
        (
            "`GetImage` server CPU, µs per call",
            f"{off['cpu_us_per_call']:.0f}",
            more(on),
            more(unsampled),
        ),
        (
            f"`GetImage` calls/s, {WORKERS} in flight",
            f"{off['qps']:,.0f}",
            f"{on['qps']:,.0f} ({on['qps'] / off['qps'] - 1:+.0%})",
            f"{unsampled['qps']:,.0f} ({unsampled['qps'] / off['qps'] - 1:+.0%})",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            + " |"
        )

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tracing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s")
    parser.add_argument("--rounds", type=int, help="rounds (each: off, then on)")
    parser.add_argument("--seconds", type=float, help="seconds of load per round and server")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place client and servers"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    load_before = os.getloadavg()
    host = machine()
    placement = place(args.no_pin)
    servers: list[ServerProcess] = []
    restore = _interruptible(servers)
    workdir = Path(tempfile.mkdtemp(prefix="bms-image-bench-", dir="/tmp"))
    started = time.monotonic()
    print(
        f"bms-image tracing benchmark: {rounds} rounds of {seconds:.0f} s, client on cpus "
        f"{sorted(placement.client_cpus)}, servers on cpus {sorted(placement.server_cpus)}",
        flush=True,
    )
    try:
        figures = asyncio.run(run(workdir, rounds, seconds, placement.server_pin, servers))
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
        for server in servers:
            server.stop()
        restore()
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "machine": host,
        "placement": placement.as_json(),
        "plan": {"rounds": rounds, "seconds": seconds, "workers": WORKERS},
        **figures,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "elapsed_seconds": round(time.monotonic() - started, 1),
        "missed": [],
    }
    publish(args.output, results, table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
