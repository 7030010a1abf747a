"""Errors of calls to our other services (ImageService for the provisioner,
ServerCaptureService for the image service), turned back into domain errors
so that the original caller sees the code, reason and details of the service
that refused."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from bms_image.common import errors
from bms_image.common.status import error_class_of, error_of, unpacked

log = logging.getLogger(__name__)

#: What a caller is told of a failure that did not come from our peer's own
#: guard (no ErrorInfo): gRPC's own texts name addresses, ports and
#: resolver or TLS internals, which stay in our log.
_PLAIN_TEXTS = {
    grpc.StatusCode.UNAVAILABLE: "cannot be reached now; try again later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "did not answer in time; try again later",
    grpc.StatusCode.CANCELLED: "call was cancelled",
}


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry that passes the original caller's token on to a peer."""
    return ("authorization", f"Bearer {token}")


def domain_error(error: grpc.aio.AioRpcError, peer: str = "image service") -> errors.DomainError:
    """The domain error the peer's status stands for (errors.CODES, read
    backwards): its code, reason and violations. A code no domain error has
    (the peer failed, or the call never got there) is FAILED_PRECONDITION
    <PEER>_UNAVAILABLE; UNAVAILABLE keeps its code, since a retry may succeed."""
    details: list[any_pb2.Any] = []
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    if status is not None:
        details = list(status.details)
    info = unpacked(details, error_details_pb2.ErrorInfo)
    code = error.code()
    reason = info.reason if info is not None else code.name
    if info is not None:  # our peer's guard answered: its text is meant for the caller
        message = f"{peer}: {error.details() or code.name}"
    else:
        log.warning("call to the %s failed: %s %s", peer, code.name, error.details())
        message = f"{peer}: {_PLAIN_TEXTS.get(code, 'the call failed')} ({code.name})"
    unavailable = peer.upper().replace(" ", "_") + "_UNAVAILABLE"
    error_type = error_class_of(code)
    if error_type is None:
        return errors.FailedPrecondition(unavailable, message)
    if error_type is errors.Unavailable and info is None:
        reason = unavailable
    return error_of(error_type, reason, message, details)
