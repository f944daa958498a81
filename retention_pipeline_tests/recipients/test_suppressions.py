"""Suppressions: normalized addresses, one loop or every loop, unsubscribe tokens, and the list
surviving `db uninstall`."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from retention_pipeline.database import migrate
from retention_pipeline.email.unsubscribe import make_token, verify_token
from retention_pipeline.recipients.addresses import normalize_address
from retention_pipeline.recipients.delivery import parse_event, store_event
from retention_pipeline.recipients.suppressions import (
    NothingToUnsubscribe,
    personal_suppression_sql,
    suppress,
    unsubscribe_user,
)
from retention_pipeline.tracking.erasure import erase_users
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


def unsubscribe_with_token(connection, token: str) -> str:
    """What the web service does with a one-click unsubscribe: verify, then unsubscribe."""
    user_id, loop_name = verify_token(SECRET, token)
    return unsubscribe_user(connection, schema=SCHEMA, user_id=str(user_id), loop_name=loop_name)


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
    # A user id learnt later is filled in; the person's complaint stands over the bounce.
    assert suppressions(sending_db) == [("bob@example.com", "u9", "complained", "resend")]
    with (
        sending_db.engine.begin() as connection,
        pytest.raises(ValueError, match="unknown suppression reason 'spam'"),
    ):
        suppress(connection, schema=SCHEMA, email="a@b.co", reason="spam", source="x")


def test_a_valid_token_suppresses_the_address_the_loop_emailed(emailed: SendingDatabase) -> None:
    token = make_token(SECRET, "u1", LOOP)

    with emailed.engine.begin() as connection:
        address = unsubscribe_with_token(connection, token)
    with emailed.engine.begin() as connection:
        unsubscribe_with_token(connection, token)

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
        unsubscribe_with_token(connection, tokens[token])

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


def held_back_personally(connection, user_id: str, loop_name: str) -> str | None:
    return connection.execute(
        text(f"SELECT {personal_suppression_sql('retention', ':user', ':loop')}"),
        {"user": user_id, "loop": loop_name},
    ).scalar_one()


def test_a_persons_request_holds_them_back_where_their_mailbox_was_suppressed_already(
    sending_db: SendingDatabase,
) -> None:
    """A mailbox suppressed for every loop as a bounce (Resend would not send to it), or by the
    `suppress` command without a user: the person's own unsubscribe or complaint from it must
    still hold them back at the address they change to."""
    with sending_db.engine.begin() as connection:
        for email, user_id in (("ada@example.com", "u1"), ("bob@example.com", None)):
            suppress(
                connection,
                schema=SCHEMA,
                email=email,
                reason="bounced" if user_id else "unsubscribed",
                source="before",
                user_id=user_id,
            )
        # One-click unsubscribes (the loop's) by Ada and Bob; a complaint by Cem after a bounce.
        for email, user_id in (("ada@example.com", "u1"), ("bob@example.com", "u2")):
            suppress(
                connection,
                schema=SCHEMA,
                email=email,
                reason="unsubscribed",
                source="unsubscribe_link",
                user_id=user_id,
                loop_name=LOOP,
            )
        for reason in ("bounced", "complained"):
            suppress(
                connection,
                schema=SCHEMA,
                email="cem@example.com",
                reason=reason,
                source=f"resend_webhook:{reason}",
                user_id="u3",
            )
        # Two users of one mailbox: Dee's email bounced, then Eli unsubscribes from every loop.
        for reason, user_id in (("bounced", "u4"), ("unsubscribed", "u5")):
            suppress(
                connection,
                schema=SCHEMA,
                email="family@example.com",
                reason=reason,
                source="test",
                user_id=user_id,
            )

        held = {
            (user_id, loop_name): held_back_personally(connection, user_id, loop_name)
            for user_id in ("u1", "u2", "u3", "u4", "u5")
            for loop_name in (LOOP, "another_loop")
        }
    assert held == {
        ("u1", LOOP): "unsubscribed",
        ("u1", "another_loop"): None,
        ("u2", LOOP): "unsubscribed",
        ("u2", "another_loop"): None,
        ("u3", LOOP): "complained",
        ("u3", "another_loop"): "complained",
        ("u4", LOOP): None,
        ("u4", "another_loop"): None,
        ("u5", LOOP): "unsubscribed",
        ("u5", "another_loop"): "unsubscribed",
    }


@pytest.mark.parametrize(
    "address",
    ["", "ada", "ada@", "@example.com", "Ada <ada@example.com>", "ada@example", "a b@c.de"],
)
def test_what_is_not_an_address_is_refused_in_one_line(address: str) -> None:
    """A person's input (the `suppress` command) is checked before it is suppressed."""
    with pytest.raises(ValueError, match="is not an email address") as raised:
        normalize_address(address)
    assert "\n" not in str(raised.value)


def test_an_empty_address_is_never_suppressed(sending_db: SendingDatabase) -> None:
    with (
        sending_db.engine.begin() as connection,
        pytest.raises(ValueError, match="^an empty address cannot be suppressed$"),
    ):
        suppress(connection, schema=SCHEMA, email=" \t", reason="bounced", source="test")
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
        unsubscribe_with_token(connection, make_token(SECRET, "u1", LOOP))
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


def test_an_address_emailed_under_an_older_rule_stays_suppressible(
    sending_db: SendingDatabase,
) -> None:
    """Audiences built before the one address rule took `ada(x)@example.com`; the one-click
    link and a complaint for such an email must still suppress it, not fail."""
    odd = "Ada(x)@Example.com"
    with sending_db.engine.begin() as connection:
        for user_id, address, key in [("u1", odd, "k1"), ("u2", "Bob;x@example.com ", "k2")]:
            connection.execute(
                text("""
                    INSERT INTO retention.email_send_log
                        (send_key, loop_name, user_id, episode_start, step, partition_date,
                         email, template, variant, batch_key, idempotency_key, subject, html,
                         body_text, status, provider_id)
                    VALUES (:key, :loop, :user, '2026-11-20', 0, '2026-11-20', :email,
                            're_engagement', 'a', 'b1', 'retention-batch/k', 's', 'h', 't',
                            'sent', :key)"""),
                {"key": key, "loop": LOOP, "user": user_id, "email": address},
            )
    with sending_db.engine.begin() as connection:
        assert unsubscribe_with_token(connection, make_token(SECRET, "u1", LOOP)) == (
            "ada(x)@example.com"
        )
        complaint = parse_event(
            "d1",
            {
                "type": "email.complained",
                "created_at": "2026-11-21T09:00:00Z",
                "data": {"email_id": "k2", "to": ["Bob;x@example.com "]},
            },
        )
        assert store_event(connection, schema=SCHEMA, event=complaint).suppressed == (
            "bob;x@example.com",
        )
    assert suppressions(sending_db) == [
        ("ada(x)@example.com", "u1", "unsubscribed", f"unsubscribe_link:{LOOP}"),
        ("bob;x@example.com", "u2", "complained", "resend_webhook:complained"),
    ]


def test_a_downgrade_past_hashed_suppressions_refuses_rather_than_drop_them(
    emailed: SendingDatabase,
) -> None:
    with emailed.engine.begin() as connection:
        connection.execute(
            text("UPDATE retention.email_send_log SET status = 'sent', sent_at = now()")
        )
        erase_users_now(connection, "u1")
        assert unsubscribe_user(connection, schema=SCHEMA, user_id="u1", loop_name=None) is None
    with (
        emailed.engine.begin() as connection,
        pytest.raises(DBAPIError, match="mailboxes known only by their hash"),
    ):
        command.downgrade(migrate._alembic_config(connection, SCHEMA), "0022")
    with emailed.engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM retention.email_suppressions WHERE email IS NULL")
            ).scalar_one()
            == 1
        )


def test_a_downgrade_past_loop_suppressions_widens_them_to_every_loop(
    emailed: SendingDatabase,
) -> None:
    with emailed.engine.begin() as connection:
        # Ada's rows of two loops; Bob's of two loops and of every loop.
        unsubscribe_with_token(connection, make_token(SECRET, "u1", LOOP))
        for email, loop_name in (
            ("ada@example.com", "another_loop"),
            ("bob@example.com", LOOP),
            ("bob@example.com", "another_loop"),
            ("bob@example.com", None),
        ):
            suppress(
                connection,
                schema=SCHEMA,
                email=email,
                reason="unsubscribed",
                source="x",
                loop_name=loop_name,
            )
    with emailed.engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, SCHEMA), "0008")
    with emailed.engine.begin() as connection:
        command.upgrade(migrate._alembic_config(connection, SCHEMA), "head")
    with emailed.engine.connect() as connection:
        listed = connection.execute(
            text("SELECT email, loop_name FROM retention.email_suppressions ORDER BY email")
        ).all()
    assert [tuple(row) for row in listed] == [
        ("ada@example.com", None),
        ("bob@example.com", None),
    ]


def erase_users_now(connection, user_id: str) -> None:
    connection.execute(
        text("INSERT INTO retention.erased_users (user_id) VALUES (:id)"), {"id": user_id}
    )
    assert erase_users(connection, SCHEMA)[0] == [user_id]


def test_a_suppression_holds_the_mailbox_as_postgresql_lower_cases_it(
    sending_db: SendingDatabase,
) -> None:
    """The audience and the batch start lower-case addresses in SQL; Python lower-cases a dotted
    capital I to two characters. The list must hold what they compare with."""
    address = " İDA@Example.com"
    with sending_db.engine.begin() as connection:
        suppress(connection, schema=SCHEMA, email=address, reason="bounced", source="test")
        stored, compared = connection.execute(
            text(
                "SELECT (SELECT email FROM retention.email_suppressions), "
                "lower(btrim(CAST(:address AS text)))"
            ),
            {"address": address},
        ).one()
    assert stored == compared


def test_an_email_never_sent_leaves_no_hash_of_its_erased_user(emailed: SendingDatabase) -> None:
    """Only a sent email has an unsubscribe link to honour after the erasure."""
    with emailed.engine.begin() as connection:
        erase_users_now(connection, "u1")
        assert connection.execute(
            text("SELECT status, email, erased_mailbox_sha256 FROM retention.email_send_log")
        ).one() == ("failed", "", None)
        with pytest.raises(NothingToUnsubscribe):
            unsubscribe_user(connection, schema=SCHEMA, user_id="u1", loop_name=None)


def test_an_erased_users_email_that_may_have_been_delivered_keeps_its_unsubscribe(
    emailed: SendingDatabase,
) -> None:
    """Resend may have delivered an email whose request went unanswered (marked failed): its
    link must still work once its user is erased."""
    with emailed.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE retention.email_send_log SET status = 'failed', "
                "first_attempt_at = now(), error = 'no answer'"
            )
        )
        erase_users_now(connection, "u1")
        assert unsubscribe_with_token(connection, make_token(SECRET, "u1", None)) is None
        listed = connection.execute(
            text("""
                SELECT email, user_id, reason,
                       mailbox_sha256 = sha256(convert_to('ada@example.com', 'UTF8'))
                FROM retention.email_suppressions""")
        ).all()

    assert [tuple(row) for row in listed] == [(None, None, "unsubscribed", True)]


def test_a_bounce_arriving_after_the_erasure_suppresses_the_mailbox_by_its_hash_alone(
    emailed: SendingDatabase,
) -> None:
    """Resend's webhook can come after the user was erased: the bounce message quotes the
    address, and the event names the send-log row that still holds the user id."""
    with emailed.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE retention.email_send_log "
                "SET status = 'sent', sent_at = now(), provider_id = 're-1'"
            )
        )
        erase_users_now(connection, "u1")
        bounce = parse_event(
            "d1",
            {
                "type": "email.bounced",
                "created_at": "2026-11-21T09:00:00Z",
                "data": {
                    "email_id": "re-1",
                    "to": ["Ada@Example.com"],
                    "bounce": {"type": "Permanent", "message": "550 <Ada@Example.com> unknown"},
                },
            },
        )
        stored = store_event(connection, schema=SCHEMA, event=bounce)
        events = connection.execute(
            text("SELECT detail FROM retention.email_events WHERE send_log_id IS NOT NULL")
        ).scalars()
        listed = connection.execute(
            text("""
                SELECT email, user_id, reason, source,
                       mailbox_sha256 = sha256(convert_to('ada@example.com', 'UTF8'))
                FROM retention.email_suppressions""")
        ).all()

    assert stored.outcome == "stored"
    assert list(events) == [{}]
    assert [tuple(row) for row in listed] == [
        (None, None, "bounced", "resend_webhook:bounced", True)
    ]
