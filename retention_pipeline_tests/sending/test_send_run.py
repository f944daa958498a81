"""`send_loop_day`, the whole send run without Dagster: the send window, counts that add up,
and one sender per loop at a time."""

from __future__ import annotations

import copy
import threading
from collections import Counter
from datetime import UTC, datetime, time, timedelta

import pytest

from retention_pipeline.config import parse_config
from retention_pipeline.sending import SenderBusy, SendRunReport, send_loop_day, send_pending
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT
from retention_pipeline_tests.sending.support import (
    DAY,
    LOOP,
    SCHEMA,
    SECRET,
    SendingDatabase,
    SlowFakeResend,
    add_users,
    compose_and_claim,
    make_sender,
    serving,
    statuses,
    users,
)

# The morning after DAY: DAY is the day just ended, and DAY - 1 the oldest day still sent (the
# sensor's window: the last three days, today included).
MORNING = datetime.combine(DAY + timedelta(days=1), time(9), UTC)


def send_run(db: SendingDatabase, *, now: datetime = MORNING, holder: str = "test sender"):
    return send_loop_day(
        db.engine,
        config=db.config,
        loop=db.config.loop(LOOP),
        day=DAY,
        now=now,
        sender=make_sender(),
        provider="resend",
        unsubscribe_secret=SECRET,
        holder=holder,
    )


def test_a_send_run_claims_only_days_within_the_window_and_its_counts_add_up(
    sending_db: SendingDatabase, fake_resend
) -> None:
    # A backfill left an audience of three days ago (history for the sensor, but in reach of
    # the old two-day look-back), and the day before DAY is still unsent.
    add_users(sending_db.engine, users(3), day=DAY - timedelta(days=2))
    add_users(sending_db.engine, users(2, start=10), day=DAY - timedelta(days=1))
    add_users(sending_db.engine, users(5, start=20), day=DAY)

    report = send_run(sending_db)

    assert report.audience_days == (DAY - timedelta(days=1), DAY)
    assert sorted(fake_resend.delivered_to()) == sorted(
        f"user{n}@example.com" for n in (10, 11, 20, 21, 22, 23, 24)
    )
    assert statuses(sending_db.engine) == {"sent": 7}  # the old day is history: never claimed
    assert report.days_changed == [DAY - timedelta(days=1), DAY]
    for day, sent in ((DAY - timedelta(days=1), 2), (DAY, 5)):
        metadata = report.metadata_for(day)
        assert metadata["claimed_this_run"] == metadata["sent_this_run"] == sent
        assert metadata["re_engagement/status/sent"] == sent
        assert metadata["send_run_audience_days"] == "2026-11-19, 2026-11-20"
    assert str(report) == (
        "re_engagement 2026-11-20: claimed 7 new emails from audience days 2026-11-19, "
        "2026-11-20; 7 sent, 0 failed; 0 still claimed, to be retried"
    )

    # Days later, the same day is history too: nothing is claimed, and the run says so.
    late = send_run(sending_db, now=MORNING + timedelta(days=5))
    assert late.audience_days == ()
    assert "older than the send window" in str(late)


def test_a_step_taken_out_after_the_build_is_sent_to_nobody_and_the_rest_still_goes_out(
    sending_db: SendingDatabase, fake_resend
) -> None:
    add_users(sending_db.engine, [*users(3), *users(2, start=10, step=2)])
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = sending_db.url
    document["loops"][0]["steps"] = document["loops"][0]["steps"][:2]
    shortened = parse_config(document, environ={})

    report = send_loop_day(
        sending_db.engine,
        config=shortened,
        loop=shortened.loop(LOOP),
        day=DAY,
        now=MORNING,
        sender=make_sender(),
        provider="resend",
        unsubscribe_secret=SECRET,
        holder="test sender",
    )

    assert sorted(fake_resend.delivered_to()) == [f"user{n}@example.com" for n in range(3)]
    assert report.metadata_for(DAY)["sent_this_run"] == 3


def test_two_dispatches_at_once_count_each_email_once(
    sending_db: SendingDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the lock (as two processes of an older version would), both send the same
    batches; Resend answers the second from its idempotency store, and only the dispatch whose
    record settled a row counts it."""
    add_users(sending_db.engine, users(300))
    compose_and_claim(sending_db)
    reports = []
    start = threading.Barrier(2)

    def dispatch() -> None:
        start.wait()
        reports.append(
            send_pending(
                sending_db.engine,
                schema=SCHEMA,
                loop_name=LOOP,
                loops_configured=[LOOP],
                sender=make_sender(),
                provider="resend",
            )
        )

    with serving(SlowFakeResend(response_delay=0.2), monkeypatch) as fake:
        threads = [threading.Thread(target=dispatch) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert fake.delivered_count == 300
    assert sum(report.sent for report in reports) == 300
    assert statuses(sending_db.engine) == {"sent": 300}


def test_two_senders_of_one_loop_started_together_send_once_and_the_second_names_the_first(
    sending_db: SendingDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_users(sending_db.engine, users(300))
    outcomes: dict[str, SendRunReport | Exception] = {}
    start = threading.Barrier(2)

    def sender(name: str) -> None:
        start.wait()
        try:
            outcomes[name] = send_run(sending_db, holder=name)
        except SenderBusy as busy:
            outcomes[name] = busy

    # Each batch's answer takes 0.3 s: the first sender holds the loop for about a second.
    with serving(SlowFakeResend(response_delay=0.3), monkeypatch) as fake:
        threads = [
            threading.Thread(target=sender, args=(name,)) for name in ("sender one", "sender two")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert Counter(fake.delivered_to()) == Counter(f"user{n}@example.com" for n in range(300))
    assert len(fake.requests) == 3
    reports = [each for each in outcomes.values() if isinstance(each, SendRunReport)]
    (busy,) = [each for each in outcomes.values() if isinstance(each, SenderBusy)]
    (report,) = reports
    assert report.dispatch.sent == 300
    winner = next(name for name, each in outcomes.items() if each is report)
    message = str(busy)
    assert "\n" not in message
    assert message.startswith(
        f"loop {LOOP} (schema {SCHEMA}) is already being sent by '{winner}' (PostgreSQL pid "
    )
    assert "holding it since 20" in message and message.endswith("stops without sending")
    assert statuses(sending_db.engine) == {"sent": 300}

    # The lock went with the first sender: the next run goes ahead (and finds nothing to send).
    assert send_run(sending_db).dispatch.sent == 0
