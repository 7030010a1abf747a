"""errors.CODES is the one table from error to code: our answers (the call
guard's to_rpc_status) and what we make of a peer's (common.remote) both
derive from it, so every kind of domain error round-trips."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_status import rpc_status

from bms_image.common import errors
from bms_image.common.remote import domain_error
from bms_image.common.status import error_class_of, status_code_of, to_rpc_status


def _subclasses(cls: type[errors.DomainError]) -> set[type[errors.DomainError]]:
    found: set[type[errors.DomainError]] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def _example(error_type: type[errors.DomainError]) -> errors.DomainError:
    """An error of the type with every detail its kind can carry."""
    reason, message = f"{error_type.__name__.upper()}_REASON", f"a {error_type.__name__} happened"
    metadata = {"limit": "3"}
    if issubclass(error_type, errors.InvalidArgument):
        return error_type(
            reason,
            message,
            [errors.FieldViolation("image.tags", "too many"), errors.FieldViolation("a", "b")],
            metadata,
        )
    if issubclass(error_type, errors.FailedPrecondition):
        return error_type(
            reason,
            message,
            [errors.PreconditionViolation("STATUS", "images/x", "not active")],
            metadata,
        )
    if issubclass(error_type, errors.QuotaExceeded):
        return error_type(
            reason, message, [errors.QuotaViolation("projects/alpha", "limit 50")], metadata
        )
    return error_type(reason, message, metadata)


def _as_peer_answer(error: errors.DomainError) -> grpc.aio.AioRpcError:
    """The error as our guard sends it, as the calling side receives it."""
    status = rpc_status.to_status(to_rpc_status(error))
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
    )


LISTED = [error_type for error_type, _ in errors.CODES]


def test_every_domain_error_has_its_line() -> None:
    assert _subclasses(errors.DomainError) == set(LISTED)


def test_no_code_stands_for_two_kinds() -> None:
    names = [name for _, name in errors.CODES]
    assert len(set(names)) == len(names)
    assert all(name in grpc.StatusCode.__members__ for name in names)


@pytest.mark.parametrize("error_type", LISTED, ids=lambda t: t.__name__)
def test_each_kind_round_trips_with_its_reason_message_and_details(
    error_type: type[errors.DomainError],
) -> None:
    sent = _example(error_type)
    answer = _as_peer_answer(sent)
    assert answer.code() is status_code_of(sent)
    assert answer.code().name == errors.code_name_of(sent)
    assert error_class_of(answer.code()) is error_type

    received = domain_error(answer, peer="image service")

    assert type(received) is error_type
    assert received.reason == sent.reason
    assert received.message == f"image service: {sent.message}"
    assert getattr(received, "violations", None) == getattr(sent, "violations", None)
    assert received.metadata == {}  # ErrorInfo metadata stays with the peer, as before
    assert status_code_of(received) is status_code_of(sent)


def test_an_error_of_no_listed_kind_is_internal_and_comes_back_as_a_failed_peer() -> None:
    sent = errors.DomainError("DEPLOYMENT_FAILED", "deploying failed")
    assert errors.code_name_of(sent) is None
    answer = _as_peer_answer(sent)
    assert answer.code() is grpc.StatusCode.INTERNAL
    assert error_class_of(grpc.StatusCode.INTERNAL) is None

    received = domain_error(answer, peer="provisioner")

    assert type(received) is errors.FailedPrecondition
    assert received.reason == "PROVISIONER_UNAVAILABLE"
    assert received.message == "provisioner: deploying failed"


@pytest.mark.parametrize(
    ("code", "error_type", "reason", "says"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            errors.Unavailable,
            "IMAGE_SERVICE_UNAVAILABLE",
            "image service: cannot be reached now; try again later (UNAVAILABLE)",
        ),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            errors.FailedPrecondition,
            "IMAGE_SERVICE_UNAVAILABLE",
            "image service: did not answer in time; try again later (DEADLINE_EXCEEDED)",
        ),
        (
            grpc.StatusCode.NOT_FOUND,
            errors.NotFound,
            "NOT_FOUND",
            "image service: the call failed (NOT_FOUND)",
        ),
    ],
)
def test_a_status_without_error_info_keeps_grpc_texts_to_the_log(
    code: grpc.StatusCode, error_type: type[errors.DomainError], reason: str, says: str
) -> None:
    answer = grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), "failed to connect to 10.0.0.7:50051"
    )

    received = domain_error(answer)

    assert (type(received), received.reason, received.message) == (error_type, reason, says)


def test_the_errors_module_imports_no_grpc() -> None:
    """The domains import errors (and its table): it must not bring grpc."""
    probe = "import sys, bms_image.common.errors; print([m for m in sys.modules if 'grpc' in m])"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"
