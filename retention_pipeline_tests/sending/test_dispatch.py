"""`send_pending` end to end: send log in PostgreSQL, ResendSender, the local fake Resend API."""

from __future__ import annotations

import logging
import random
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import text

from retention_pipeline.email.resend_sender import JITTER_MARGIN_SECONDS
from retention_pipeline.email.unsubscribe import verify_token
from retention_pipeline.sending import DispatchReport, send_pending
from retention_pipeline_tests.email.fake_resend import FakeClock, FakeResend
from retention_pipeline_tests.sending.support import (
    API_KEY,
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


def dispatch(db: SendingDatabase, clock: FakeClock | None = None, **sender_options: object):
    return send_pending(
        db.engine,
        schema=SCHEMA,
        loop_name=LOOP,
        loops_configured=[LOOP],
        sender=make_sender(clock, **sender_options),
        provider="resend",
    )


def log_rows(db: SendingDatabase) -> dict[str, dict]:
    with db.engine.connect() as connection:
        result = connection.execute(text("SELECT * FROM retention.email_send_log"))
        return {row["email"]: dict(row) for row in result.mappings()}


def test_250_treated_users_go_out_in_3_batches_and_a_rerun_sends_nothing(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(250))
    compose_and_claim(sending_db)
    with sending_db.engine.connect() as connection:
        stored_keys = connection.execute(
            text(
                "SELECT idempotency_key FROM retention.email_send_log "
                "GROUP BY batch_key, idempotency_key ORDER BY min(id)"
            )
        ).scalars()
        stored_keys = list(stored_keys)

    report = dispatch(sending_db)

    assert report == DispatchReport(sent=250, failed=0, still_pending=0)
    assert [len(request.emails) for request in fake_resend.requests] == [100, 100, 50]
    # Each batch goes out under the key stored with it at the claim, one key per batch.
    assert [request.idempotency_key for request in fake_resend.requests] == stored_keys
    assert len(set(stored_keys)) == 3
    assert sorted(fake_resend.delivered_to()) == sorted(f"user{n}@example.com" for n in range(250))
    assert statuses(sending_db.engine) == {"sent": 250}
    ids = {email["to"][0]: email["id"] for email in fake_resend.delivered}
    assert {address: row["provider_id"] for address, row in log_rows(sending_db).items()} == ids

    assert compose_and_claim(sending_db) == 0
    assert dispatch(sending_db) == DispatchReport(sent=0, failed=0, still_pending=0)
    assert len(fake_resend.requests) == 3
    assert fake_resend.delivered_count == 250


def test_rate_limits_and_server_errors_are_retried_and_an_invalid_address_fails_alone(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    people = users(150)
    people[7] = User("u00007", "user7@invalid.example")
    add_users(sending_db.engine, people)
    compose_and_claim(sending_db)
    fake_resend.rate_limit_next(1, retry_after=1.5)
    fake_resend.fail_next(2, status=500)
    clock = FakeClock()

    report = dispatch(sending_db, clock, rng=random.Random(7))

    assert report == DispatchReport(sent=149, failed=1, still_pending=0)
    assert [request.status for request in fake_resend.requests] == [429, 500, 500, 200, 200]
    # The 429's retry-after is waited out as given; the 500s back off with full jitter under
    # ceilings of 1s and 2s (attempts 2 and 3). The pacer's gaps (its margin) aside.
    waits = [seconds for seconds in clock.sleeps if seconds > JITTER_MARGIN_SECONDS + 0.001]
    assert len(waits) == 3
    assert waits[0] == 1.5
    assert waits[1] <= 1.0
    assert waits[2] <= 2.0
    rows = log_rows(sending_db)
    invalid = rows.pop("user7@invalid.example")
    assert invalid["status"] == "failed"
    assert "Invalid `to` field" in invalid["error"]
    assert {row["status"] for row in rows.values()} == {"sent"}
    assert fake_resend.delivered_count == 149
    assert "user7@invalid.example" not in fake_resend.delivered_to()

    # The final failure is not sent again.
    assert dispatch(sending_db) == DispatchReport(sent=0, failed=0, still_pending=0)
    assert len(fake_resend.requests) == 5


def test_a_batch_that_keeps_failing_stays_claimed_and_the_retry_sends_it_with_the_same_key(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(120))
    compose_and_claim(sending_db)
    fake_resend.fail_next(3, status=503, name="service_unavailable")

    first = dispatch(sending_db, max_attempts=3)

    # Batch 1 gave up after 3 attempts, so the dispatch stopped: batch 2 waits for the retry.
    assert first == DispatchReport(sent=0, failed=0, still_pending=120)
    rows = log_rows(sending_db)
    failed_batch = [row for row in rows.values() if row["error"]]
    assert len(failed_batch) == 100
    assert all("gave up after 3 attempts" in row["error"] for row in failed_batch)
    assert {row["attempts"] for row in failed_batch} == {1}
    assert len(fake_resend.requests) == 3

    second = dispatch(sending_db)

    assert second == DispatchReport(sent=120, failed=0, still_pending=0)
    assert statuses(sending_db.engine) == {"sent": 120}
    keys = [request.idempotency_key for request in fake_resend.requests]
    assert keys[0] == keys[1] == keys[2] == keys[3] != keys[4]
    assert fake_resend.delivered_count == 120


def test_what_the_server_receives_is_escaped_unsubscribable_and_tagged(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(
        sending_db.engine,
        [User("u1", "evil@example.com", name="<script>alert(1)</script>", variant="b")],
    )
    compose_and_claim(sending_db)

    dispatch(sending_db)

    (delivered,) = fake_resend.delivered
    assert "<script>" not in delivered["html"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in delivered["html"]
    assert delivered["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = delivered["headers"]["List-Unsubscribe"].strip("<>")
    assert verify_token(SECRET, parse_qs(urlsplit(url).query)["token"][0]) == ("u1", LOOP)
    assert delivered["tags"] == [
        {"name": "loop", "value": "re_engagement"},
        {"name": "step", "value": "0"},
        {"name": "variant", "value": "b"},
    ]


def test_the_api_key_appears_in_no_log_record_send_log_error_or_exception(
    sending_db: SendingDatabase, fake_resend: FakeResend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    add_users(sending_db.engine, users(250))
    compose_and_claim(sending_db)
    # A careless proxy echoes the Authorization header into its error bodies.
    fake_resend.fail_next(1, status=422, name="validation_error", echo_authorization=True)
    fake_resend.fail_next(2, status=502, name="bad_gateway", echo_authorization=True)
    sender = make_sender(max_attempts=2)

    # Delivery failures raise nothing that could carry the key: they are recorded.
    report = send_pending(
        sending_db.engine,
        schema=SCHEMA,
        loop_name=LOOP,
        loops_configured=[LOOP],
        sender=sender,
        provider="resend",
    )

    # Batch 1 is rejected for good; batch 2 gives up on the 502s, which stops the dispatch.
    assert report == DispatchReport(sent=0, failed=100, still_pending=150)
    # The server did see the key, and echoed it: the scrubbing is what keeps it out.
    assert fake_resend.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    errors = [row["error"] or "" for row in log_rows(sending_db).values()]
    assert sum("[redacted]" in error for error in errors) == 200
    logged = [
        f"{record.getMessage()} {record.exc_text or ''} {record.args!r}"
        for record in caplog.records
    ]
    assert any("[redacted]" in line for line in logged)
    for text_ in [*errors, *logged, repr(report), repr(sender)]:
        assert API_KEY not in text_
        assert "SECRET" not in text_


def test_a_batch_in_flight_for_over_a_day_is_given_up_not_resent(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(150))
    compose_and_claim(sending_db)
    with sending_db.engine.begin() as connection:
        # The first batch went out 25 hours ago and the process died before recording it;
        # the second was claimed as long ago but never attempted.
        connection.execute(
            text(
                "UPDATE retention.email_send_log SET claimed_at = now() - interval '25 hours', "
                "first_attempt_at = CASE WHEN batch_key = :first "
                "THEN now() - interval '25 hours' END"
            ),
            {"first": f"{LOOP}:{DAY}:1"},
        )

    report = dispatch(sending_db)

    assert report.expired == 100
    assert report.sent == 50
    assert [len(request.emails) for request in fake_resend.requests] == [50]
    rows = log_rows(sending_db).values()
    expired = [row for row in rows if row["status"] == "failed"]
    assert len(expired) == 100
    assert "may have been delivered" in expired[0]["error"]
    assert all(row["first_attempt_at"] is not None for row in rows if row["status"] == "sent")


def test_a_batch_retried_after_a_crash_still_expires_from_its_first_send(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(10))
    compose_and_claim(sending_db)
    # A send whose outcome is unknown, then a retry that gives up on 503s: still unconfirmed.
    fake_resend.fail_next(2, status=503, name="service_unavailable")
    assert dispatch(sending_db, max_attempts=2).still_pending == 10
    rows = log_rows(sending_db).values()
    assert all(row["first_attempt_at"] is not None for row in rows)
    # A day and more later, re-sending could deliver twice: the batch is given up instead.
    with sending_db.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE retention.email_send_log SET first_attempt_at = now() - interval '30 hours'"
            )
        )
    report = dispatch(sending_db)
    assert report.expired == 10 and report.sent == 0
    assert len(fake_resend.requests) == 2


def test_an_address_suppressed_after_the_claim_is_not_sent(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(3))
    compose_and_claim(sending_db)
    gone = next(iter(log_rows(sending_db)))
    with sending_db.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO retention.email_suppressions (email, reason) "
                "VALUES (lower(:email), 'unsubscribed')"
            ),
            {"email": gone},
        )

    report = dispatch(sending_db)

    assert report.sent == 2 and report.suppressed == 1
    assert gone not in fake_resend.delivered_to()
    assert "suppressed (unsubscribed)" in log_rows(sending_db)[gone]["error"]


def test_a_user_who_unsubscribed_after_the_claim_is_not_sent_at_another_address(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    """The unsubscribe named the user at an address they had before; a bounce there would
    not hold back the address claimed."""
    add_users(sending_db.engine, users(3))
    compose_and_claim(sending_db)
    with sending_db.engine.connect() as connection:
        claimed = dict(
            connection.execute(text("SELECT user_id, email FROM retention.email_send_log")).all()
        )
    unsubscribed, bounced, kept = sorted(claimed)
    with sending_db.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO retention.email_suppressions (email, user_id, reason, source) "
                "VALUES ('old.' || :unsubscribed, :unsubscribed_id, 'unsubscribed', 'link'), "
                "       ('old.' || :bounced, :bounced_id, 'bounced', 'webhook')"
            ),
            {
                "unsubscribed": claimed[unsubscribed],
                "unsubscribed_id": unsubscribed,
                "bounced": claimed[bounced],
                "bounced_id": bounced,
            },
        )

    report = dispatch(sending_db)

    assert report.sent == 2 and report.suppressed == 1
    assert sorted(fake_resend.delivered_to()) == sorted([claimed[bounced], claimed[kept]])
    assert "suppressed (unsubscribed)" in log_rows(sending_db)[claimed[unsubscribed]]["error"]


def test_a_rejected_api_key_keeps_every_email_claimed_for_a_retry_with_the_right_key(
    sending_db: SendingDatabase,
) -> None:
    from retention_pipeline_tests.email.fake_resend import serve_fake_resend

    add_users(sending_db.engine, users(150))
    compose_and_claim(sending_db)
    with serve_fake_resend(api_key="re_another_key") as fake:
        report = dispatch(sending_db)
        assert len(fake.requests) == 1
    assert report.sent == 0 and report.failed == 0 and report.still_pending == 150
    assert statuses(sending_db.engine) == {"claimed": 150}
    with serve_fake_resend(api_key=API_KEY) as fake:
        report = dispatch(sending_db)
        assert fake.delivered_count == 150
    assert report.sent == 150 and report.still_pending == 0


def test_a_batch_refused_for_its_api_key_is_as_never_sent_and_skipped_once_late(
    sending_db: SendingDatabase,
) -> None:
    from retention_pipeline_tests.email.fake_resend import serve_fake_resend

    add_users(sending_db.engine, users(150))
    compose_and_claim(sending_db)
    with serve_fake_resend(api_key="re_another_key") as fake:
        dispatch(sending_db)
        assert len(fake.requests) == 1
    assert all(row["first_attempt_at"] is None for row in log_rows(sending_db).values())
    # The key is fixed a day and more later, past every email's send window: Resend refused the
    # batch, so its emails are skipped as late, not failed as perhaps delivered.
    with sending_db.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE retention.email_send_log "
                "SET first_attempt_at = first_attempt_at - interval '30 hours'"
            )
        )
        connection.execute(
            text("UPDATE retention.reengagement_audience SET stale_at = now() - interval '1 hour'")
        )
    with serve_fake_resend(api_key=API_KEY) as fake:
        report = dispatch(sending_db)
        assert fake.delivered_count == 0
    assert (report.expired, report.stale, report.sent) == (0, 150, 0)
    assert all("never sent late" in row["error"] for row in log_rows(sending_db).values())


def test_a_refused_batch_whose_earlier_request_went_unanswered_still_expires(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    from retention_pipeline_tests.email.fake_resend import serve_fake_resend

    add_users(sending_db.engine, users(10))
    compose_and_claim(sending_db)
    fake_resend.drop_answer_next(1)  # delivered, the answer lost
    assert dispatch(sending_db, max_attempts=1).still_pending == 10
    with serve_fake_resend(api_key="re_another_key"):
        assert dispatch(sending_db).still_pending == 10
    assert all(row["first_attempt_at"] is not None for row in log_rows(sending_db).values())
    with sending_db.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE retention.email_send_log "
                "SET first_attempt_at = first_attempt_at - interval '30 hours'"
            )
        )
    report = dispatch(sending_db)
    assert (report.expired, report.sent) == (10, 0)
    assert fake_resend.delivered_count == 10
