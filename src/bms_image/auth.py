"""Bearer tokens: HS256-signed JWTs naming a project and its roles."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import jwt

from .domain.errors import Unauthenticated
from .domain.model import Caller
from .domain.rules import PROJECT_PATTERN

ISSUER = "bms-image"
ALGORITHM = "HS256"
DEFAULT_TTL_SECONDS = 24 * 3600
KNOWN_ROLES = frozenset({"admin"})
#: Verified tokens remembered (LRU): a client sends the same token with
#: every call, and checking its HMAC and claims each time is most of the
#: cost of a cached read.
VERIFIED_CACHE_SIZE = 4096


class TokenAuthority:
    """Issues tokens with the current secret and verifies them with it or,
    during a key rotation, with any of the previous secrets still accepted."""

    def __init__(self, secret: str, previous: Sequence[str] = ()) -> None:
        for candidate in (secret, *previous):
            if len(candidate) < 32:
                raise ValueError("every token secret must be at least 32 characters")
        self._secret = secret
        self._keys = (secret, *(key for key in previous if key != secret))
        self._verified: OrderedDict[str, tuple[Caller, float]] = OrderedDict()

    def issue(
        self, project: str, admin: bool = False, ttl_seconds: int = DEFAULT_TTL_SECONDS
    ) -> str:
        if not PROJECT_PATTERN.match(project):
            raise ValueError(
                f"project {project!r} is not valid: 2-64 lower-case letters, digits, '-' or '_'"
            )
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": project,
            "roles": ["admin"] if admin else [],
            "iat": now,
            "exp": now + ttl_seconds,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Caller:
        """The caller a token names. A token verified before is answered from
        memory until it expires (the keys never change while this lives)."""
        remembered = self._verified.get(token)
        if remembered is not None:
            if time.time() < remembered[1]:
                self._verified.move_to_end(token)
                return remembered[0]
            del self._verified[token]  # expired: verified again, to say so
        caller, expires = self._verify(token)
        self._verified[token] = (caller, expires)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float]:
        try:
            claims = self._decode(token)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("TOKEN_EXPIRED", "the token has expired; get a new one") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                "TOKEN_INVALID_SIGNATURE", "the token was not signed by this service"
            ) from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated("TOKEN_INVALID", f"the token is not valid: {error}") from None
        project, roles = claims.get("sub"), claims.get("roles", [])
        if not isinstance(project, str) or not PROJECT_PATTERN.match(project):
            raise Unauthenticated("TOKEN_INVALID", "the token does not name a valid project")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("TOKEN_INVALID", "the token's roles must be a list of strings")
        expires = claims["exp"]
        if not isinstance(expires, int | float):
            raise Unauthenticated("TOKEN_INVALID", "the token's exp must be a number")
        return Caller(project=project, roles=frozenset(roles) & KNOWN_ROLES), float(expires)

    def _decode(self, token: str) -> dict[str, object]:
        """The claims, checked with the first key whose signature matches."""
        for key in self._keys[:-1]:
            try:
                return self._decode_with(token, key)
            except jwt.InvalidSignatureError:
                continue
        return self._decode_with(token, self._keys[-1])

    @staticmethod
    def _decode_with(token: str, key: str) -> dict[str, object]:
        claims: dict[str, object] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "iss"]},
        )
        return claims


def bearer_token(authorization: str | None) -> str:
    """Extracts the token from an `authorization: Bearer <token>` value."""
    if not authorization:
        raise Unauthenticated(
            "TOKEN_MISSING",
            "missing `authorization: Bearer <token>` metadata; get a token with `bms-image token`",
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            "TOKEN_MALFORMED", "the authorization metadata must be `Bearer <token>`"
        )
    return token.strip()
