"""When tracing is on (tracing.tracing_wanted and start_tracing), what it
installs when off (nothing: no SDK module, no interceptor), service names,
and the fleet's Spans port."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bms_image.common import serving
from bms_image.common.auth import TokenAuthority
from bms_image.common.guard import CallGuard
from bms_image.common.telemetry import logs
from bms_image.common.telemetry.metrics import ServiceMetrics
from bms_image.common.telemetry.tracing import (
    CLI_SERVICE_NAME,
    SERVE_SERVICE_NAME,
    OtelSpans,
    Tracing,
    start_tracing,
    tracing_wanted,
)
from bms_image.fleet.domain.ports import NO_SPANS
from support.services import make_settings
from support.tokens import TEST_SECRET

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        (ENDPOINT, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", **ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "true", **ENDPOINT}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", **ENDPOINT}, True),
    ],
)
def test_tracing_is_on_only_when_an_exporter_or_endpoint_is_set_and_the_sdk_not_disabled(
    environ: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(environ) is wanted
    if not wanted:
        assert start_tracing("bms-image", environ) is None


def test_off_imports_nothing_of_opentelemetry() -> None:
    """In a fresh interpreter: the processes' and the CLI's modules, and
    start_tracing without OTEL_* (or with OTEL_SDK_DISABLED), load no
    OpenTelemetry module at all."""
    program = (
        "import sys\n"
        "import bms_image.processes, bms_image.cli\n"
        "from bms_image.cli.tracing import trace_command\n"
        "from bms_image.common.telemetry.tracing import start_tracing\n"
        "assert start_tracing('bms-image', {}) is None\n"
        "assert start_tracing('bms-image', {'OTEL_SDK_DISABLED': 'true',"
        " 'OTEL_TRACES_EXPORTER': 'otlp'}) is None\n"
        "assert trace_command('bms-image images list', {}) is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def made_servers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every grpc.aio.server serving.new_server makes."""
    made: list[dict[str, Any]] = []

    def server(**kwargs: Any) -> object:
        made.append(kwargs)
        return object()

    monkeypatch.setattr(grpc.aio, "server", server)
    return made


@pytest.fixture
def memory_tracing() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, "bms-image", ["memory"])
    yield tracing, exporter
    tracing.shutdown()


def test_off_the_server_has_only_the_call_guard(
    tmp_path: Any, made_servers: list[dict[str, Any]]
) -> None:
    authority = TokenAuthority(TEST_SECRET)
    serving.new_server(make_settings(tmp_path), authority, ServiceMetrics(), None)
    (interceptors,) = [kwargs["interceptors"] for kwargs in made_servers]
    assert [type(i) for i in interceptors] == [CallGuard]


def test_on_the_tracing_interceptor_goes_first_outside_the_guard(
    tmp_path: Any,
    made_servers: list[dict[str, Any]],
    memory_tracing: tuple[Tracing, InMemorySpanExporter],
) -> None:
    from opentelemetry.instrumentation.grpc._aio_server import OpenTelemetryAioServerInterceptor

    authority = TokenAuthority(TEST_SECRET)
    serving.new_server(make_settings(tmp_path), authority, ServiceMetrics(), memory_tracing[0])
    (interceptors,) = [kwargs["interceptors"] for kwargs in made_servers]
    assert [type(i) for i in interceptors] == [OpenTelemetryAioServerInterceptor, CallGuard]


def test_default_service_names_and_otel_service_name_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    environ = {"OTEL_TRACES_EXPORTER": "console"}
    tracing = start_tracing(CLI_SERVICE_NAME, environ)
    assert tracing is not None and tracing.service_name == "bms-image-cli"
    tracing.shutdown()
    # the SDK reads OTEL_SERVICE_NAME (and OTEL_RESOURCE_ATTRIBUTES) from the process's environment
    monkeypatch.setenv("OTEL_SERVICE_NAME", "images-eu-1")
    tracing = start_tracing(CLI_SERVICE_NAME, {**environ, "OTEL_SERVICE_NAME": "images-eu-1"})
    assert tracing is not None and tracing.service_name == "images-eu-1"
    tracing.shutdown()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    attributes = "deployment.environment=prod,service.name=images-eu-2"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", attributes)
    tracing = start_tracing(CLI_SERVICE_NAME, {**environ, "OTEL_RESOURCE_ATTRIBUTES": attributes})
    assert tracing is not None and tracing.service_name == "images-eu-2"
    tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "not zipkin"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "grpc"),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "grpc"),
    ],
)
def test_an_exporter_or_protocol_we_do_not_ship_is_refused_at_start(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        start_tracing("bms-image", environ)


def test_logs_follow_spans_only_while_tracing_is_on(
    memory_tracing: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, _ = memory_tracing
    assert logs.tracing_followed()
    tracing.shutdown()
    assert not logs.tracing_followed()


def test_the_spans_port_nests_and_marks_failures(
    memory_tracing: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = memory_tracing
    spans = tracing.spans()
    assert isinstance(spans, OtelSpans)
    with pytest.raises(ValueError), spans.span("fleet.deploy", {"bms.server_count": 2}):
        with spans.span("fleet.fetch_image"):
            pass
        raise ValueError("disk on fire")
    fetch, deploy = exporter.get_finished_spans()
    assert fetch.parent is not None and fetch.parent.span_id == deploy.context.span_id
    assert deploy.attributes == {"bms.server_count": 2}
    assert not deploy.status.is_ok and deploy.events[0].name == "exception"
    with NO_SPANS.span("fleet.deploy", {"bms.server_count": 2}):
        pass  # tracing off: an empty block
    assert len(exporter.get_finished_spans()) == 2


def _otlp_timeout(tracing: object) -> float:
    """The OTLP exporter's timeout (seconds), read from the SDK's objects."""
    processor = tracing.provider._active_span_processor._span_processors[0]  # type: ignore[attr-defined]
    batch = processor._batch_processor
    exporter = next(value for name, value in vars(batch).items() if "export" in name)
    return float(exporter._timeout)


def test_a_cli_command_waits_at_most_its_own_export_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unreachable collector must not hold every command for the SDK's
    10 s of retries; OTEL_EXPORTER_OTLP_TIMEOUT still decides when set."""
    from bms_image.cli.tracing import CLI_EXPORT_TIMEOUT_SECONDS

    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    cli = start_tracing(CLI_SERVICE_NAME, environ, CLI_EXPORT_TIMEOUT_SECONDS)
    served = start_tracing(SERVE_SERVICE_NAME, environ)
    assert cli is not None and served is not None
    try:
        assert _otlp_timeout(cli) == CLI_EXPORT_TIMEOUT_SECONDS < _otlp_timeout(served)
    finally:
        cli.shutdown()
        served.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "7")
    chosen = start_tracing(CLI_SERVICE_NAME, {**environ, "OTEL_EXPORTER_OTLP_TIMEOUT": "7"}, 2.0)
    assert chosen is not None
    try:
        assert _otlp_timeout(chosen) == 7.0
    finally:
        chosen.shutdown()
