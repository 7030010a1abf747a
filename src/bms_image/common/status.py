"""Domain errors -> gRPC status with google.rpc details (via grpcio-status)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from bms_image.common import errors

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


_CODES: list[tuple[type[errors.DomainError], grpc.StatusCode]] = [
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_code_of(error: errors.DomainError) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


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
