"""The verified caller of the RPC being served, set by the auth interceptor."""

from __future__ import annotations

from contextvars import ContextVar

from bms_image.common.model import Caller

_caller: ContextVar[Caller] = ContextVar("bms_image_caller")
_token: ContextVar[str] = ContextVar("bms_image_token")


def current_caller() -> Caller:
    return _caller.get()


def current_token() -> str:
    """The caller's verified bearer token, passed on when the provisioner
    calls ImageService for it (so visibility is checked again there)."""
    return _token.get()


def set_caller(caller: Caller, token: str) -> tuple[object, object]:
    return _caller.set(caller), _token.set(token)


def reset_caller(tokens: tuple[object, object]) -> None:
    _caller.reset(tokens[0])  # type: ignore[arg-type]
    _token.reset(tokens[1])  # type: ignore[arg-type]
