"""Bearer tokens: HS256-signed JWTs naming a project and its roles, and the
service credentials our own processes present to each other.

Two kinds of token, never interchangeable:

* A **user token** (`bms-image token`, `TokenAuthority.issue`) is signed with
  the token secret and carries `aud: bms-image`. It goes in `authorization`.
* A **service credential** (`TokenAuthority.issue_service`) is what the image
  service and the provisioner present to each other. It is signed with a key
  derived from the token secret by HMAC-SHA256 over a fixed label, carries
  `aud: bms-image-internal` and names the service in `sub`, and goes in its
  own metadata key, `x-bms-service-authorization`, next to the caller's user
  token. A user token never verifies as one (another key and another
  audience), and a service credential never verifies as a user token.

Tokens minted before audiences existed carry no `aud` and are refused
(TOKEN_INVALID, with a message saying to get a new one): they lived at most
24 hours by default, so nothing of value is lost. Every check allows
LEEWAY_SECONDS of clock skew between the machine that minted a token and the
one that verifies it (`exp`, `iat`, `nbf`).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import jwt

from bms_image.common.errors import Unauthenticated
from bms_image.common.model import (
    IMAGE_SERVICE_IDENTITY,
    PROJECT_PATTERN,
    PROVISIONER_IDENTITY,
    Caller,
)

ISSUER = "bms-image"
#: The audience of user tokens: the public bms.image.v1 API.
AUDIENCE = "bms-image"
#: The audience of service credentials: our processes calling each other.
SERVICE_AUDIENCE = "bms-image-internal"
#: What the service-credential key is derived from the token secret with. A
#: fixed label: both processes derive the same key from the shared secret.
SERVICE_KEY_LABEL = b"bms-image service identity v1"
#: The metadata key of a service credential (`Bearer <credential>`).
SERVICE_METADATA_KEY = "x-bms-service-authorization"
#: The services that may hold a service credential.
SERVICES = frozenset({IMAGE_SERVICE_IDENTITY, PROVISIONER_IDENTITY})
ALGORITHM = "HS256"
DEFAULT_TTL_SECONDS = 24 * 3600
#: The longest lifetime `issue` grants. A bearer token cannot be revoked
#: short of rotating the secret (which ends every token), so a leaked one
#: is good until it expires: a week bounds that, and still covers a
#: long-running job or a CI pipeline that gets a fresh token per run.
MAX_TTL_SECONDS = 7 * 24 * 3600
#: Service credentials live a few minutes and are renewed by their holder
#: (ServiceCredential) long before they expire.
SERVICE_TTL_SECONDS = 300
#: Clock skew tolerated between the minting and the verifying machine.
LEEWAY_SECONDS = 30
KNOWN_ROLES = frozenset({"admin"})
#: Verified tokens remembered (LRU): a client sends the same token with
#: every call, and checking its HMAC and claims each time is most of the
#: cost of a cached read.
VERIFIED_CACHE_SIZE = 4096

T = TypeVar("T")


def service_key(secret: str) -> str:
    """The key service credentials are signed with: HMAC-SHA256 of a fixed
    label under the token secret, so it differs from the secret itself (the
    user-token key) and cannot be computed without it."""
    return hmac.new(secret.encode(), SERVICE_KEY_LABEL, hashlib.sha256).hexdigest()


class _Verifier(Generic[T]):
    """Verifies one kind of token against its keys (the current one first)
    and audience, and remembers what each verified token stands for until
    it expires."""

    def __init__(
        self, keys: Sequence[str], audience: str, identity: Callable[[dict[str, object]], T]
    ) -> None:
        self._keys = tuple(keys)
        self._audience = audience
        self._identity = identity
        self._verified: OrderedDict[str, tuple[T, float]] = OrderedDict()

    def verify(self, token: str) -> T:
        """What the token stands for; raises jwt's errors, or what
        `identity` raises for claims it refuses. A token verified before is
        answered from memory until it expires (the keys never change while
        this lives)."""
        remembered = self._verified.get(token)
        if remembered is not None:
            if time.time() < remembered[1]:
                self._verified.move_to_end(token)
                return remembered[0]
            del self._verified[token]  # expired: verified again, to say so
        claims = self._decode(token)
        expires = claims["exp"]
        if not isinstance(expires, int | float):
            raise jwt.InvalidTokenError("the token's exp must be a number")
        identity = self._identity(claims)
        self._verified[token] = (identity, float(expires) + LEEWAY_SECONDS)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return identity

    def _decode(self, token: str) -> dict[str, object]:
        """The claims, checked with the first key whose signature matches."""
        for key in self._keys[:-1]:
            try:
                return self._decode_with(token, key)
            except jwt.InvalidSignatureError:
                continue
        return self._decode_with(token, self._keys[-1])

    def _decode_with(self, token: str, key: str) -> dict[str, object]:
        claims: dict[str, object] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            audience=self._audience,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
        return claims


def _caller(claims: dict[str, object]) -> Caller:
    project, roles = claims.get("sub"), claims.get("roles", [])
    if not isinstance(project, str) or not PROJECT_PATTERN.match(project):
        raise Unauthenticated("TOKEN_INVALID", "the token does not name a valid project")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated("TOKEN_INVALID", "the token's roles must be a list of strings")
    return Caller(project=project, roles=frozenset(roles) & KNOWN_ROLES)


def _service(claims: dict[str, object]) -> str:
    service = claims.get("sub")
    if not isinstance(service, str) or service not in SERVICES:
        raise Unauthenticated(
            "SERVICE_IDENTITY_INVALID", "the service credential names no known service"
        )
    return service


class TokenAuthority:
    """Issues tokens with the current secret and verifies them with it or,
    during a key rotation, with any of the previous secrets still accepted."""

    def __init__(self, secret: str, previous: Sequence[str] = ()) -> None:
        for candidate in (secret, *previous):
            if len(candidate) < 32:
                raise ValueError("every token secret must be at least 32 characters")
        self._secret = secret
        keys = (secret, *(key for key in previous if key != secret))
        self._users = _Verifier(keys, AUDIENCE, _caller)
        self._services = _Verifier([service_key(key) for key in keys], SERVICE_AUDIENCE, _service)

    def issue(
        self, project: str, admin: bool = False, ttl_seconds: int = DEFAULT_TTL_SECONDS
    ) -> str:
        """A user token; never a service credential (there is no way to ask
        this for another audience or key)."""
        if not PROJECT_PATTERN.match(project):
            raise ValueError(
                f"project {project!r} is not valid: 2-64 lower-case letters, digits, '-' or '_'"
            )
        if ttl_seconds > MAX_TTL_SECONDS:
            raise ValueError(
                f"a token lives at most {MAX_TTL_SECONDS} seconds (7 days), not {ttl_seconds}: "
                "a bearer token cannot be revoked, so mint a new one when it runs out"
            )
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": project,
            "roles": ["admin"] if admin else [],
            "iat": now,
            "exp": now + ttl_seconds,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def issue_service(self, service: str, ttl_seconds: int = SERVICE_TTL_SECONDS) -> str:
        """A service credential of one of our own processes (SERVICES)."""
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}: one of {sorted(SERVICES)}")
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": SERVICE_AUDIENCE,
            "sub": service,
            "iat": now,
            "exp": now + ttl_seconds,
        }
        return jwt.encode(claims, service_key(self._secret), algorithm=ALGORITHM)

    def verify(self, token: str) -> Caller:
        """The caller a user token names; UNAUTHENTICATED otherwise."""
        try:
            return self._users.verify(token)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("TOKEN_EXPIRED", "the token has expired; get a new one") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                "TOKEN_INVALID_SIGNATURE", "the token was not signed by this service"
            ) from None
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as error:
            if isinstance(error, jwt.MissingRequiredClaimError) and error.claim != "aud":
                raise Unauthenticated("TOKEN_INVALID", f"the token is not valid: {error}") from None
            raise Unauthenticated(
                "TOKEN_INVALID",
                f"the token is not meant for the bms-image API (its audience must be "
                f"{AUDIENCE!r}; tokens minted before audiences existed have none); "
                "get a new one with `bms-image token`",
            ) from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated("TOKEN_INVALID", f"the token is not valid: {error}") from None

    def verify_service(self, credential: str) -> str:
        """The service a service credential names; UNAUTHENTICATED
        (SERVICE_IDENTITY_INVALID) for anything else, a user token included."""
        try:
            return self._services.verify(credential)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                "SERVICE_IDENTITY_INVALID", "the service credential has expired"
            ) from None
        except jwt.InvalidTokenError:
            raise Unauthenticated(
                "SERVICE_IDENTITY_INVALID",
                f"the {SERVICE_METADATA_KEY} metadata is not a service credential of this "
                "deployment (a user token never is one)",
            ) from None


class ServiceCredential:
    """A process's own credential toward our other service, renewed when
    half its lifetime has passed (so a call never carries one about to
    expire)."""

    def __init__(self, authority: TokenAuthority, service: str) -> None:
        self._authority = authority
        self._service = service
        self._credential = ""
        self._renew_at = 0.0

    def metadata(self) -> tuple[str, str]:
        """The metadata entry that carries it."""
        now = time.time()
        if now >= self._renew_at:
            self._credential = self._authority.issue_service(self._service)
            self._renew_at = now + SERVICE_TTL_SECONDS / 2
        return (SERVICE_METADATA_KEY, f"Bearer {self._credential}")


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


def service_credential(value: str) -> str:
    """Extracts the credential from an `x-bms-service-authorization: Bearer
    <credential>` value."""
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated(
            "SERVICE_IDENTITY_INVALID",
            f"the {SERVICE_METADATA_KEY} metadata must be `Bearer <credential>`",
        )
    return credential.strip()
