"""Errors of calls to ImageService, turned back into domain errors so that
the provisioner's callers see the image service's code and reason."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ..domain import errors

_CLASSES: dict[grpc.StatusCode, type[errors.DomainError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.QuotaExceeded,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
}


def domain_error(error: grpc.aio.AioRpcError) -> errors.DomainError:
    reason = error.code().name
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    cls = _CLASSES.get(error.code())
    message = f"image service: {error.details() or error.code().name}"
    if cls is None:
        return errors.FailedPrecondition("IMAGE_SERVICE_UNAVAILABLE", message)
    return cls(reason, message)
