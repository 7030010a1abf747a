"""Domain errors <-> gRPC statuses with google.rpc details (via grpcio-status),
both ways from the one table errors.CODES: to_rpc_status for what our guard
answers, error_class_of and error_of for what a peer answered us."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from bms_image.common import errors

M = TypeVar(
    "M",
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
)

ERROR_DOMAIN = "image.bms.cloud"
#: A status travels in HTTP/2 trailers, which clients cap (grpcio: 8 KiB
#: soft, 16 KiB hard): texts that quote a huge request value are cut, so the
#: caller still gets its real code and details. Limits are in UTF-8 bytes
#: (grpc-message percent-encodes every non-ASCII byte, tripling it), and the
#: worst case, all of them full, stays under 8 KiB.
MESSAGE_LIMIT = 512
DETAIL_LIMIT = 128
MAX_VIOLATIONS = 10


def bounded(text: str, limit: int = DETAIL_LIMIT) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, never inside a character."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "…"


#: errors.CODES, with grpc's codes (derived: errors.CODES is the one table).
_STATUS_CODES: tuple[tuple[type[errors.DomainError], grpc.StatusCode], ...] = tuple(
    (error_type, grpc.StatusCode[name]) for error_type, name in errors.CODES
)
#: A code listed twice names its first class.
_CLASSES: dict[grpc.StatusCode, type[errors.DomainError]] = {
    code: error_type for error_type, code in reversed(_STATUS_CODES)
}


def status_code_of(error: errors.DomainError) -> grpc.StatusCode:
    """The code we answer with; INTERNAL for an error errors.CODES does not list."""
    for error_type, code in _STATUS_CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def error_class_of(code: grpc.StatusCode) -> type[errors.DomainError] | None:
    """The class of error a peer's status code stands for; None for a code no
    domain error has (OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, ...)."""
    return _CLASSES.get(code)


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def unpacked(details: Sequence[any_pb2.Any], kind: type[M]) -> M | None:
    """The first of the status details that is a `kind`."""
    for detail in details:
        message = kind()
        if detail.Unpack(message):
            return message
    return None


def error_of(
    error_type: type[errors.DomainError],
    reason: str,
    message: str,
    details: Sequence[any_pb2.Any] = (),
) -> errors.DomainError:
    """An error of `error_type` with the violations its status details carry:
    what to_rpc_status packed, unpacked (ErrorInfo's metadata is not kept)."""
    if issubclass(error_type, errors.InvalidArgument):
        bad = unpacked(details, error_details_pb2.BadRequest)
        return error_type(
            reason,
            message,
            [errors.FieldViolation(v.field, v.description) for v in bad.field_violations]
            if bad
            else (),
        )
    if issubclass(error_type, errors.FailedPrecondition):
        failure = unpacked(details, error_details_pb2.PreconditionFailure)
        return error_type(
            reason,
            message,
            [
                errors.PreconditionViolation(v.type, v.subject, v.description)
                for v in failure.violations
            ]
            if failure
            else (),
        )
    if issubclass(error_type, errors.QuotaExceeded):
        quota = unpacked(details, error_details_pb2.QuotaFailure)
        return error_type(
            reason,
            message,
            [errors.QuotaViolation(v.subject, v.description) for v in quota.violations]
            if quota
            else (),
        )
    return error_type(reason, message)


def to_rpc_status(error: errors.DomainError) -> status_pb2.Status:
    code = status_code_of(error)
    details = [
        _packed(
            error_details_pb2.ErrorInfo(
                reason=error.reason,
                domain=ERROR_DOMAIN,
                metadata={bounded(k): bounded(v) for k, v in error.metadata.items()},
            )
        )
    ]
    if isinstance(error, errors.InvalidArgument) and error.violations:
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=bounded(v.field), description=bounded(v.description)
                        )
                        for v in error.violations[:MAX_VIOLATIONS]
                    ]
                )
            )
        )
    if isinstance(error, errors.FailedPrecondition) and error.violations:
        details.append(
            _packed(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=bounded(v.type),
                            subject=bounded(v.subject),
                            description=bounded(v.description),
                        )
                        for v in error.violations[:MAX_VIOLATIONS]
                    ]
                )
            )
        )
    if isinstance(error, errors.QuotaExceeded) and error.violations:
        details.append(
            _packed(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=bounded(v.subject), description=bounded(v.description)
                        )
                        for v in error.violations[:MAX_VIOLATIONS]
                    ]
                )
            )
        )
    return status_pb2.Status(
        code=getattr(code_pb2, code.name),
        message=bounded(error.message, MESSAGE_LIMIT),
        details=details,
    )
