"""Opaque, tamper-proof page tokens for keyset pagination.

A token carries the position after which the next page starts, bound to the
caller and the query it was issued for, and signed with HMAC-SHA256; a token
that was altered or is reused with another filter is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from bms_image.common.errors import invalid_field

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: The tokens this service issues are far shorter (a position, a scope digest
#: and a MAC: under 100 characters; a member project as the position, at most
#: 64 ASCII characters, makes it about 150): a longer one is refused before
#: it is decoded.
MAX_PAGE_TOKEN_LENGTH = 512


def page_size_or_default(page_size: int) -> int:
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise invalid_field("page_size", f"is {page_size}; must be between 0 and {MAX_PAGE_SIZE}")
    return page_size or DEFAULT_PAGE_SIZE


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _scope(self, scope: str) -> str:
        return hashlib.sha256(scope.encode()).hexdigest()[:16]

    def encode(self, after: int, scope: str) -> str:
        return self._encode(after, scope)

    def encode_text(self, after: str, scope: str) -> str:
        """A token positioned after a text key (e.g. a project id)."""
        return self._encode(after, scope)

    def decode_text(self, token: str, scope: str) -> str:
        """The text key after which the page starts ("" for no token)."""
        after = self._decode(token, scope, str)
        return after if isinstance(after, str) else ""

    def _encode(self, after: int | str, scope: str) -> str:
        body = json.dumps({"a": after, "s": self._scope(scope)}, separators=(",", ":")).encode()
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(body + mac).decode().rstrip("=")

    def decode(self, token: str, scope: str) -> int:
        """Returns the position after which the page starts (0 for no token)."""
        after = self._decode(token, scope, int)
        return after if isinstance(after, int) else 0

    def _decode(self, token: str, scope: str, kind: type) -> int | str | None:
        if not token:
            return None
        bad = invalid_field(
            "page_token",
            "is not a token this service issued for this request; "
            "send the next_page_token of the previous page with the same filter",
            reason="INVALID_PAGE_TOKEN",
        )
        if len(token) > MAX_PAGE_TOKEN_LENGTH:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, UnicodeEncodeError):
            raise bad from None
        body, mac = raw[:-16], raw[-16:]
        expected = hmac.new(self._key, body, hashlib.sha256).digest()[:16]
        if len(raw) <= 16 or not hmac.compare_digest(mac, expected):
            raise bad
        # Only bytes this service signed get this far, to the JSON parser.
        try:
            data = json.loads(body)
            after, token_scope = data["a"], data["s"]
        except (ValueError, KeyError, TypeError):
            raise bad from None
        if token_scope != self._scope(scope) or type(after) is not kind:
            raise bad
        if isinstance(after, str):
            return after
        if not isinstance(after, int) or after < 0:
            raise bad
        return after
