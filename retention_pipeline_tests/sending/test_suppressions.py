"""Suppressions, unsubscribe tokens, and the one-click unsubscribe HTTP endpoint."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from retention_pipeline.email.unsubscribe import make_token
from retention_pipeline.sending import make_server, suppress, unsubscribe_with_token
from retention_pipeline_tests.sending.support import (
    LOOP,
    SCHEMA,
    SECRET,
    SendingDatabase,
    User,
    add_users,
    compose_and_claim,
)


def suppressions(db: SendingDatabase) -> list[tuple]:
    with db.engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT email, user_id, reason, source FROM retention.email_suppressions "
                    "ORDER BY email"
                )
            )
        ]


@pytest.fixture
def emailed(sending_db: SendingDatabase) -> SendingDatabase:
    """A database where the loop has claimed an email to user u1 at Ada@Example.com."""
    add_users(sending_db.engine, [User("u1", "Ada@Example.com")])
    compose_and_claim(sending_db)
    return sending_db


def test_suppress_lowercases_and_is_idempotent(sending_db: SendingDatabase) -> None:
    with sending_db.engine.begin() as connection:
        first = suppress(
            connection, schema=SCHEMA, email=" Bob@Example.COM ", reason="bounced", source="resend"
        )
        again = suppress(
            connection,
            schema=SCHEMA,
            email="bob@example.com",
            reason="complained",
            source="resend",
            user_id="u9",
        )

    assert (first, again) == (True, False)
    # The first reason stands; a user id learnt later is filled in.
    assert suppressions(sending_db) == [("bob@example.com", "u9", "bounced", "resend")]
    with (
        sending_db.engine.begin() as connection,
        pytest.raises(ValueError, match="unknown suppression reason 'spam'"),
    ):
        suppress(connection, schema=SCHEMA, email="a@b.co", reason="spam", source="x")


def test_a_valid_token_suppresses_the_address_the_loop_emailed(emailed: SendingDatabase) -> None:
    token = make_token(SECRET, "u1", LOOP)

    with emailed.engine.begin() as connection:
        address = unsubscribe_with_token(connection, schema=SCHEMA, secret=SECRET, token=token)
    with emailed.engine.begin() as connection:
        unsubscribe_with_token(connection, schema=SCHEMA, secret=SECRET, token=token)

    assert address == "ada@example.com"
    assert suppressions(emailed) == [
        ("ada@example.com", "u1", "unsubscribed", "unsubscribe_link:re_engagement")
    ]


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("tampered", "unsubscribe token is malformed"),
        ("forged", "unsubscribe token signature does not match"),
        ("stranger", "loop 're_engagement' never emailed user 'u2'"),
    ],
)
def test_a_bad_token_is_a_one_line_error_and_suppresses_nothing(
    emailed: SendingDatabase, token: str, message: str
) -> None:
    valid = make_token(SECRET, "u1", LOOP)
    tokens = {
        "tampered": valid[:-3] + "!!!",
        "forged": make_token("another secret", "u1", LOOP),
        "stranger": make_token(SECRET, "u2", LOOP),
    }

    with emailed.engine.begin() as connection, pytest.raises(ValueError) as raised:
        unsubscribe_with_token(connection, schema=SCHEMA, secret=SECRET, token=tokens[token])

    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
    assert suppressions(emailed) == []


@pytest.fixture
def server(emailed: SendingDatabase) -> Iterator[str]:
    """The unsubscribe endpoint on a free local port; yields its base URL."""
    httpd = make_server(emailed.engine, schema=SCHEMA, secret=SECRET, host="127.0.0.1", port=0)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield f"http://{host}:{port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def request(url: str, body: bytes | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_one_click_post_unsubscribes_with_200(server: str, emailed: SendingDatabase) -> None:
    token = make_token(SECRET, "u1", LOOP)

    status, page = request(
        f"{server}/email/unsubscribe?token={token}", b"List-Unsubscribe=One-Click"
    )

    assert status == 200
    assert "You are unsubscribed" in page
    assert suppressions(emailed) == [
        ("ada@example.com", "u1", "unsubscribed", "unsubscribe_link:re_engagement")
    ]


def test_get_shows_a_button_that_posts_and_unsubscribes_no_one(
    server: str, emailed: SendingDatabase
) -> None:
    token = make_token(SECRET, "u1", LOOP)

    status, page = request(f"{server}/email/unsubscribe?token={token}")

    assert status == 200
    assert '<form method="post" action="/email/unsubscribe?token=' in page
    assert token in page
    assert suppressions(emailed) == []


def test_the_endpoint_answers_bad_requests_briefly(server: str, emailed: SendingDatabase) -> None:
    forged = make_token("another secret", "u1", LOOP)

    assert request(f"{server}/email/unsubscribe?token={forged}", b"") == (
        400,
        "unsubscribe token signature does not match: "
        "the token was altered or signed with another secret\n",
    )
    assert request(f"{server}/email/unsubscribe?token={forged}")[0] == 400
    assert request(f"{server}/email/unsubscribe", b"") == (400, "missing unsubscribe token\n")
    assert request(f"{server}/elsewhere?token={forged}", b"")[0] == 404
    assert suppressions(emailed) == []
