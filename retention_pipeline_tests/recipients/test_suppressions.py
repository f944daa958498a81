"""Suppressions: normalized addresses, one loop or every loop, unsubscribe tokens, and the list
surviving `db uninstall`."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from retention_pipeline.email.unsubscribe import make_token
from retention_pipeline.recipients.suppressions import suppress, unsubscribe_with_token
from retention_pipeline_tests.helpers import write_config
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
                    "ORDER BY email, loop_name NULLS FIRST"
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


def test_a_loops_suppression_leaves_the_other_loops_and_every_loop_covers_all(
    sending_db: SendingDatabase,
) -> None:
    with sending_db.engine.begin() as connection:
        scoped = suppress(
            connection,
            schema=SCHEMA,
            email="ada@example.com",
            reason="unsubscribed",
            source="test",
            loop_name=LOOP,
        )
        everywhere = suppress(
            connection, schema=SCHEMA, email="bob@example.com", reason="bounced", source="test"
        )
        # Already suppressed everywhere: a loop's own row would add nothing.
        redundant = suppress(
            connection,
            schema=SCHEMA,
            email="BOB@example.com",
            reason="unsubscribed",
            source="test",
            loop_name=LOOP,
        )

    assert (scoped, everywhere, redundant) == (True, True, False)
    assert suppressions(sending_db) == [
        ("ada@example.com", None, "unsubscribed", "test"),
        ("bob@example.com", None, "bounced", "test"),
    ]


@pytest.mark.parametrize(
    "address",
    ["", "ada", "ada@", "@example.com", "Ada <ada@example.com>", "ada@example", "a b@c.de"],
)
def test_what_is_not_an_address_is_refused_in_one_line(
    sending_db: SendingDatabase, address: str
) -> None:
    with (
        sending_db.engine.begin() as connection,
        pytest.raises(ValueError, match="is not an email address") as raised,
    ):
        suppress(connection, schema=SCHEMA, email=address, reason="bounced", source="test")
    assert "\n" not in str(raised.value)
    assert suppressions(sending_db) == []


def test_the_suppress_command_normalizes_and_refuses_non_addresses(
    sending_db: SendingDatabase, tmp_path, capsys
) -> None:
    from retention_pipeline.cli import main

    config = str(write_config(tmp_path, sending_db.url))

    assert main(["--config", config, "suppress", "  Ada@Example.COM "]) == 0
    assert capsys.readouterr().out == "ada@example.com: unsubscribed\n"
    assert main(["--config", config, "suppress", "not-an-address"]) == 2
    assert capsys.readouterr().err == (
        "error: 'not-an-address' is not an email address like ada@example.com\n"
    )
    assert suppressions(sending_db) == [("ada@example.com", None, "unsubscribed", "cli")]


def test_db_uninstall_keeps_the_suppression_list_for_the_next_install(
    emailed: SendingDatabase, tmp_path, capsys
) -> None:
    from retention_pipeline.cli import main

    config = str(write_config(tmp_path, emailed.url))
    with emailed.engine.begin() as connection:
        unsubscribe_with_token(
            connection, schema=SCHEMA, secret=SECRET, token=make_token(SECRET, "u1", LOOP)
        )
        suppress(connection, schema=SCHEMA, email="bob@example.com", reason="bounced", source="x")
    before = suppressions(emailed)

    assert main(["--config", config, "db", "uninstall", "--yes"]) == 0
    said = capsys.readouterr().out
    assert "kept 2 suppressed address(es) in retention.email_suppressions_kept" in said
    with emailed.engine.connect() as connection:
        left = connection.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
            {"s": SCHEMA},
        ).scalars()
        assert sorted(left) == [
            "email_send_log_kept",
            "email_suppressions_kept",
            "reengagement_audience_kept",
        ]
    # Uninstalling again keeps what the first one kept.
    assert main(["--config", config, "db", "uninstall", "--yes"]) == 0

    assert main(["--config", config, "db", "upgrade"]) == 0
    assert suppressions(emailed) == before
    capsys.readouterr()

    assert main(["--config", config, "db", "uninstall", "--yes", "--forget-suppressions"]) == 0
    assert "suppressed" not in capsys.readouterr().out
    assert main(["--config", config, "db", "upgrade"]) == 0
    assert suppressions(emailed) == []
    assert main(["--config", config, "db", "uninstall", "--yes", "--forget-send-history"]) == 0
    with emailed.engine.connect() as connection:
        assert connection.execute(text("SELECT to_regnamespace('retention')")).scalar() is None
