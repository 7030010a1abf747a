"""Tracing of one client command: while the OTEL_* environment switches
tracing on (common.telemetry.tracing), a command is one span named after it
(`bms-image images list`), and each of its calls a client span under it that
sends the trace on to the service, so every call of the command, its pages,
chunks and deploy events, is one trace. A script can make several commands
one trace by setting TRACEPARENT (and TRACESTATE), the W3C headers, in their
environment: the command's span is then that context's child. The spans are
exported when the command ends."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bms_image.common.telemetry.tracing import CLI_SERVICE_NAME, Tracing, start_tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span


#: How long a command may wait at its end to export its spans (its OTLP
#: retries included) unless OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT says: an
#: unreachable collector must not hold every command for the SDK's 10 s.
CLI_EXPORT_TIMEOUT_SECONDS = 2.0


@dataclass
class CommandTrace:
    tracing: Tracing
    span: Span
    _token: object

    def close(self) -> None:
        """Ends the command's span and exports what is buffered."""
        from opentelemetry import context

        context.detach(self._token)  # type: ignore[arg-type]
        self.span.end()
        self.tracing.shutdown()


def trace_command(name: str, environ: Mapping[str, str] | None = None) -> CommandTrace | None:
    """The command's span, current until close(); None while tracing is off.
    RuntimeError for an exporter or protocol we do not ship."""
    environ = os.environ if environ is None else environ
    tracing = start_tracing(CLI_SERVICE_NAME, environ, CLI_EXPORT_TIMEOUT_SECONDS)
    if tracing is None:
        return None
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {
        header: environ[variable]
        for header, variable in (("traceparent", "TRACEPARENT"), ("tracestate", "TRACESTATE"))
        if environ.get(variable)
    }
    parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
    span = tracing.tracer("bms_image.cli").start_span(name, context=parent)
    token = context.attach(trace.set_span_in_context(span, parent))
    return CommandTrace(tracing, span, token)
