"""Suppressions and erasures that race a send: an address suppressed, or a user erased, after
the claim is never in a request that starts later, and withholding it never gets anyone emailed
twice, against the local stand-in for Resend."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from alembic import command
from sqlalchemy import text

from retention_pipeline.database import migrate
from retention_pipeline.recipients.suppressions import unsubscribe_user
from retention_pipeline.sending import pending_batch_keys, send_pending, start_batch
from retention_pipeline.sending.dispatch import DispatchReport
from retention_pipeline.tracking.erasure import erase_users
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.email.fake_resend import FakeResend
from retention_pipeline_tests.sending.support import (
    DAY,
    LOOP,
    SCHEMA,
    ActingAfterFirstRequest,
    SendingDatabase,
    User,
    add_users,
    compose_and_claim,
    make_sender,
    statuses,
    users,
)


def dispatch(db: SendingDatabase, sender: object) -> DispatchReport:
    return send_pending(
        db.engine,
        schema=SCHEMA,
        loop_name=LOOP,
        loops_configured=[LOOP, "another_loop"],
        sender=sender,
        provider="resend",
    )


def suppress(db: SendingDatabase, address: str, loop_name: str | None = None) -> None:
    with db.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO retention.email_suppressions (email, reason, loop_name) "
                "VALUES (:email, 'unsubscribed', :loop)"
            ),
            {"email": address, "loop": loop_name},
        )


def erase(db: SendingDatabase, user_id: str) -> None:
    """Record the user's deletion as the app's trigger does; the drain erases it later."""
    with db.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO retention.erased_users (user_id) VALUES (:id)"), {"id": user_id}
        )


def row(db: SendingDatabase, user_id: str) -> dict:
    with db.engine.connect() as connection:
        return dict(
            connection.execute(
                text("SELECT * FROM retention.email_send_log WHERE user_id = :id"), {"id": user_id}
            )
            .mappings()
            .one()
        )


def addressees(request) -> list[str]:
    return [address.lower() for email in request.emails for address in email["to"]]


def test_addresses_suppressed_while_the_dispatch_is_underway_are_not_sent(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    people = users(150)
    # The app stores the address as typed; the suppression list keeps it lower-cased.
    people[120] = User("u00120", "User120@Example.COM")
    add_users(sending_db.engine, people)
    compose_and_claim(sending_db)

    def unsubscribes() -> None:
        suppress(sending_db, "user120@example.com")  # every loop
        suppress(sending_db, "user130@example.com", LOOP)  # this loop
        suppress(sending_db, "user140@example.com", "another_loop")  # not this one
        # A loop the configuration no longer has (renamed since the link was sent): every loop.
        suppress(sending_db, "user145@example.com", "old_name")

    report = dispatch(sending_db, ActingAfterFirstRequest(make_sender(), unsubscribes))

    delivered = Counter(address.lower() for address in fake_resend.delivered_to())
    withheld = ("user120@example.com", "user130@example.com", "user145@example.com")
    assert not set(withheld) & set(delivered)
    assert delivered["user140@example.com"] == 1
    assert sum(delivered.values()) == 147 and set(delivered.values()) == {1}
    assert (report.sent, report.failed, report.suppressed, report.still_pending) == (147, 0, 3, 0)
    assert statuses(sending_db.engine) == {"sent": 147, "failed": 3}
    assert row(sending_db, "u00120")["error"] == (
        "the address was suppressed (unsubscribed) after the email was claimed: not sent"
    )
    assert "3 not sent (suppressed since they were claimed)" in str(report)


def test_a_user_erased_while_the_dispatch_is_underway_is_not_sent_and_is_then_erased(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(150))
    compose_and_claim(sending_db)

    report = dispatch(
        sending_db, ActingAfterFirstRequest(make_sender(), lambda: erase(sending_db, "u00125"))
    )

    assert "user125@example.com" not in fake_resend.delivered_to()
    assert fake_resend.delivered_count == 149
    assert (report.sent, report.erased, report.still_pending) == (149, 1, 0)
    assert row(sending_db, "u00125")["status"] == "failed"
    # Nothing of the user is in flight any more, so the next drain erases it.
    with sending_db.engine.begin() as connection:
        erased, _keys = erase_users(connection, SCHEMA)
    assert erased == ["u00125"]
    assert (row(sending_db, "u00125")["email"], row(sending_db, "u00125")["status"]) == (
        "",
        "failed",
    )


def test_an_attempted_batch_is_re_sent_without_the_address_suppressed_since(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(5))
    compose_and_claim(sending_db)
    # The first request never reaches Resend's store: the batch stays claimed, attempted.
    fake_resend.fail_next(2, status=503, name="service_unavailable")
    assert dispatch(sending_db, make_sender(max_attempts=2)).still_pending == 5
    suppress(sending_db, "user3@example.com")

    report = dispatch(sending_db, make_sender())

    first, second, retry = fake_resend.requests
    assert "user3@example.com" in addressees(first)
    assert "user3@example.com" not in addressees(retry)
    assert first.idempotency_key == second.idempotency_key == retry.idempotency_key
    assert sorted(fake_resend.delivered_to()) == [f"user{n}@example.com" for n in (0, 1, 2, 4)]
    assert (report.sent, report.suppressed, report.still_pending) == (4, 1, 0)
    assert row(sending_db, "u00003")["error"].startswith(
        "the address was suppressed (unsubscribed) after the email was claimed: not sent again"
    )


def test_a_batch_delivered_unanswered_then_withheld_from_is_never_delivered_twice(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(5))
    compose_and_claim(sending_db)
    # Resend delivers the batch but the answer is lost: the send log cannot know it went out.
    fake_resend.drop_answer_next()
    assert dispatch(sending_db, make_sender(max_attempts=1)).still_pending == 5
    suppress(sending_db, "user1@example.com")
    erase(sending_db, "u00003")

    report = dispatch(sending_db, make_sender())

    first, retry = fake_resend.requests
    # The retry carries the key stored at the claim, without the two withheld: Resend refuses
    # that payload for the key it already sent, and delivers nothing.
    assert addressees(retry) == [f"user{n}@example.com" for n in (0, 2, 4)]
    assert (
        first.idempotency_key
        == retry.idempotency_key
        == row(sending_db, "u00000")["idempotency_key"]
    )
    assert retry.status == 409
    assert Counter(fake_resend.delivered_to()) == Counter(f"user{n}@example.com" for n in range(5))
    assert (report.sent, report.suppressed, report.erased, report.still_pending) == (3, 1, 1, 0)
    assert statuses(sending_db.engine) == {"sent": 3, "failed": 2}
    assert row(sending_db, "u00000")["provider_id"] is None
    assert "not sent again" in row(sending_db, "u00001")["error"]

    # Settled: nothing more is requested.
    assert dispatch(sending_db, make_sender()) == DispatchReport(sent=0, failed=0, still_pending=0)
    assert len(fake_resend.requests) == 2


def test_a_batch_attempted_before_the_upgrade_is_retried_under_the_key_it_went_out_with(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    """Revision 0011 stores each batch's key; a batch still claimed keeps the key the sender of
    revision 0010 derived from its members, or Resend would deliver it again."""
    add_users(sending_db.engine, users(5))
    compose_and_claim(sending_db)
    with sending_db.engine.connect() as connection:
        (key,) = pending_batch_keys(connection, schema=SCHEMA, loop_name=LOOP)
        emails = start_batch(
            connection, schema=SCHEMA, loop_name=LOOP, batch_key=key, loops_configured=[LOOP]
        ).emails
        connection.rollback()
    with sending_db.engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, SCHEMA), "0010")
    # Revision 0010's send: the key derived from the members, delivered, the answer lost.
    fake_resend.drop_answer_next()
    make_sender(max_attempts=1).send(emails)
    with sending_db.engine.begin() as connection:
        connection.execute(text("UPDATE retention.email_send_log SET first_attempt_at = now()"))

    install(sending_db.engine, sending_db.config)
    report = dispatch(sending_db, make_sender())

    before, after = fake_resend.requests
    assert after.idempotency_key == before.idempotency_key and after.replayed
    assert fake_resend.delivered_count == 5
    assert (report.sent, report.still_pending) == (5, 0)


def test_an_unsubscribe_from_an_erased_user_withholds_the_next_account_of_the_mailbox(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    """u1 was emailed and erased; u2, the same person signed up again, is claimed; then the
    unsubscribe from u1's email arrives, with no address left to name: u2's email is not sent."""
    add_users(sending_db.engine, [User("u1", "Ada@Example.com")])
    compose_and_claim(sending_db)
    assert dispatch(sending_db, make_sender()).sent == 1
    erase(sending_db, "u1")
    with sending_db.engine.begin() as connection:
        assert len(erase_users(connection, SCHEMA)[0]) == 1
    later = DAY + timedelta(days=1)
    add_users(sending_db.engine, [User("u2", "ADA@example.com ")], day=later)
    compose_and_claim(sending_db, day=later)

    with sending_db.engine.begin() as connection:
        unsubscribe_user(connection, schema=SCHEMA, user_id="u1", loop_name=LOOP)
    report = dispatch(sending_db, make_sender())

    assert fake_resend.delivered_count == 1
    assert (report.sent, report.suppressed) == (0, 1)
    assert row(sending_db, "u2")["error"] == (
        "the address was suppressed (unsubscribed) after the email was claimed: not sent"
    )
