"""Errors of calls to our other services (ImageService for the provisioner,
ServerCaptureService for the image service), turned back into domain errors
so that the original caller sees the code, reason and details of the service
that refused."""

from __future__ import annotations

import logging
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bms_image.common import errors

M = TypeVar(
    "M",
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
)

log = logging.getLogger(__name__)

#: What a caller is told of a failure that did not come from our peer's own
#: guard (no ErrorInfo): gRPC's own texts name addresses, ports and
#: resolver or TLS internals, which stay in our log.
_PLAIN_TEXTS = {
    grpc.StatusCode.UNAVAILABLE: "cannot be reached now; try again later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "did not answer in time; try again later",
    grpc.StatusCode.CANCELLED: "call was cancelled",
}

_CLASSES: dict[grpc.StatusCode, type[errors.DomainError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
}


def domain_error(error: grpc.aio.AioRpcError, peer: str = "image service") -> errors.DomainError:
    details: list[any_pb2.Any] = []
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    if status is not None:
        details = list(status.details)
    info = _unpacked(details, error_details_pb2.ErrorInfo)
    code = error.code()
    reason = info.reason if info is not None else code.name
    if info is not None:  # our peer's guard answered: its text is meant for the caller
        message = f"{peer}: {error.details() or code.name}"
    else:
        log.warning("call to the %s failed: %s %s", peer, code.name, error.details())
        message = f"{peer}: {_PLAIN_TEXTS.get(code, 'the call failed')} ({code.name})"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        bad = _unpacked(details, error_details_pb2.BadRequest)
        return errors.InvalidArgument(
            reason,
            message,
            [errors.FieldViolation(v.field, v.description) for v in bad.field_violations]
            if bad
            else (),
        )
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        failure = _unpacked(details, error_details_pb2.PreconditionFailure)
        return errors.FailedPrecondition(
            reason,
            message,
            [
                errors.PreconditionViolation(v.type, v.subject, v.description)
                for v in failure.violations
            ]
            if failure
            else (),
        )
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        quota = _unpacked(details, error_details_pb2.QuotaFailure)
        return errors.QuotaExceeded(
            reason,
            message,
            [errors.QuotaViolation(v.subject, v.description) for v in quota.violations]
            if quota
            else (),
        )
    unavailable = peer.upper().replace(" ", "_") + "_UNAVAILABLE"
    if code is grpc.StatusCode.UNAVAILABLE:  # retryable: the caller may try again
        return errors.Unavailable(info.reason if info is not None else unavailable, message)
    cls = _CLASSES.get(code)
    if cls is None:
        return errors.FailedPrecondition(unavailable, message)
    return cls(reason, message)


def _unpacked(details: list[any_pb2.Any], kind: type[M]) -> M | None:
    for detail in details:
        message = kind()
        if detail.Unpack(message):
            return message
    return None
