"""One decoder of the service's rich errors, with one rule per status code.

Every failed call must carry a google.rpc.Status with exactly one ErrorInfo
of our domain (an upper-case reason), and nothing the caller sees may hold a
traceback. On top of that, per code (what src/bms_image/common/status.py
sends):

- INVALID_ARGUMENT: a BadRequest with field violations, each naming a field
  and describing it;
- RESOURCE_EXHAUSTED: a QuotaFailure with violations;
- FAILED_PRECONDITION: any PreconditionFailure it carries names violations.
  The service does not send one with every FAILED_PRECONDITION (e.g.
  NOT_A_SHARED_IMAGE, CAPTURE_UNAVAILABLE carry only ErrorInfo, as the
  proto allows), so a folder whose calls all carry one asks for it:
  `precondition="failure"` (a PreconditionFailure) or `precondition="detail"`
  (a PreconditionFailure or ErrorInfo metadata); the default is "any";
- never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bms_image.common.status import ERROR_DOMAIN

Code = grpc.StatusCode
#: What a FAILED_PRECONDITION must carry besides ErrorInfo (see the module).
Precondition = Literal["any", "detail", "failure"]


@dataclass
class RichError:
    """A failed call with its decoded google.rpc.Status details."""

    error: grpc.RpcError
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    bad_request: error_details_pb2.BadRequest | None = None
    quota_failure: error_details_pb2.QuotaFailure | None = None
    precondition_failure: error_details_pb2.PreconditionFailure | None = None

    @property
    def code(self) -> grpc.StatusCode:
        return self.error.code()  # type: ignore[attr-defined,no-any-return]

    @property
    def reason(self) -> str:
        return self.info.reason

    @property
    def message(self) -> str:
        return self.error.details() or ""  # type: ignore[attr-defined,no-any-return]

    @property
    def fields(self) -> list[str]:
        assert self.bad_request is not None
        return [v.field for v in self.bad_request.field_violations]

    @property
    def violations(self) -> list[error_details_pb2.PreconditionFailure.Violation]:
        return list(self.precondition_failure.violations) if self.precondition_failure else []

    def everything(self) -> str:
        """All the caller learns from this error, as text: for leak checks."""
        return "\n".join(
            [self.message, str(self.status), str(self.error.trailing_metadata() or "")]  # type: ignore[attr-defined]
        )


def decode_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """grpc_status.rpc_status.from_call reads the call's trailing metadata and
    code, both of which a failed call offers synchronously."""
    return rpc_status.from_call(error)  # type: ignore[arg-type]


_DETAILS: tuple[tuple[str, Any], ...] = (
    ("bad_request", error_details_pb2.BadRequest),
    ("quota_failure", error_details_pb2.QuotaFailure),
    ("precondition_failure", error_details_pb2.PreconditionFailure),
)


def decode(error: grpc.RpcError, precondition: Precondition = "any") -> RichError:
    """Decodes and checks a rich status (the module's rules)."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details() or ""  # type: ignore[attr-defined]
    assert code not in (Code.INTERNAL, Code.UNKNOWN), (
        f"the service failed with {code.name}: {details}"
    )
    assert "Traceback" not in details
    debug = getattr(error, "debug_error_string", None)
    if debug is not None:
        assert "Traceback" not in (debug() or "")
    status = decode_status(error)
    assert status is not None, f"{code.name} without google.rpc.Status: {details}"
    assert status.code == code.value[0]
    assert status.message == details
    assert "Traceback" not in status.message
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {status.details}"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN, info
    assert info.reason and info.reason == info.reason.upper()
    rich = RichError(error=error, status=status, info=info)
    for packed in status.details:
        for attribute, message_type in _DETAILS:
            if packed.Is(message_type.DESCRIPTOR):
                message = message_type()
                packed.Unpack(message)
                setattr(rich, attribute, message)
                assert "Traceback" not in str(message)
    _check_code_rule(rich, precondition)
    return rich


def _check_code_rule(rich: RichError, precondition: Precondition) -> None:
    code = rich.code
    if code == Code.INVALID_ARGUMENT:
        assert rich.bad_request is not None, "INVALID_ARGUMENT without google.rpc.BadRequest"
        assert rich.bad_request.field_violations
        for violation in rich.bad_request.field_violations:
            assert violation.field and violation.description
    if code == Code.RESOURCE_EXHAUSTED:
        assert rich.quota_failure is not None, "RESOURCE_EXHAUSTED without google.rpc.QuotaFailure"
        assert rich.quota_failure.violations
    if code == Code.FAILED_PRECONDITION:
        if rich.precondition_failure is not None:
            assert rich.precondition_failure.violations
        if precondition == "failure":
            assert rich.precondition_failure is not None, (
                f"FAILED_PRECONDITION without google.rpc.PreconditionFailure: {rich.message}"
            )
        if precondition == "detail":
            assert rich.precondition_failure is not None or rich.info.metadata, (
                "FAILED_PRECONDITION with neither google.rpc.PreconditionFailure "
                f"nor ErrorInfo metadata: {rich.message}"
            )


def _check_expected(rich: RichError, code: grpc.StatusCode, reason: str | None) -> RichError:
    assert rich.code == code, f"expected {code.name}, got {rich.code.name}: {rich.message}"
    if reason:
        assert rich.reason == reason, f"expected {reason}, got {rich.reason}: {rich.message}"
    return rich


async def outcome(
    call: Awaitable[Any], precondition: Precondition = "any"
) -> tuple[Any, RichError | None]:
    """(response, None) or (None, decoded error)."""
    try:
        return await call, None
    except grpc.aio.AioRpcError as error:
        return None, decode(error, precondition)


async def expect_error(
    call: Awaitable[Any],
    code: grpc.StatusCode,
    reason: str | None = None,
    precondition: Precondition = "any",
) -> RichError:
    """Awaits a call that must fail with `code` (and `reason`, when given)."""
    response, rich = await outcome(call, precondition)
    assert rich is not None, f"expected {code.name}, the call succeeded: {response}"
    return _check_expected(rich, code, reason)


def expect_error_sync(
    call: Callable[[], Any], code: grpc.StatusCode, reason: str | None = None
) -> RichError:
    """expect_error for a blocking (grpc.Channel) call."""
    try:
        response = call()
    except grpc.RpcError as error:
        rich = decode(error)
    else:
        raise AssertionError(f"expected {code.name}, the call succeeded: {response}")
    return _check_expected(rich, code, reason)


async def expect_invalid(call: Awaitable[Any], field: str, reason: str | None = None) -> RichError:
    """INVALID_ARGUMENT whose BadRequest names `field` (exactly)."""
    rich = await expect_error(call, Code.INVALID_ARGUMENT, reason)
    assert field in rich.fields, f"expected a violation of {field!r}, got {rich.fields}"
    return rich


async def expect_code(call: Awaitable[Any], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """The call fails with `code` (no rich status required: transport errors)."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        assert error.code() == code, (
            f"expected {code.name}, got {error.code().name}: {error.details()}"
        )
        assert "Traceback" not in (error.details() or "")
        return error
    raise AssertionError(f"expected {code.name}, the call succeeded: {response}")


async def expect_stream_error(
    stream: Any, code: grpc.StatusCode, reason: str | None = None, within: float = 30.0
) -> RichError:
    """A streaming call that must fail before it streams any event."""
    received: list[Any] = []

    async def run() -> None:
        async for event in stream:
            received.append(event)

    rich = await expect_error(asyncio.wait_for(run(), within), code, reason)
    assert received == [], f"events streamed before the error: {received}"
    return rich
