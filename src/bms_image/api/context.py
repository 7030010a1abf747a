"""The verified caller of the RPC being served, set by the auth interceptor."""

from __future__ import annotations

from contextvars import ContextVar

from ..domain.model import Caller

_caller: ContextVar[Caller] = ContextVar("bms_image_caller")


def current_caller() -> Caller:
    return _caller.get()


def set_caller(caller: Caller) -> object:
    return _caller.set(caller)


def reset_caller(token: object) -> None:
    _caller.reset(token)  # type: ignore[arg-type]
