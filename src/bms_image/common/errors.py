"""Domain errors. Each carries a stable machine-readable reason; the API layer
maps the class to a gRPC status code and the details to google.rpc messages."""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


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


def invalid_field(field: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
    """The common case of one bad field."""
    return InvalidArgument(reason, f"{field}: {description}", [FieldViolation(field, description)])


def raise_if_invalid(violations: Sequence[FieldViolation], reason: str) -> None:
    """InvalidArgument(reason) listing every violation, if there is any."""
    if violations:
        summary = "; ".join(f"{v.field} {v.description}" for v in violations)
        raise InvalidArgument(reason, f"invalid request: {summary}", violations)


#: The canonical status name (google.rpc.Code) of each kind of domain error,
#: by type, most specific first: the name a ServerEvent's error_code carries
#: (and the one grpc.StatusCode member of the same name). A DomainError of
#: no particular kind has none.
CODE_NAMES: tuple[tuple[type[DomainError], str], ...] = (
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


def code_name(error: DomainError) -> str:
    """The status name of the error's kind ("" for a plain DomainError)."""
    for kind, name in CODE_NAMES:
        if isinstance(error, kind):
            return name
    return ""


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
    """The staging file holds fewer bytes than the upload's recorded offset
    (the staging area was lost or restored, or the resume runs where the
    first half was not staged): `available` is how many are really there."""

    def __init__(self, path: Path, offset: int, available: int) -> None:
        super().__init__(f"staging file {path} has {available} bytes, not the {offset} expected")
        self.offset = offset
        self.available = available
