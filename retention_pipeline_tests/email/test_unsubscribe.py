"""Signed unsubscribe tokens, URLs and RFC 8058 headers."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

import pytest

from retention_pipeline.email.unsubscribe import (
    InvalidUnsubscribeTokenError,
    make_token,
    unsubscribe_headers,
    unsubscribe_url,
    verify_token,
)

SECRET = "a-long-random-secret"


@pytest.mark.parametrize("user_id", [42, "c0ffee00-1234-4abc-8def-000000000001", "user 7/ü"])
def test_a_token_round_trips_and_is_url_safe(user_id: int | str) -> None:
    token = make_token(SECRET, user_id, "re_engagement")

    assert verify_token(SECRET, token) == (user_id, "re_engagement")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def test_an_int_id_and_its_string_are_different_users() -> None:
    assert make_token(SECRET, 42, "loop") != make_token(SECRET, "42", "loop")
    assert verify_token(SECRET, make_token(SECRET, "42", "loop")) == ("42", "loop")


def test_a_rewritten_payload_is_rejected() -> None:
    token = make_token(SECRET, 42, "re_engagement")
    _, signature = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({"u": 43, "l": "re_engagement"}).encode())

    with pytest.raises(ValueError, match="signature does not match"):
        verify_token(SECRET, f"{forged.decode().rstrip('=')}.{signature}")


def test_every_single_character_change_is_rejected() -> None:
    token = make_token(SECRET, 42, "re_engagement")
    for position, char in enumerate(token):
        if char == ".":
            continue
        replacement = "A" if char != "A" else "B"
        tampered = token[:position] + replacement + token[position + 1 :]
        with pytest.raises(InvalidUnsubscribeTokenError):
            verify_token(SECRET, tampered)


def test_another_secret_is_rejected() -> None:
    with pytest.raises(InvalidUnsubscribeTokenError, match="signature does not match"):
        verify_token("another secret", make_token(SECRET, 42, "re_engagement"))


@pytest.mark.parametrize("token", ["", ".", "abc", "abc.", ".abc", "a.b.c", "ab+c.def", "é.é"])
def test_malformed_tokens_are_a_clear_value_error(token: str) -> None:
    with pytest.raises(ValueError, match="unsubscribe token"):
        verify_token(SECRET, token)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="secret"):
        make_token("", 42, "loop")
    with pytest.raises(ValueError, match="user_id"):
        make_token(SECRET, True, "loop")
    with pytest.raises(ValueError, match="loop"):
        make_token(SECRET, 42, "")


def test_the_url_carries_the_token_and_keeps_existing_parameters() -> None:
    token = make_token(SECRET, 42, "re_engagement")

    url = unsubscribe_url("https://acme.test/email/unsubscribe?lang=en", token)

    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "acme.test", "/email/unsubscribe")
    assert parse_qs(parts.query) == {"lang": ["en"], "token": [token]}
    with pytest.raises(ValueError, match="absolute http"):
        unsubscribe_url("/unsubscribe", token)


def test_headers_follow_rfc_8058() -> None:
    token = make_token(SECRET, 42, "re_engagement")

    headers = unsubscribe_headers("https://acme.test/unsubscribe", token)

    assert headers == {
        "List-Unsubscribe": f"<https://acme.test/unsubscribe?token={token}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def test_one_click_needs_https_except_on_localhost() -> None:
    with pytest.raises(ValueError, match="https"):
        unsubscribe_headers("http://acme.test/unsubscribe", "t.t")
    local = unsubscribe_headers("http://localhost:3000/unsubscribe", "t.t")
    assert local["List-Unsubscribe"] == "<http://localhost:3000/unsubscribe?token=t.t>"


def test_a_token_may_cover_every_loop_and_cannot_be_turned_into_one() -> None:
    every = make_token("s3cret", "u1", None)
    one = make_token("s3cret", "u1", "re_engagement")

    assert verify_token("s3cret", every) == ("u1", None)
    # Swapping the payloads of two tokens breaks the signature.
    payload_of_every, _ = every.split(".")
    _, signature_of_one = one.split(".")
    with pytest.raises(ValueError, match="signature does not match"):
        verify_token("s3cret", f"{payload_of_every}.{signature_of_one}")
