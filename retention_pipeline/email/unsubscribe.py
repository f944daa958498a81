"""Signed unsubscribe links and the RFC 8058 one-click unsubscribe headers.

A token is `<payload>.<signature>`, both base64url without padding: the payload is compact JSON
with the user id and the loop (null: every loop), the signature an HMAC-SHA256 of it. Tokens do
not expire, because an unsubscribe link in an old email must keep working.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Binds signatures to this use, so a secret shared with another feature cannot mint these tokens.
_CONTEXT = b"retention-pipeline/unsubscribe/v1\n"
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class InvalidUnsubscribeTokenError(ValueError):
    """The token was not made by `make_token` with this secret, or was altered."""


def make_token(secret: str | bytes, user_id: int | str, loop: str | None) -> str:
    """A URL-safe token naming `user_id` and `loop` (None: every loop), signed with `secret`."""
    if isinstance(user_id, bool) or not isinstance(user_id, int | str) or user_id == "":
        raise ValueError(f"user_id must be an int or a non-empty string, got {user_id!r}")
    if loop is not None and (not isinstance(loop, str) or not loop):
        raise ValueError(f"loop must be None or a non-empty string, got {loop!r}")
    payload = json.dumps({"u": user_id, "l": loop}, separators=(",", ":")).encode()
    encoded = _b64encode(payload)
    return f"{encoded}.{_b64encode(_sign(secret, encoded))}"


def verify_token(
    secret: str | bytes, token: str, *, previous: Sequence[str | bytes] = ()
) -> tuple[int | str, str | None]:
    """Return `(user_id, loop)` from a token made by `make_token` with the same secret, or with
    one of the `previous` secrets (rotated out: links in emails already sent keep working); `loop`
    is None for a token that covers every loop.

    Raises `InvalidUnsubscribeTokenError` (a `ValueError`) when the token is malformed or its
    signature does not match.
    """
    encoded, separator, signature = token.strip().partition(".")
    if not (separator and _BASE64URL.fullmatch(encoded) and _BASE64URL.fullmatch(signature)):
        raise InvalidUnsubscribeTokenError("unsubscribe token is malformed")
    # Comparing the encoded text, not decoded bytes, also rejects non-canonical encodings.
    if not any(
        hmac.compare_digest(signature, _b64encode(_sign(candidate, encoded)))
        for candidate in (secret, *previous)
    ):
        raise InvalidUnsubscribeTokenError(
            "unsubscribe token signature does not match: "
            "the token was altered or signed with another secret"
        )
    try:
        data = json.loads(_b64decode(encoded))
        user_id, loop = data["u"], data["l"]
    except (ValueError, TypeError, KeyError):
        raise InvalidUnsubscribeTokenError("unsubscribe token payload is malformed") from None
    if (
        isinstance(user_id, bool)
        or not isinstance(user_id, int | str)
        or not (loop is None or (isinstance(loop, str) and loop))
    ):
        raise InvalidUnsubscribeTokenError("unsubscribe token payload is malformed")
    return user_id, loop


def unsubscribe_url(base_url: str, token: str) -> str:
    """`base_url` with the token added as the `token` query parameter."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"unsubscribe base URL must be an absolute http(s) URL, got {base_url!r}")
    query = [*parse_qsl(parts.query, keep_blank_values=True), ("token", token)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def unsubscribe_headers(base_url: str, token: str) -> dict[str, str]:
    """The `List-Unsubscribe` and `List-Unsubscribe-Post` headers for one-click unsubscribe.

    RFC 8058 requires an HTTPS URI that accepts a POST with the body `List-Unsubscribe=One-Click`;
    plain http is allowed only for localhost, for local development.
    """
    url = unsubscribe_url(base_url, token)
    parts = urlsplit(url)
    if parts.scheme != "https" and parts.hostname not in _LOCAL_HOSTS:
        raise ValueError(f"one-click unsubscribe (RFC 8058) needs an https URL, got {base_url!r}")
    return {
        "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def _sign(secret: str | bytes, encoded_payload: str) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if not key:
        raise ValueError("the unsubscribe secret must not be empty")
    return hmac.new(key, _CONTEXT + encoded_payload.encode(), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
