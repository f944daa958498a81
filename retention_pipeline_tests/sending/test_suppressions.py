"""Suppressions: normalized addresses, one loop or every loop, unsubscribe tokens, and the list
surviving `db uninstall`."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from retention_pipeline.email.unsubscribe import make_token
from retention_pipeline.sending import suppress, unsubscribe_with_token
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
