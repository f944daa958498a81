"""A sender that lost its lock, or whose run is no longer alive, stops before its next batch; what
it did not start stays claimed, and the next send run sends it once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, time, timedelta

import pytest
from sqlalchemy import text

from retention_pipeline.email.message import OutgoingEmail, SendResult
from retention_pipeline.email.resend_sender import ResendSender
from retention_pipeline.sending import SenderLockLost, SendRunReport, send_loop_day, sender_lock
from retention_pipeline_tests.email.fake_resend import FakeResend
from retention_pipeline_tests.sending.support import (
    DAY,
    LOOP,
    SECRET,
    SendingDatabase,
    add_users,
    make_sender,
    statuses,
    users,
)

MORNING = datetime.combine(DAY + timedelta(days=1), time(9), UTC)
HOLDER = "retention sender re_engagement/0 run deadbeef"


class ActingAfterFirstRequest:
    """A `ResendSender` that runs `action` once its first request is answered."""

    def __init__(self, sender: ResendSender, action: Callable[[], None]) -> None:
        self._sender = sender
        self._action: Callable[[], None] | None = action

    def send(self, emails: Sequence[OutgoingEmail], **options: str | None) -> list[SendResult]:
        results = self._sender.send(emails, **options)
        if self._action is not None:
            self._action()
            self._action = None
        return results


def send_run(
    db: SendingDatabase, sender: object, **keep_going: Callable[[], bool]
) -> SendRunReport:
    return send_loop_day(
        db.engine,
        config=db.config,
        loop=db.config.loop(LOOP),
        day=DAY,
        now=MORNING,
        sender=sender,
        provider="resend",
        unsubscribe_secret=SECRET,
        holder=HOLDER,
        **keep_going,
    )


def terminate_the_lock_holder(db: SendingDatabase) -> None:
    """What an operator's `pg_terminate_backend` on the sender's connection does."""
    with db.engine.connect() as connection:
        terminated = connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :holder"
            ),
            {"holder": HOLDER},
        ).scalars()
        assert list(terminated) == [True]


def test_a_sender_whose_lock_connection_is_terminated_stops_before_its_next_batch(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(250))
    sender = ActingAfterFirstRequest(make_sender(), lambda: terminate_the_lock_holder(sending_db))

    with pytest.raises(SenderLockLost) as lost:
        send_run(sending_db, sender)

    # The lock's error, in one line, not the unlock's.
    message = str(lost.value)
    assert message.startswith(f"lost the sender lock of loop {LOOP} (schema retention)")
    assert "\n" not in message and "stay claimed" in message
    assert len(fake_resend.requests) == 1
    assert statuses(sending_db.engine) == {"sent": 100, "claimed": 150}

    # The next send run (the retry) takes over and sends the rest, once.
    report = send_run(sending_db, make_sender())
    assert report.dispatch.sent == 150
    assert Counter(fake_resend.delivered_to()) == Counter(
        f"user{n}@example.com" for n in range(250)
    )
    assert statuses(sending_db.engine) == {"sent": 250}


def test_a_sender_whose_run_is_no_longer_alive_stops_and_a_later_run_sends_the_rest_once(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(250))
    answers: Iterator[bool] = iter([True])  # alive for the first batch only

    stopped = send_run(sending_db, make_sender(), keep_going=lambda: next(answers, False))

    assert (stopped.dispatch.sent, stopped.dispatch.still_pending) == (100, 150)
    assert len(fake_resend.requests) == 1
    assert statuses(sending_db.engine) == {"sent": 100, "claimed": 150}
    # Nothing lost: the unstarted batches were never attempted, and go out whole later.
    with sending_db.engine.connect() as connection:
        assert (
            connection.execute(
                text(
                    "SELECT count(*) FROM retention.email_send_log "
                    "WHERE status = 'claimed' AND first_attempt_at IS NULL"
                )
            ).scalar_one()
            == 150
        )

    later = send_run(sending_db, make_sender())

    assert (later.claimed[DAY], later.dispatch.sent, later.dispatch.still_pending) == (0, 150, 0)
    assert len(fake_resend.requests) == 3
    assert Counter(fake_resend.delivered_to()) == Counter(
        f"user{n}@example.com" for n in range(250)
    )


def test_the_error_that_ended_a_sender_is_not_hidden_by_its_lost_lock(
    sending_db: SendingDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    lock = sender_lock(sending_db.engine, schema="retention", loop_name=LOOP, holder=HOLDER)
    with pytest.raises(RuntimeError, match="^the provider exploded$"), lock:
        terminate_the_lock_holder(sending_db)
        raise RuntimeError("the provider exploded")
    # The unlock's failure is a warning beside it.
    assert "could not release the sender lock of loop re_engagement" in caplog.text

    # The lock went with its connection: the next sender takes it at once.
    with sender_lock(sending_db.engine, schema="retention", loop_name=LOOP, holder=HOLDER) as lock:
        lock.ensure_held()
