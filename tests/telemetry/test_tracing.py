"""Tracing across processes and inside one.

The end-to-end test runs the provisioner and the image service as real
processes (`serve --provisioner none`), and the real CLI, all exporting over
OTLP to a tiny collector the test starts (support/otlp.py), and follows one
trace (the CLI's TRACEPARENT) through every gRPC hop: a deployment (CLI ->
provisioner -> image service, after CreateServers answered) and a capture
(CLI -> image service -> provisioner -> image service). The in-process tests
check the W3C traceparent a stranger sends (malformed or huge ones start a
new trace and never fail the call), the trace ids in the JSON logs, and that
the embedded provisioner's deployment keeps the caller's trace."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bms.image.v1 import image_pb2, image_pb2_grpc
from bms_image.common.telemetry.logs import configure_logging
from bms_image.common.telemetry.tracing import Tracing
from bms_image.processes import start
from support.builders import CENTOS_IMAGE
from support.otlp import CollectedSpan, otlp_collector
from support.processes import BMS_IMAGE, ServerProcess, clean_environ
from support.services import make_settings
from support.tokens import bearer

IMAGES = "/bms.image.v1.ImageService/"
PROVISIONING = "/bms.image.v1.ProvisioningService/"
CAPTURE = "/bms.image.v1.ServerCaptureService/"
SERVER, CLIENT = 2, 3  # OTLP span kinds (opentelemetry.proto.trace.v1.Span.SpanKind)
SETTINGS = {"catalog_image_mib": "1", "shutdown_grace_seconds": "2"}


# -- across real processes -----------------------------------------------------


class TracedProcess(ServerProcess):
    """A service process exporting its spans to `endpoint` over OTLP."""

    def __init__(self, endpoint: str, data_dir: Path, *command: str, **settings: str) -> None:
        super().__init__(data_dir, *command, **settings)
        self.endpoint = endpoint

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **otel_env(self.endpoint)}


def otel_env(endpoint: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}


def run_cli(endpoint: str, traceparent: str, *argv: str) -> str:
    done = subprocess.run(
        [str(BMS_IMAGE), *argv],
        env=clean_environ(**otel_env(endpoint), TRACEPARENT=traceparent),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"bms-image {' '.join(argv)}: {done.stderr}"
    return done.stdout


class Trace:
    def __init__(self, spans: list[CollectedSpan]) -> None:
        self.spans = spans
        self.by_id = {span.span_id: span for span in spans}

    def find(self, service: str, name: str, kind: int | None = None) -> list[CollectedSpan]:
        return [
            s
            for s in self.spans
            if s.service == service and s.name == name and (kind is None or s.kind == kind)
        ]

    def one(self, service: str, name: str, kind: int | None = None) -> CollectedSpan:
        found = self.find(service, name, kind)
        assert found, f"no {service} span {name} in\n{self}"
        return found[0]

    def children(
        self, parent: CollectedSpan, service: str, name: str, kind: int
    ) -> list[CollectedSpan]:
        return [s for s in self.find(service, name, kind) if s.parent_id == parent.span_id]

    def child(self, parent: CollectedSpan, service: str, name: str, kind: int) -> CollectedSpan:
        found = self.children(parent, service, name, kind)
        assert found, f"no {service} {name} under {parent} in\n{self}"
        return found[0]

    def under(self, span: CollectedSpan, ancestor: CollectedSpan) -> bool:
        while span.parent_id:
            if span.parent_id == ancestor.span_id:
                return True
            parent = self.by_id.get(span.parent_id)
            if parent is None:
                return False
            span = parent
        return False

    def __str__(self) -> str:
        return "\n".join(str(span) for span in self.spans)


def hop(trace: Trace, client: CollectedSpan, service: str) -> CollectedSpan:
    """The server span of `service` that a client span called."""
    return trace.child(client, service, client.name, SERVER)


@pytest.mark.e2e
def test_one_trace_follows_a_deployment_and_a_capture_across_cli_serve_and_provisioner(
    tmp_path: Path,
) -> None:
    trace_id, root_span = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{root_span}-01"
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    with otlp_collector() as collector:
        provisioner = TracedProcess(collector.endpoint, data_dir, "provisioner", **SETTINGS)
        serve = TracedProcess(
            collector.endpoint, data_dir, "serve", "--provisioner", "none",
            "--provisioner-address", provisioner.address, **SETTINGS,
        )  # fmt: skip
        provisioner.command += ["--image-service", serve.address]
        try:
            serve.start()
            provisioner.start()
            token = serve.token("alpha")
            cli = ["--token", token]
            created = run_cli(
                collector.endpoint, traceparent,
                "servers", "--address", provisioner.address, *cli, "create",
                "--flavor", "physical.s4.large", "--image", CENTOS_IMAGE, "--count", "1",
                "--name-prefix", "traced", "--boot-source", "evs", "--json",
            )  # fmt: skip
            events = [json.loads(line) for line in created.splitlines() if line.strip()]
            server = events[-1]["server"]
            assert events[-1]["state"] == "SERVER_STATE_ACTIVE", events[-1]
            run_cli(
                collector.endpoint, traceparent,
                "servers", "--address", provisioner.address, *cli, "stop", server,
            )  # fmt: skip
            captured = run_cli(
                collector.endpoint, traceparent,
                "images", "--address", serve.address, *cli, "create", "traced-capture",
                "--source-server", server, "--json",
            )  # fmt: skip
            image = json.loads(captured)["name"]
            wait_until_active(serve.address, token, image)
        finally:
            serve.stop()  # SIGTERM: each exports what it still holds
            provisioner.stop()

        def complete(spans: list[CollectedSpan]) -> bool:
            names = {(s.service, s.name, s.kind) for s in spans}
            return {
                ("bms-image", IMAGES + "DownloadImageData", SERVER),
                ("bms-image", IMAGES + "UploadImageData", SERVER),
                ("bms-image-provisioner", "fleet.deploy_server", 1),
            } <= names

        trace = Trace(collector.wait_for(complete, trace_id))

    assert {s.service for s in trace.spans} == {
        "bms-image-cli", "bms-image", "bms-image-provisioner",
    }, trace  # fmt: skip
    cli = "bms-image-cli"

    # the deployment: CLI -> provisioner -> (a task after the answer) -> image service
    command = trace.one(cli, "bms-image servers create")
    assert command.parent_id == root_span  # the script's TRACEPARENT
    create = trace.child(command, cli, PROVISIONING + "CreateServers", CLIENT)
    created_span = hop(trace, create, "bms-image-provisioner")
    deploy = trace.child(created_span, "bms-image-provisioner", "fleet.deploy", 1)
    assert deploy.attributes["bms.boot_source"] == "evs", deploy
    fetch = trace.child(deploy, "bms-image-provisioner", "fleet.fetch_image", 1)
    downloads = [
        s
        for s in trace.find("bms-image-provisioner", IMAGES + "DownloadImageData", CLIENT)
        if trace.under(s, fetch)
    ]
    assert downloads, f"the image fetch made no DownloadImageData in\n{trace}"
    hop(trace, downloads[0], "bms-image")
    one_server = trace.child(deploy, "bms-image-provisioner", "fleet.deploy_server", 1)
    assert one_server.attributes["bms.server"] == server
    for stage in ("fleet.write_system_disk", "fleet.first_boot", "fleet.install"):
        trace.child(one_server, "bms-image-provisioner", stage, 1)

    # the capture: CLI -> image service -> provisioner -> image service
    command = trace.one(cli, "bms-image images create")
    assert command.parent_id == root_span
    create_image = trace.child(command, cli, IMAGES + "CreateImage", CLIENT)
    served = hop(trace, create_image, "bms-image")
    start_capture = trace.child(served, "bms-image", CAPTURE + "StartServerCapture", CLIENT)
    capturing = hop(trace, start_capture, "bms-image-provisioner")
    capture = trace.child(capturing, "bms-image-provisioner", "fleet.capture", 1)
    upload = trace.child(capture, "bms-image-provisioner", IMAGES + "UploadImageData", CLIENT)
    hop(trace, upload, "bms-image")


def wait_until_active(address: str, token: str, image: str, timeout: float = 60.0) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = image_pb2_grpc.ImageServiceStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            got = stub.GetImage(image_pb2.GetImageRequest(name=image), metadata=bearer(token))
            if got.status == image_pb2.IMAGE_STATUS_ACTIVE:
                return
            assert (
                got.status == image_pb2.IMAGE_STATUS_QUEUED
                or got.status == image_pb2.IMAGE_STATUS_SAVING
            ), got
            assert time.monotonic() < deadline, f"{image} not ACTIVE after {timeout}s: {got}"
            time.sleep(0.2)


# -- in one process ----------------------------------------------------------------


@pytest.fixture
def exported() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    """Tracing into memory, each span exported as it ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, "bms-image", ["memory"])
    yield tracing, exporter
    tracing.shutdown()


def server_spans(exporter: InMemorySpanExporter, method: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.SERVER and s.name == IMAGES + method
    ]


MALFORMED_TRACEPARENTS = [
    "garbage",
    "00-" + "0" * 32 + "-" + "0" * 16 + "-01",  # the all-zero ids are invalid
    "00-" + "a" * 32 + "-" + "b" * 16,  # no flags
    "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",  # the forbidden version
    "00-" + "g" * 32 + "-" + "b" * 16 + "-01",  # not hex
    "00-" + "a" * 32 + "-" + "b" * 16 + "-01" + "x" * 6000,  # huge (under the 8 KiB limit)
    "00-" + "a" * 32 + "-" + "b" * 16 + "-01,00-" + "c" * 32 + "-" + "d" * 16 + "-01",
]


@pytest.mark.parametrize(
    "traceparent", MALFORMED_TRACEPARENTS, ids=range(len(MALFORMED_TRACEPARENTS))
)
async def test_a_malformed_or_huge_traceparent_starts_a_new_trace_and_the_call_succeeds(
    tmp_path: Path, exported: tuple[Tracing, InMemorySpanExporter], traceparent: str
) -> None:
    tracing, exporter = exported
    service = await start(make_settings(tmp_path), tracing)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            md = bearer(
                service.authority.issue("alpha"),
                ("traceparent", traceparent),
                ("tracestate", "=,," * 100 + "k=" + "v" * 300),
            )
            image = await image_pb2_grpc.ImageServiceStub(channel).GetImage(
                image_pb2.GetImageRequest(name=CENTOS_IMAGE), metadata=md, timeout=10
            )
    finally:
        await service.stop(0)
    assert image.name == CENTOS_IMAGE
    (span,) = server_spans(exporter, "GetImage")
    assert span.parent is None, span.parent  # a root: nothing of the header was taken
    assert span.context.trace_id not in (0, int("a" * 32, 16), int("c" * 32, 16))


async def test_a_valid_traceparent_is_continued(
    tmp_path: Path, exported: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = exported
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    service = await start(make_settings(tmp_path), tracing)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            md = bearer(
                service.authority.issue("alpha"), ("traceparent", f"00-{trace_id}-{parent}-01")
            )
            await image_pb2_grpc.ImageServiceStub(channel).GetImage(
                image_pb2.GetImageRequest(name=CENTOS_IMAGE), metadata=md, timeout=10
            )
    finally:
        await service.stop(0)
    (span,) = server_spans(exporter, "GetImage")
    assert span.context.trace_id == int(trace_id, 16)
    assert span.parent is not None and span.parent.span_id == int(parent, 16)


async def test_json_logs_carry_the_trace_id_next_to_the_request_id(
    tmp_path: Path, exported: tuple[Tracing, InMemorySpanExporter]
) -> None:
    tracing, exporter = exported
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    configure_logging("DEBUG", "json", buffer)  # DEBUG: a line for each successful call
    service = await start(make_settings(tmp_path), tracing)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            md = bearer(service.authority.issue("alpha"), ("x-request-id", "req-traced-1"))
            await image_pb2_grpc.ImageServiceStub(channel).GetImage(
                image_pb2.GetImageRequest(name=CENTOS_IMAGE), metadata=md, timeout=10
            )
    finally:
        await service.stop(0)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    records = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    (span,) = server_spans(exporter, "GetImage")
    mine = [r for r in records if r.get("request_id") == "req-traced-1"]
    assert mine, buffer.getvalue()
    assert {r["trace_id"] for r in mine} == {f"{span.context.trace_id:032x}"}
    assert all(len(r["span_id"]) == 16 and r["span_id"] != "-" for r in mine), mine
    outside = [r for r in records if r.get("request_id") == "-"]
    assert outside and all(r["trace_id"] == "-" and r["span_id"] == "-" for r in outside)


async def test_the_embedded_fleet_deploys_in_the_trace_of_create_servers(
    tmp_path: Path, exported: tuple[Tracing, InMemorySpanExporter]
) -> None:
    from bms.image.v1 import provisioning_pb2 as pb
    from bms.image.v1 import provisioning_pb2_grpc

    tracing, exporter = exported
    service = await start(make_settings(tmp_path), tracing)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
            request = pb.CreateServersRequest(
                flavor="flavors/physical.s4.large", image=CENTOS_IMAGE, count=2,
                name_prefix="t", boot_source=pb.BOOT_SOURCE_LOCAL_DISK,
            )  # fmt: skip
            md = bearer(service.authority.issue("alpha"))
            async for event in stub.CreateServers(request, metadata=md, timeout=60):
                last = event
            assert last.stage in (pb.PROVISIONING_STAGE_ACTIVE,), last
            for _ in range(100):  # the last stage's span ends just after its event
                if sum(s.name == "fleet.deploy" for s in exporter.get_finished_spans()):
                    break
                await asyncio.sleep(0.02)
    finally:
        await service.stop(0)
    spans = exporter.get_finished_spans()
    (create,) = [s for s in spans if s.name == PROVISIONING + "CreateServers"]
    same_trace = [s for s in spans if s.context.trace_id == create.context.trace_id]
    names = [s.name for s in same_trace]
    assert names.count("fleet.deploy_server") == 2, names
    assert names.count("fleet.write_system_disk") == 2, names
    (deploy,) = [s for s in same_trace if s.name == "fleet.deploy"]
    assert deploy.parent is not None and deploy.parent.span_id == create.context.span_id
    downloads = [s for s in same_trace if s.name == IMAGES + "DownloadImageData"]
    assert {s.kind for s in downloads} == {SpanKind.CLIENT, SpanKind.SERVER}, names
