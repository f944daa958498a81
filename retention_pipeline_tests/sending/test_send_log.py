"""Claiming emails, rebuilding the claimed batches, and recording outcomes in the send log."""

from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy import text

from retention_pipeline.email.message import SendResult
from retention_pipeline.sending import (
    claim,
    compose_emails,
    pending_batch_keys,
    record,
    send_log_summary,
    send_pending,
    start_batch,
    treatment_rows,
)
from retention_pipeline_tests.sending.support import (
    DAY,
    LOOP,
    SCHEMA,
    SECRET,
    SendingDatabase,
    User,
    add_users,
    compose_and_claim,
    make_sender,
    statuses,
    users,
)


def composed(db: SendingDatabase, day: date = DAY) -> list:
    with db.engine.connect() as connection:
        return compose_emails(
            connection,
            schema=SCHEMA,
            config=db.config,
            loop=db.config.loop(LOOP),
            day=day,
            unsubscribe_secret=SECRET,
        )


def pending(db: SendingDatabase) -> list:
    """The emails of each pending batch, as `start_batch` would send them (and rolled back)."""
    with db.engine.connect() as connection:
        keys = pending_batch_keys(connection, schema=SCHEMA, loop_name=LOOP)
        batches = [
            start_batch(
                connection, schema=SCHEMA, loop_name=LOOP, batch_key=key, loops_configured=[LOOP]
            ).emails
            for key in keys
        ]
        connection.rollback()
        return batches


def batch_keys(db: SendingDatabase) -> dict[str, int]:
    with db.engine.connect() as connection:
        return dict(
            connection.execute(
                text(
                    "SELECT batch_key, count(*) FROM retention.email_send_log "
                    "GROUP BY batch_key ORDER BY min(id)"
                )
            ).all()
        )


def test_claiming_twice_claims_each_email_once(sending_db: SendingDatabase) -> None:
    add_users(sending_db.engine, users(250))

    assert compose_and_claim(sending_db) == 250
    assert compose_and_claim(sending_db) == 0

    assert statuses(sending_db.engine) == {"claimed": 250}
    with sending_db.engine.connect() as connection:
        row = (
            connection.execute(
                text("SELECT * FROM retention.email_send_log WHERE user_id = 'u00007'")
            )
            .mappings()
            .one()
        )
    email = next(email for email in composed(sending_db) if email.to == "user7@example.com")
    assert row["send_key"] == email.key == "re_engagement:u00007:2026-11-20:0"
    assert (row["loop_name"], row["partition_date"], row["episode_start"], row["step"]) == (
        LOOP,
        DAY,
        DAY,
        0,
    )
    assert (row["email"], row["template"], row["variant"]) == (
        "user7@example.com",
        "re_engagement",
        "a",
    )
    assert (row["subject"], row["html"], row["body_text"]) == (
        email.subject,
        email.html,
        email.text,
    )
    assert (row["headers"], row["tags"]) == (email.headers, email.tags)
    assert (row["attempts"], row["provider_id"], row["sent_at"]) == (0, None, None)


def test_pending_batches_split_at_100_and_are_the_claimed_bytes(
    sending_db: SendingDatabase,
) -> None:
    add_users(sending_db.engine, users(250))
    compose_and_claim(sending_db)

    first = pending(sending_db)
    second = pending(sending_db)

    assert [len(batch) for batch in first] == [100, 100, 50]
    assert batch_keys(sending_db) == {
        "re_engagement:2026-11-20:1": 100,
        "re_engagement:2026-11-20:2": 100,
        "re_engagement:2026-11-20:3": 50,
    }
    claimed = sorted(composed(sending_db), key=lambda email: email.key)
    assert [email for batch in first for email in batch] == claimed
    # Equal dicts may differ in order, and the order of tags shapes the request body.
    for rebuilt, original in zip((e for batch in first for e in batch), claimed, strict=True):
        assert list(rebuilt.headers.items()) == list(original.headers.items())
        assert list(rebuilt.tags.items()) == list(original.tags.items())
    assert first == second


def test_a_claim_keeps_its_content_when_the_day_is_rendered_again(
    sending_db: SendingDatabase,
) -> None:
    add_users(sending_db.engine, users(2))
    compose_and_claim(sending_db)
    with sending_db.engine.begin() as connection:
        connection.execute(text("UPDATE retention.user_activity_snapshot SET name = 'Changed'"))
    assert composed(sending_db)[0].subject == "Changed, we miss you at Acme"

    assert compose_and_claim(sending_db) == 0

    assert [email.subject for email in pending(sending_db)[0]] == ["Ada, we miss you at Acme"] * 2
    # The send job does not even render what is claimed already.
    with sending_db.engine.connect() as connection:
        assert (
            compose_emails(
                connection,
                schema=SCHEMA,
                config=sending_db.config,
                loop=sending_db.config.loop(LOOP),
                day=DAY,
                unsubscribe_secret=SECRET,
                unclaimed_only=True,
            )
            == []
        )


def test_a_later_claim_of_the_day_numbers_its_batches_after_the_stored_ones(
    sending_db: SendingDatabase,
) -> None:
    add_users(sending_db.engine, users(150))
    compose_and_claim(sending_db)
    before = pending(sending_db)
    add_users(sending_db.engine, users(30, start=150))

    assert compose_and_claim(sending_db) == 30

    assert batch_keys(sending_db) == {
        "re_engagement:2026-11-20:1": 100,
        "re_engagement:2026-11-20:2": 50,
        "re_engagement:2026-11-20:3": 30,
    }
    after = pending(sending_db)
    assert after[:2] == before
    assert {email.to for email in after[2]} == {f"user{n}@example.com" for n in range(150, 180)}


def test_claim_needs_one_audience_row_per_email_and_unique_keys(
    sending_db: SendingDatabase,
) -> None:
    add_users(sending_db.engine, [User("u1", "a@example.com"), User("u2", "b@example.com")])
    emails = composed(sending_db)
    with sending_db.engine.begin() as connection:
        rows = treatment_rows(connection, schema=SCHEMA, loop_name=LOOP, day=DAY)
        with pytest.raises(ValueError, match="1 emails have no audience row"):
            claim(
                connection,
                schema=SCHEMA,
                loop_name=LOOP,
                day=DAY,
                emails=emails,
                audience_rows=rows[:1],
            )
        assert (
            claim(connection, schema=SCHEMA, loop_name=LOOP, day=DAY, emails=[], audience_rows=[])
            == 0
        )
        with pytest.raises(ValueError, match="duplicate send keys"):
            claim(
                connection,
                schema=SCHEMA,
                loop_name=LOOP,
                day=DAY,
                emails=emails + emails[:1],
                audience_rows=rows,
            )


def test_record_sent_final_failure_and_retryable_failure(sending_db: SendingDatabase) -> None:
    add_users(sending_db.engine, users(3))
    compose_and_claim(sending_db)
    sent, rejected, deferred = (email.key for email in pending(sending_db)[0])

    with sending_db.engine.begin() as connection:
        record(
            connection,
            schema=SCHEMA,
            provider="resend",
            results=[
                SendResult(sent, "sent", "id-1"),
                SendResult(rejected, "failed", error="rejected by Resend: invalid `to`"),
                SendResult(deferred, "failed", error="gave up after 6 attempts", retryable=True),
            ],
        )

    with sending_db.engine.connect() as connection:
        rows = {
            row["send_key"]: row
            for row in connection.execute(text("SELECT * FROM retention.email_send_log"))
            .mappings()
            .all()
        }
    assert rows[sent]["status"] == "sent"
    assert rows[sent]["provider_id"] == "id-1"
    assert rows[sent]["sent_at"] is not None
    assert rows[sent]["error"] is None
    assert rows[rejected]["status"] == "failed"
    assert rows[rejected]["error"] == "rejected by Resend: invalid `to`"
    assert rows[rejected]["sent_at"] is None
    assert rows[deferred]["status"] == "claimed"
    assert rows[deferred]["error"] == "gave up after 6 attempts"
    assert {row["attempts"] for row in rows.values()} == {1}
    assert {row["provider"] for row in rows.values()} == {"resend"}
    # Only the retryable one is still pending; the final failure is never sent again.
    assert [[email.key for email in batch] for batch in pending(sending_db)] == [[deferred]]

    with sending_db.engine.begin() as connection:
        record(
            connection,
            schema=SCHEMA,
            provider="resend",
            results=[
                SendResult(rejected, "sent", "id-late"),
                SendResult(deferred, "sent", "id-2"),
            ],
        )
    with sending_db.engine.connect() as connection:
        summary = send_log_summary(connection, schema=SCHEMA, loop_name=LOOP, day=DAY)
    assert summary == {"claimed": 0, "sent": 2, "failed": 1}
    with sending_db.engine.connect() as connection:
        deferred_row = (
            connection.execute(
                text("SELECT * FROM retention.email_send_log WHERE send_key = :key"),
                {"key": deferred},
            )
            .mappings()
            .one()
        )
    assert (deferred_row["provider_id"], deferred_row["error"], deferred_row["attempts"]) == (
        "id-2",
        None,
        2,
    )


def test_one_mailbox_gets_one_email_of_a_day_whatever_the_audience_holds(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """An audience built before it kept one user per mailbox: the send still emails it once."""
    add_users(
        sending_db.engine,
        [
            User("u1", "dup@example.com"),
            User("u2", "DUP@Example.COM "),
            User("u3", "solo@example.com"),
            User("u4", "twin@example.com"),
            User("u5", "Twin@Example.com"),
        ],
    )
    emails = {email.to: email for email in composed(sending_db)}
    with sending_db.engine.begin() as connection:
        rows = treatment_rows(connection, schema=SCHEMA, loop_name=LOOP, day=DAY)
        # One claim already has the mailbox's email; another claim comes for its twin.
        for address in ("twin@example.com", "Twin@Example.com"):
            claim(
                connection,
                schema=SCHEMA,
                loop_name=LOOP,
                day=DAY,
                emails=[emails[address]],
                audience_rows=rows,
            )

    assert compose_and_claim(sending_db) == 2
    assert compose_and_claim(sending_db) == 0
    report = send_pending(
        sending_db.engine,
        schema=SCHEMA,
        loop_name=LOOP,
        loops_configured=[LOOP],
        sender=make_sender(),
        provider="resend",
    )

    assert sorted(fake_resend.delivered_to()) == [
        "dup@example.com",
        "solo@example.com",
        "twin@example.com",
    ]
    assert report.sent == 3
    assert statuses(sending_db.engine) == {"sent": 3, "failed": 2}
    with sending_db.engine.connect() as connection:
        failed = connection.execute(
            text(
                "SELECT user_id, error FROM retention.email_send_log WHERE status = 'failed' "
                "ORDER BY user_id"
            )
        ).all()
    assert [tuple(row) for row in failed] == [
        ("u2", "not sent: the address already has this loop's email of the day, as user u1"),
        ("u5", "not sent: the address already has this loop's email of the day, as user u4"),
    ]


def test_a_refusal_leaves_the_attempt_mark_of_a_batch_another_sender_started_since(
    sending_db: SendingDatabase,
) -> None:
    """A sender whose request was refused whole unsets the batch's attempt mark only if no other
    sender started the batch since: that one's request may have gone out."""
    add_users(sending_db.engine, users(3))
    compose_and_claim(sending_db)
    with sending_db.engine.connect() as connection:
        (key,) = pending_batch_keys(connection, schema=SCHEMA, loop_name=LOOP)

    def start():
        with sending_db.engine.begin() as connection:
            return start_batch(
                connection, schema=SCHEMA, loop_name=LOOP, batch_key=key, loops_configured=[LOOP]
            )

    def refuse(batch) -> None:
        refused = [
            SendResult(email.key, "failed", None, "rejected by Resend: HTTP 403", True, True)
            for email in batch.emails
        ]
        with sending_db.engine.begin() as connection:
            record(
                connection,
                schema=SCHEMA,
                results=refused,
                provider="resend",
                first_attempt_at=batch.first_attempt_at,
            )

    def marks() -> set:
        with sending_db.engine.connect() as connection:
            return set(
                connection.execute(
                    text("SELECT first_attempt_at FROM retention.email_send_log")
                ).scalars()
            )

    first = start()
    assert first.first_attempt_at is not None
    refuse(first)
    assert marks() == {None}  # refused whole, and nobody else tried: as never sent

    first = start()
    second = start()  # another sender, whose request's outcome is not known yet
    assert second.first_attempt_at is None
    refuse(first)
    assert marks() == {first.first_attempt_at}
