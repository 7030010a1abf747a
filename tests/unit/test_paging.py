"""domain.paging: signed page tokens bound to their scope, and page sizes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from bms_image.common.errors import InvalidArgument
from bms_image.common.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    PageTokens,
    page_size_or_default,
)

KEY = b"k" * 32
TOKENS = PageTokens(KEY)
SCOPE = "alpha\ntype = public"


def refused(token: str, scope: str = SCOPE, tokens: PageTokens = TOKENS) -> None:
    with pytest.raises(InvalidArgument) as caught:
        tokens.decode(token, scope)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in caught.value.violations] == ["page_token"]


def forge(body: object, key: bytes = KEY) -> str:
    """A token with any JSON body, correctly signed with `key`."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    mac = hmac.new(key, raw, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(raw + mac).decode().rstrip("=")


def scope_hash(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


@pytest.mark.parametrize("after", [0, 1, 42, 2**31, 2**62])
def test_round_trip(after: int) -> None:
    token = TOKENS.encode(after, SCOPE)
    assert token and "=" not in token
    assert TOKENS.decode(token, SCOPE) == after


def test_token_is_url_safe_and_opaque() -> None:
    token = TOKENS.encode(123, SCOPE)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert "alpha" not in base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode(
        errors="replace"
    ), "the scope is hashed, not carried in clear"


def test_empty_token_means_first_page() -> None:
    assert TOKENS.decode("", SCOPE) == 0
    assert TOKENS.decode("", "any other scope") == 0


@pytest.mark.parametrize(
    "other_scope",
    ["beta\ntype = public", "alpha\ntype = private", "alpha\n", "alpha\ntype = public "],
)
def test_token_is_bound_to_its_scope(other_scope: str) -> None:
    refused(TOKENS.encode(7, SCOPE), other_scope)


def test_token_of_another_key_is_refused() -> None:
    refused(PageTokens(b"x" * 32).encode(7, SCOPE))


def test_every_single_character_change_is_refused() -> None:
    token = TOKENS.encode(12345, SCOPE)
    # The last character may carry only padding bits; every other one carries data.
    for index in range(len(token) - 1):
        replacement = "A" if token[index] != "A" else "B"
        tampered = token[:index] + replacement + token[index + 1 :]
        refused(tampered)


def test_truncated_and_extended_tokens_are_refused() -> None:
    token = TOKENS.encode(12345, SCOPE)
    for cut in (1, 4, 16, len(token) // 2, len(token) - 1):
        refused(token[:cut])
    refused(token + "AAAA")
    refused("AAAA" + token)


@pytest.mark.parametrize(
    "garbage",
    [
        "x",
        "abc",
        "not a token",
        "!!!!",
        "====",
        "%%%%",
        "ü" * 8,
        "\x00" * 24,
        "A" * 64,
        "A" * 10_000,
        base64.urlsafe_b64encode(b"{}").decode(),
        base64.urlsafe_b64encode(b"x" * 16).decode(),
        base64.urlsafe_b64encode(b"\xff" * 40).decode(),
    ],
)
def test_garbage_is_refused(garbage: str) -> None:
    refused(garbage)


@pytest.mark.parametrize(
    "body",
    [
        {"a": -1, "s": scope_hash(SCOPE)},  # negative position
        {"a": "7", "s": scope_hash(SCOPE)},  # position of the wrong type
        {"a": 1.5, "s": scope_hash(SCOPE)},
        {"a": True, "s": scope_hash(SCOPE)},
        {"a": None, "s": scope_hash(SCOPE)},
        {"s": scope_hash(SCOPE)},  # no position
        {"a": 7},  # no scope
        {"a": 7, "s": scope_hash("beta")},
        [7, scope_hash(SCOPE)],  # not an object
        "text",
        7,
    ],
)
def test_signed_but_malformed_bodies_are_refused(body: object) -> None:
    refused(forge(body))


def test_forged_body_with_the_right_key_is_accepted() -> None:
    # Sanity check of forge(): what the service signs, it accepts.
    assert TOKENS.decode(forge({"a": 9, "s": scope_hash(SCOPE)}), SCOPE) == 9


def test_text_tokens_round_trip_and_do_not_mix_with_number_tokens() -> None:
    token = TOKENS.encode_text("project-b", "members")
    assert TOKENS.decode_text(token, "members") == "project-b"
    assert TOKENS.decode_text("", "members") == ""
    with pytest.raises(InvalidArgument):
        TOKENS.decode_text(token, "other")
    with pytest.raises(InvalidArgument):
        TOKENS.decode(token, "members")
    with pytest.raises(InvalidArgument):
        TOKENS.decode_text(TOKENS.encode(3, "members"), "members")


@pytest.mark.parametrize(
    ("size", "expected"),
    [(0, DEFAULT_PAGE_SIZE), (1, 1), (50, 50), (999, 999), (MAX_PAGE_SIZE, MAX_PAGE_SIZE)],
)
def test_page_size_or_default(size: int, expected: int) -> None:
    assert DEFAULT_PAGE_SIZE == 50 and MAX_PAGE_SIZE == 1000
    assert page_size_or_default(size) == expected


@pytest.mark.parametrize("size", [-1, -50, MAX_PAGE_SIZE + 1, 2**31 - 1])
def test_page_size_out_of_range(size: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_size_or_default(size)
    assert [v.field for v in caught.value.violations] == ["page_size"]
    assert str(size) in caught.value.message
