"""One token helper: the `authorization` metadata a call carries."""

from __future__ import annotations

from bms_image.common.auth import TokenAuthority

TEST_SECRET = "test-secret-" + "0" * 52

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str, *extra: tuple[str, str]) -> Metadata:
    """The metadata of a call that presents `token` (plus `extra` pairs)."""
    return (("authorization", f"Bearer {token}"), *extra)


def issue(project: str, admin: bool = False, secret: str = TEST_SECRET) -> str:
    """A token for `project` (the platform admin's with `admin`), signed with
    the tests' secret unless told otherwise."""
    return TokenAuthority(secret).issue(project, admin)


def metadata_for(project: str, admin: bool = False, secret: str = TEST_SECRET) -> Metadata:
    """The metadata of a call made by `project` (or its admin)."""
    return bearer(issue(project, admin, secret))
