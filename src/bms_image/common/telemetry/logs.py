"""Logs that say which call they belong to: every record carries the call's
request id (taken from the caller's `x-request-id` metadata when valid, else
generated), its method and project. Tokens, metadata and request bodies are
never logged."""

from __future__ import annotations

import logging
import random
import re
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(project)s]: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(project)s %(rpc)s"


@dataclass
class CallInfo:
    request_id: str
    method: str
    project: str = ""


_call: ContextVar[CallInfo | None] = ContextVar("bms_image_call", default=None)


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
    """Adds request_id, project and rpc to every record ("-" outside calls)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = _call.get()
        record.request_id = info.request_id if info else "-"
        record.project = (info.project or "-") if info else "-"
        record.rpc = info.method if info else "-"
        return True


def configure_logging(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Root logging for a service process (to stderr unless `stream`): text
    for people, JSON (one object per line) for log pipelines."""
    if log_format not in ("text", "json"):
        raise RuntimeError(f"log format must be text or json, not {log_format!r}")
    handler = logging.StreamHandler(stream)
    handler.addFilter(CallContextFilter())
    handler.setFormatter(
        JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time"})
        if log_format == "json"
        else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
