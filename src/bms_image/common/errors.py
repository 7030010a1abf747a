"""Domain errors. Each carries a stable machine-readable reason; the API layer
maps the class to a gRPC status code and the details to google.rpc messages."""

from __future__ import annotations

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


def invalid_field(field: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
    """The common case of one bad field."""
    return InvalidArgument(reason, f"{field}: {description}", [FieldViolation(field, description)])
