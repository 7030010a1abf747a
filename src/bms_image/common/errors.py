"""Domain errors. Each carries a stable machine-readable reason; CODES gives
the status code of each class, which common.status turns into a gRPC status
(and common.remote back into the class), the details into google.rpc
messages. No grpc here: the domains import this module."""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    """One unmet precondition (google.rpc.PreconditionFailure.Violation)."""

    type: str
    subject: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exceeded quota (google.rpc.QuotaFailure.Violation)."""

    subject: str
    description: str


class DomainError(Exception):
    """Base of every error the domain raises on purpose."""

    def __init__(
        self, reason: str, message: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class Unauthenticated(DomainError):
    """The caller did not prove who it is."""


class NotFound(DomainError):
    """The resource does not exist or the caller may not see it."""


class PermissionDenied(DomainError):
    """The caller sees the resource but may not do this to it."""


class InvalidArgument(DomainError):
    """The request itself is wrong, whatever the state of the system."""

    def __init__(
        self,
        reason: str,
        message: str,
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(reason, message, metadata)
        self.violations = list(violations)


class FailedPrecondition(DomainError):
    """The request is valid but the system is not in a state that allows it."""

    def __init__(
        self,
        reason: str,
        message: str,
        violations: Sequence[PreconditionViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(reason, message, metadata)
        self.violations = list(violations)


class QuotaExceeded(DomainError):
    """A per-project limit would be exceeded."""

    def __init__(
        self,
        reason: str,
        message: str,
        violations: Sequence[QuotaViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(reason, message, metadata)
        self.violations = list(violations)


class DataLoss(DomainError):
    """Bytes arrived damaged (their checksum does not match)."""


class Aborted(DomainError):
    """A concurrent change won (stale etag); read again and retry."""


class Unavailable(DomainError):
    """A dependency (database, blob store, another of our services) cannot be
    reached now; the same call may succeed when retried later."""


#: The status code of each kind of error, by its google.rpc.Code name: the one
#: table from error to code. common.status derives both directions from it
#: (status_code_of for our answers, error_class_of for a peer's), so adding an
#: error kind is one line here. A class is listed before any base it has: the
#: first line an error is an instance of gives its code.
CODES: tuple[tuple[type[DomainError], str], ...] = (
    (Unauthenticated, "UNAUTHENTICATED"),
    (NotFound, "NOT_FOUND"),
    (PermissionDenied, "PERMISSION_DENIED"),
    (InvalidArgument, "INVALID_ARGUMENT"),
    (FailedPrecondition, "FAILED_PRECONDITION"),
    (QuotaExceeded, "RESOURCE_EXHAUSTED"),
    (Aborted, "ABORTED"),
    (DataLoss, "DATA_LOSS"),
    (Unavailable, "UNAVAILABLE"),
)


def code_name_of(error: DomainError) -> str | None:
    """The google.rpc.Code name of the error's class (e.g. "NOT_FOUND"); None
    for a class CODES does not list (a plain DomainError: INTERNAL)."""
    for error_type, name in CODES:
        if isinstance(error, error_type):
            return name
    return None


def invalid_field(field: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
    """The common case of one bad field."""
    return InvalidArgument(reason, f"{field}: {description}", [FieldViolation(field, description)])


def raise_if_invalid(violations: Sequence[FieldViolation], reason: str) -> None:
    """InvalidArgument(reason) listing every violation, if there is any."""
    if violations:
        summary = "; ".join(f"{v.field} {v.description}" for v in violations)
        raise InvalidArgument(reason, f"invalid request: {summary}", violations)


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_storage_full(error: OSError) -> bool:
    """ENOSPC (the file system is full) or EDQUOT (the user's quota is)."""
    return error.errno in _FULL_ERRNOS


def storage_full(storage: str) -> QuotaExceeded:
    """The domain error for a full file system or bucket: it names the kind
    of storage (`staging area`, `image store`), never a host path."""
    return QuotaExceeded(
        "STORAGE_FULL",
        f"the service's {storage} is full; retry later (an administrator must free space)",
        [QuotaViolation(f"storage/{storage.replace(' ', '-')}", "no space left")],
    )


class StagedBytesMissing(Exception):
    """Fewer bytes are staged than the upload's recorded offset (the staged
    chunks were lost, or a crash cut off their write): `available` is how
    many are really there, durable."""

    def __init__(self, subject: str, offset: int, available: int) -> None:
        super().__init__(f"{subject} has {available} bytes staged, not the {offset} expected")
        self.offset = offset
        self.available = available
