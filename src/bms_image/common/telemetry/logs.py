"""Logs that say which call they belong to: every record carries the call's
request id (taken from the caller's `x-request-id` metadata when valid, else
generated), its method and project, and, while tracing is on, the trace and
span it belongs to (trace_id, span_id: "-" outside a span), so a log line
leads to its trace and a trace to its log lines. Tokens, metadata and
request bodies are never logged."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(project)s]: %(message)s"
#: The text format while tracing is on: the trace id next to the request id.
TRACED_TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(project)s %(trace_id)s]: %(message)s"
)
JSON_FIELDS = (
    "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(project)s %(rpc)s"
    " %(trace_id)s %(span_id)s"
)


@dataclass
class CallInfo:
    request_id: str
    method: str
    project: str = ""


_call: ContextVar[CallInfo | None] = ContextVar("bms_image_call", default=None)

#: The (trace id, span id) of the current span, or None outside one: set by
#: tracing.start_tracing while tracing is on (so this module never imports
#: OpenTelemetry), None while it is off.
SpanIds = Callable[[], "tuple[str, str] | None"]
_span_ids: SpanIds | None = None


def follow_spans(span_ids: SpanIds | None) -> None:
    """Lets every record carry the ids of the span it was logged in (None: stop)."""
    global _span_ids
    _span_ids = span_ids


def tracing_followed() -> bool:
    return _span_ids is not None


def request_id_from(value: str | bytes | None) -> str:
    """The caller's request id when it is a sane token, else a fresh one."""
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    # An id to correlate logs, not a secret: no system entropy per call.
    return f"{random.getrandbits(128):032x}"


def begin_call(request_id: str, method: str) -> tuple[CallInfo, Token[CallInfo | None]]:
    info = CallInfo(request_id, method)
    return info, _call.set(info)


def end_call(token: Token[CallInfo | None]) -> None:
    _call.reset(token)


def current_call() -> CallInfo | None:
    return _call.get()


class CallContextFilter(logging.Filter):
    """Adds request_id, project and rpc to every record ("-" outside calls),
    and trace_id and span_id ("-" outside spans, and while tracing is off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = _call.get()
        record.request_id = info.request_id if info else "-"
        record.project = (info.project or "-") if info else "-"
        record.rpc = info.method if info else "-"
        ids = _span_ids() if _span_ids is not None else None
        record.trace_id, record.span_id = ids if ids is not None else ("-", "-")
        return True


def configure_logging(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Root logging for a service process (to stderr unless `stream`): text
    for people, JSON (one object per line) for log pipelines. The text
    format shows the trace id only once tracing is on (start it first)."""
    if log_format not in ("text", "json"):
        raise RuntimeError(f"log format must be text or json, not {log_format!r}")
    handler = logging.StreamHandler(stream)
    handler.addFilter(CallContextFilter())
    handler.setFormatter(
        JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time"})
        if log_format == "json"
        else logging.Formatter(TRACED_TEXT_FORMAT if tracing_followed() else TEXT_FORMAT)
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
