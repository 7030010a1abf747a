"""Distributed tracing with OpenTelemetry, configured by the standard OTEL_*
environment variables (README "Tracing").

Tracing is off unless OTEL_TRACES_EXPORTER names an exporter or an OTLP
endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), and OTEL_SDK_DISABLED=true switches it
off whatever else is set. Off, `start_tracing` returns None: no SDK module is
imported, no interceptor is installed and no span is made, so it costs
nothing. On, it returns a `Tracing` that the composition roots hand to the
servers (an interceptor, outermost, that continues the caller's W3C
traceparent), to our channels (interceptors that send it on) and to the
fleet (spans of a deployment's stages), and that the process shuts down last
so the spans still buffered are exported.

The SDK reads the rest itself: OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*,
OTEL_EXPORTER_OTLP_(TRACES_)HEADERS, _TIMEOUT, _INSECURE, _CERTIFICATE,
OTEL_RESOURCE_ATTRIBUTES, OTEL_PROPAGATORS. A caller's traceparent is data
from a stranger: the propagator parses it with a strict pattern and ignores
what does not match, so a malformed one starts a new trace and never fails
the call (tests/telemetry/test_tracing.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bms_image.common.telemetry import logs

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

#: service.name of each process unless OTEL_SERVICE_NAME (or service.name in
#: OTEL_RESOURCE_ATTRIBUTES) says otherwise.
SERVE_SERVICE_NAME = "bms-image"
PROVISIONER_SERVICE_NAME = "bms-image-provisioner"
CLI_SERVICE_NAME = "bms-image-cli"

#: Services whose calls make no server spans: probes and tooling, called
#: every few seconds by balancers, would bury the traces worth reading.
#: OTEL_PYTHON_GRPC_EXCLUDED_SERVICES adds to them.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
#: The exporters OTEL_TRACES_EXPORTER may name (comma-separated); "none" switches tracing off.
EXPORTERS = ("otlp", "console")

_TRUE = "true"


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether the environment switches tracing on (see the module's doc)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == _TRUE:
        return False
    exporters = _exporter_names(environ)
    if exporters is not None:
        return exporters != ["none"]
    return any(
        environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter_names(environ: Mapping[str, str]) -> list[str] | None:
    value = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not value:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def _service_name(environ: Mapping[str, str], default: str) -> str | None:
    """Our default name, unless the environment names the service (then the
    SDK's resource detector takes it from there)."""
    if environ.get("OTEL_SERVICE_NAME", "").strip():
        return None
    attributes = environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if any(part.split("=", 1)[0].strip() == "service.name" for part in attributes.split(",")):
        return None
    return default


def _check_protocol(environ: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip().lower()
        if protocol:
            if protocol != "grpc":
                raise RuntimeError(
                    f"{name}={protocol}: bms-image exports OTLP over gRPC only; "
                    "set it to grpc, or leave it unset"
                )
            return


@dataclass
class Tracing:
    """Tracing switched on in this process: its tracer provider (never the
    global one, so each service in a test process keeps its own). From now
    on log records carry the ids of the span they are logged in."""

    provider: TracerProvider
    service_name: str
    exporters: list[str]

    def __post_init__(self) -> None:
        logs.follow_spans(_current_span_ids)

    def tracer(self, name: str) -> Tracer:
        return self.provider.get_tracer(name)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The interceptor that opens a server span per call, continuing the
        caller's trace; it goes before (outside) the call guard, so the
        guard's log lines and refusals belong to the span."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_name

        excluded = [*UNTRACED_SERVICES, *_listed(os.environ, "OTEL_PYTHON_GRPC_EXCLUDED_SERVICES")]
        only = negate(any_of(*(service_name(name) for name in excluded)))
        # The instrumentation has no type hints (hence the ignores here).
        interceptor = aio_server_interceptor(tracer_provider=self.provider, filter_=only)  # type: ignore[no-untyped-call]
        return [interceptor]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """For grpc.aio channels to our other service: a client span per
        call, its context sent on as traceparent metadata."""
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider
        )
        return interceptors

    def intercept(self, channel: grpc.Channel) -> grpc.Channel:
        """A synchronous channel (the CLI's) that traces its calls."""
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

        interceptor = client_interceptor(tracer_provider=self.provider)  # type: ignore[no-untyped-call]
        traced: grpc.Channel = intercept_channel(channel, interceptor)  # type: ignore[no-untyped-call]
        return traced

    def spans(self) -> OtelSpans:
        """Our own spans (the fleet's deployment stages)."""
        return OtelSpans(self.tracer("bms_image"))

    def shutdown(self) -> None:
        """Exports what is still buffered (bounded by OTEL_BSP_EXPORT_TIMEOUT),
        then stops; spans made later are dropped."""
        logs.follow_spans(None)
        self.provider.shutdown()


def _listed(environ: Mapping[str, str], name: str) -> list[str]:
    return [part.strip() for part in environ.get(name, "").split(",") if part.strip()]


class OtelSpans:
    """The fleet's Spans port (fleet.domain.ports.Spans) over an OpenTelemetry
    tracer: each span is current while its block runs, so RPCs made inside
    it (and tasks started inside it) are its children; an exception leaving
    the block marks it failed."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, str | int] | None = None) -> Iterator[None]:
        with self._tracer.start_as_current_span(name, attributes=attributes):
            yield


def _current_span_ids() -> tuple[str, str] | None:
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def start_tracing(
    default_service_name: str,
    environ: Mapping[str, str] | None = None,
    export_timeout_seconds: float | None = None,
) -> Tracing | None:
    """Tracing for this process when the environment asks for it (else None,
    having imported nothing of the SDK). RuntimeError for an exporter or
    protocol we do not ship. `export_timeout_seconds`: how long an OTLP
    export (its retries included) may take unless OTEL_EXPORTER_OTLP_(TRACES_)
    TIMEOUT says; None keeps the SDK's 10 s."""
    environ = os.environ if environ is None else environ
    if not tracing_wanted(environ):
        return None
    exporters = _exporter_names(environ) or ["otlp"]
    unknown = [name for name in exporters if name not in EXPORTERS]
    if unknown:
        raise RuntimeError(
            f"OTEL_TRACES_EXPORTER={','.join(exporters)}: bms-image ships the exporters "
            f"{', '.join(EXPORTERS)} (or none to switch tracing off), not {', '.join(unknown)}"
        )
    if "otlp" in exporters:
        _check_protocol(environ)

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    name = _service_name(environ, default_service_name)
    resource = Resource.create({SERVICE_NAME: name} if name else {})
    provider = TracerProvider(resource=resource)
    for exporter_name in exporters:
        exporter: SpanExporter
        if exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            timeout_set = any(
                environ.get(name, "").strip()
                for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
            )
            exporter = OTLPSpanExporter(timeout=None if timeout_set else export_timeout_seconds)
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    service_name = str(resource.attributes.get(SERVICE_NAME, default_service_name))
    return Tracing(provider, service_name, exporters)
