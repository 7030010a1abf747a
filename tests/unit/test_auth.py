"""auth: issuing and verifying bearer tokens, and reading the metadata."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from bms_image.common import auth
from bms_image.common.auth import (
    ALGORITHM,
    AUDIENCE,
    ISSUER,
    LEEWAY_SECONDS,
    MAX_TTL_SECONDS,
    SERVICE_AUDIENCE,
    SERVICE_METADATA_KEY,
    ServiceCredential,
    TokenAuthority,
    bearer_token,
    service_credential,
    service_key,
)
from bms_image.common.errors import Unauthenticated
from bms_image.common.model import Caller

SECRET = "unit-test-secret-" + "s" * 50
OTHER_SECRET = "another-test-secret-" + "o" * 50
AUTHORITY = TokenAuthority(SECRET)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alpha",
        "roles": [],
        "iat": now,
        "exp": now + 3600,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def signed(secret: str = SECRET, algorithm: str = ALGORITHM, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm=algorithm)


def rejected(token: str, reason: str, authority: TokenAuthority = AUTHORITY) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        authority.verify(token)
    assert caught.value.reason == reason, caught.value.message
    return caught.value


def test_round_trip_project() -> None:
    caller = AUTHORITY.verify(AUTHORITY.issue("alpha"))
    assert caller == Caller("alpha", frozenset())
    assert not caller.is_admin


def test_round_trip_admin() -> None:
    caller = AUTHORITY.verify(AUTHORITY.issue("ops", admin=True))
    assert caller == Caller("ops", frozenset({"admin"}))
    assert caller.is_admin


def test_another_authority_with_the_same_secret_accepts_the_token() -> None:
    assert TokenAuthority(SECRET).verify(AUTHORITY.issue("alpha")).project == "alpha"


def test_issued_token_carries_the_documented_claims() -> None:
    before = int(time.time())
    decoded = jwt.decode(
        AUTHORITY.issue("alpha", ttl_seconds=600),
        SECRET,
        algorithms=[ALGORITHM],
        issuer=ISSUER,
        audience=AUDIENCE,
    )
    assert decoded["sub"] == "alpha" and decoded["iss"] == ISSUER and decoded["roles"] == []
    assert decoded["aud"] == "bms-image"
    assert before <= decoded["iat"] <= int(time.time())
    assert decoded["exp"] - decoded["iat"] == 600


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32"):
        TokenAuthority("s" * 31)
    TokenAuthority("s" * 32)


@pytest.mark.parametrize("project", ["", "a", "Alpha", "-alpha", "al pha", "x" * 65, "al/pha"])
def test_issue_refuses_invalid_projects(project: str) -> None:
    with pytest.raises(ValueError, match="not valid"):
        AUTHORITY.issue(project)


@pytest.mark.parametrize("ttl", [-LEEWAY_SECONDS - 5, -3600])
def test_expired_token(ttl: int) -> None:
    rejected(AUTHORITY.issue("alpha", ttl_seconds=ttl), "TOKEN_EXPIRED")


def test_expired_admin_token_grants_nothing() -> None:
    rejected(AUTHORITY.issue("ops", admin=True, ttl_seconds=-LEEWAY_SECONDS - 10), "TOKEN_EXPIRED")


def test_token_of_another_secret() -> None:
    token = TokenAuthority(OTHER_SECRET).issue("alpha", admin=True)
    rejected(token, "TOKEN_INVALID_SIGNATURE")


def test_tampered_payload_breaks_the_signature() -> None:
    header, payload, signature = AUTHORITY.issue("alpha").split(".")
    forged_payload = signed(OTHER_SECRET, roles=["admin"]).split(".")[1]
    assert forged_payload != payload
    rejected(f"{header}.{forged_payload}.{signature}", "TOKEN_INVALID_SIGNATURE")


@pytest.mark.parametrize(
    "garbage",
    ["", "garbage", "a.b.c", "a.b", "....", "Bearer x", "eyJ.eyJ.sig", "\x00", "ü.ü.ü"],
)
def test_garbage(garbage: str) -> None:
    rejected(garbage, "TOKEN_INVALID")


def test_unsigned_token_is_refused() -> None:
    token = jwt.encode(claims(roles=["admin"]), key=None, algorithm="none")
    rejected(token, "TOKEN_INVALID")


def test_token_of_another_algorithm_is_refused() -> None:
    rejected(signed(algorithm="HS512"), "TOKEN_INVALID")


@pytest.mark.parametrize("missing", ["exp", "iat", "sub", "iss"])
def test_required_claims(missing: str) -> None:
    rejected(signed(**{missing: None}), "TOKEN_INVALID")


def test_token_of_another_issuer() -> None:
    rejected(signed(iss="someone-else"), "TOKEN_INVALID")


@pytest.mark.parametrize("project", ["Alpha", "a", "al pha", "x" * 65, "../beta"])
def test_token_naming_an_invalid_project(project: str) -> None:
    rejected(signed(sub=project), "TOKEN_INVALID")


@pytest.mark.parametrize("roles", ["admin", {"admin": True}, [1], ["admin", None], 1])
def test_roles_must_be_a_list_of_strings(roles: object) -> None:
    rejected(signed(roles=roles), "TOKEN_INVALID")


def test_unknown_roles_are_dropped() -> None:
    caller = AUTHORITY.verify(signed(roles=["admin", "superuser", "root", "ADMIN"]))
    assert caller.roles == frozenset({"admin"})
    caller = AUTHORITY.verify(signed(roles=["superuser", "Admin"]))
    assert caller.roles == frozenset()
    assert not caller.is_admin


def test_missing_roles_claim_means_no_roles() -> None:
    assert AUTHORITY.verify(signed(roles=None)) == Caller("alpha", frozenset())


def test_token_naming_a_project_with_a_trailing_newline_is_refused() -> None:
    # PROJECT_PATTERN ends in `$`, which also matches before a final "\n".
    rejected(signed(sub="alpha\n"), "TOKEN_INVALID")


# --- bearer_token ------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        ("  Bearer abc", "abc"),
    ],
)
def test_bearer_token(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", [None, ""])
def test_missing_authorization(header: str | None) -> None:
    with pytest.raises(Unauthenticated) as caught:
        bearer_token(header)
    assert caught.value.reason == "TOKEN_MISSING"


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpwdw==", "Token abc", "abc", "Bearerabc", " "],
)
def test_malformed_authorization(header: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        bearer_token(header)
    assert caught.value.reason == "TOKEN_MALFORMED"


def test_bearer_token_then_verify() -> None:
    token = AUTHORITY.issue("alpha", admin=True)
    assert AUTHORITY.verify(bearer_token(f"Bearer {token}")).is_admin


# -- key rotation --------------------------------------------------------------

NEW_SECRET = "rotated-test-secret-" + "n" * 50


def test_during_a_rotation_tokens_of_the_previous_key_stay_valid() -> None:
    rotating = TokenAuthority(NEW_SECRET, previous=[SECRET])
    assert rotating.verify(AUTHORITY.issue("alpha")).project == "alpha"
    assert rotating.verify(rotating.issue("beta")).project == "beta"


def test_new_tokens_are_signed_with_the_new_key_only() -> None:
    token = TokenAuthority(NEW_SECRET, previous=[SECRET]).issue("alpha")
    assert TokenAuthority(NEW_SECRET).verify(token).project == "alpha"
    with pytest.raises(Unauthenticated) as caught:
        AUTHORITY.verify(token)
    assert caught.value.reason == "TOKEN_INVALID_SIGNATURE"


def test_after_the_window_the_previous_key_is_refused() -> None:
    with pytest.raises(Unauthenticated) as caught:
        TokenAuthority(NEW_SECRET).verify(AUTHORITY.issue("alpha"))
    assert caught.value.reason == "TOKEN_INVALID_SIGNATURE"


def test_an_expired_token_of_the_previous_key_is_reported_as_expired() -> None:
    expired = AUTHORITY.issue("alpha", ttl_seconds=-120)
    with pytest.raises(Unauthenticated) as caught:
        TokenAuthority(NEW_SECRET, previous=[SECRET]).verify(expired)
    assert caught.value.reason == "TOKEN_EXPIRED"


def test_every_accepted_key_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        TokenAuthority(NEW_SECRET, previous=["short"])


# -- remembered verifications ---------------------------------------------------


def test_a_remembered_token_still_expires() -> None:
    authority = TokenAuthority(SECRET)
    # expired a moment ago, but within the leeway: accepted for about a second
    token = authority.issue("alpha", ttl_seconds=1 - LEEWAY_SECONDS)
    assert authority.verify(token).project == "alpha"
    assert authority.verify(token).project == "alpha"  # answered from memory
    expires = jwt.decode(token, options={"verify_signature": False})["exp"] + LEEWAY_SECONDS
    time.sleep(max(0.0, expires - time.time()) + 0.05)  # at most about a second
    with pytest.raises(Unauthenticated) as caught:
        authority.verify(token)
    assert caught.value.reason == "TOKEN_EXPIRED"


def test_refused_tokens_are_not_remembered_and_memory_is_bounded() -> None:
    authority = TokenAuthority(SECRET)
    forged = TokenAuthority(OTHER_SECRET).issue("alpha")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            authority.verify(forged)
    for n in range(auth.VERIFIED_CACHE_SIZE + 10):
        authority.verify(authority.issue(f"p{n}"))
    assert len(authority._users._verified) == auth.VERIFIED_CACHE_SIZE


# -- audience, leeway, lifetime ------------------------------------------------


def test_a_token_minted_before_audiences_is_refused_with_what_to_do() -> None:
    """Tokens without `aud` (minted before audiences existed, 24 h at most by
    default) are refused rather than grandfathered."""
    error = rejected(signed(aud=None), "TOKEN_INVALID")
    assert "bms-image token" in error.message and "audience" in error.message


@pytest.mark.parametrize("audience", ["someone-else", SERVICE_AUDIENCE, ["other"]])
def test_a_token_for_another_audience_is_refused(audience: object) -> None:
    error = rejected(signed(aud=audience), "TOKEN_INVALID")
    assert "audience" in error.message


def test_a_token_listing_our_audience_among_others_is_accepted() -> None:
    assert AUTHORITY.verify(signed(aud=["other", AUDIENCE])).project == "alpha"


def test_clock_skew_within_the_leeway_is_tolerated() -> None:
    now = int(time.time())
    skew = LEEWAY_SECONDS - 10
    assert AUTHORITY.verify(signed(exp=now - skew)).project == "alpha"
    assert AUTHORITY.verify(signed(iat=now + skew)).project == "alpha"
    assert AUTHORITY.verify(signed(nbf=now + skew)).project == "alpha"


def test_clock_skew_beyond_the_leeway_is_refused() -> None:
    now = int(time.time())
    skew = LEEWAY_SECONDS + 10
    rejected(signed(exp=now - skew), "TOKEN_EXPIRED")
    rejected(signed(iat=now + skew), "TOKEN_INVALID")
    rejected(signed(nbf=now + skew), "TOKEN_INVALID")


def test_the_lifetime_is_capped_at_seven_days() -> None:
    assert MAX_TTL_SECONDS == 7 * 24 * 3600
    token = AUTHORITY.issue("alpha", ttl_seconds=MAX_TTL_SECONDS)
    assert AUTHORITY.verify(token).project == "alpha"
    with pytest.raises(ValueError, match="at most 604800 seconds"):
        AUTHORITY.issue("alpha", ttl_seconds=MAX_TTL_SECONDS + 1)


# -- service credentials ---------------------------------------------------------


def test_a_service_credential_names_its_service() -> None:
    assert AUTHORITY.verify_service(AUTHORITY.issue_service("provisioner")) == "provisioner"
    assert AUTHORITY.verify_service(AUTHORITY.issue_service("image-service")) == "image-service"
    decoded = jwt.decode(
        AUTHORITY.issue_service("provisioner"),
        service_key(SECRET),
        algorithms=[ALGORITHM],
        audience=SERVICE_AUDIENCE,
    )
    assert decoded["aud"] == "bms-image-internal" and decoded["sub"] == "provisioner"


def test_only_known_services_get_a_credential() -> None:
    with pytest.raises(ValueError, match="unknown service"):
        AUTHORITY.issue_service("alpha")


def test_the_service_key_is_derived_and_differs_from_the_secret() -> None:
    assert service_key(SECRET) != SECRET and len(service_key(SECRET)) == 64
    assert service_key(SECRET) != service_key(OTHER_SECRET)


def service_rejected(credential: str, authority: TokenAuthority = AUTHORITY) -> None:
    with pytest.raises(Unauthenticated) as caught:
        authority.verify_service(credential)
    assert caught.value.reason == "SERVICE_IDENTITY_INVALID", caught.value.message


def test_a_user_token_is_never_a_service_credential() -> None:
    service_rejected(AUTHORITY.issue("alpha", admin=True))


def test_a_user_token_minted_with_the_service_audience_is_refused_both_ways() -> None:
    """Signed with the user-token key: the service key does not verify it,
    and its audience is not the API's."""
    forged = signed(aud=SERVICE_AUDIENCE, sub="provisioner")
    service_rejected(forged)
    rejected(forged, "TOKEN_INVALID")


def test_a_service_credential_is_never_a_user_token() -> None:
    rejected(AUTHORITY.issue_service("provisioner"), "TOKEN_INVALID_SIGNATURE")


def test_a_service_credential_of_another_secret_or_unknown_service_is_refused() -> None:
    service_rejected(TokenAuthority(OTHER_SECRET).issue_service("provisioner"))
    unknown = jwt.encode(
        claims(aud=SERVICE_AUDIENCE, sub="intruder"), service_key(SECRET), algorithm=ALGORITHM
    )
    service_rejected(unknown)
    expired = AUTHORITY.issue_service("provisioner", ttl_seconds=-LEEWAY_SECONDS - 5)
    service_rejected(expired)


def test_service_credentials_follow_a_key_rotation() -> None:
    rotating = TokenAuthority(NEW_SECRET, previous=[SECRET])
    assert rotating.verify_service(AUTHORITY.issue_service("provisioner")) == "provisioner"
    service_rejected(rotating.issue_service("provisioner"))  # AUTHORITY knows no NEW_SECRET


def test_a_holder_renews_its_credential_before_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder = ServiceCredential(AUTHORITY, "provisioner")
    key, value = holder.metadata()
    assert key == SERVICE_METADATA_KEY and value.startswith("Bearer ")
    assert holder.metadata() == (key, value)  # reused while fresh
    later = time.time() + auth.SERVICE_TTL_SECONDS
    monkeypatch.setattr(auth.time, "time", lambda: later)
    renewed = holder.metadata()[1]
    decoded = jwt.decode(service_credential(renewed), options={"verify_signature": False})
    assert decoded["exp"] == int(later) + auth.SERVICE_TTL_SECONDS


@pytest.mark.parametrize("value", ["", "Bearer", "Basic abc", "token"])
def test_malformed_service_metadata(value: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        service_credential(value)
    assert caught.value.reason == "SERVICE_IDENTITY_INVALID"
