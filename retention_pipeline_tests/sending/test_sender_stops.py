"""A sender that lost its lock, or whose run is no longer alive, stops before its next batch; what
it did not start stays claimed, and the next send run sends it once."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, time, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml
from dagster._core.test_utils import create_run_for_test
from dagster._daemon.monitoring import concurrency as monitoring_concurrency
from dagster._time import get_current_datetime
from sqlalchemy import make_url, text

from retention_pipeline.config.models import Recovery
from retention_pipeline.defs.partitions import daily_partitions
from retention_pipeline.defs.sending import build_send_job, send_partition_key
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import ResendEmail
from retention_pipeline.sending import SenderLockLost, SendRunReport, send_loop_day, sender_lock
from retention_pipeline_tests.email.fake_resend import FakeResend
from retention_pipeline_tests.helpers import write_config
from retention_pipeline_tests.sending.support import (
    API_KEY,
    DAY,
    FROM,
    LOOP,
    SECRET,
    ActingAfterFirstRequest,
    SendingDatabase,
    add_users,
    make_sender,
    serving,
    statuses,
    users,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MORNING = datetime.combine(DAY + timedelta(days=1), time(9), UTC)
HOLDER = "retention sender re_engagement/0 run deadbeef"


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


def test_the_first_batch_goes_out_before_the_rest_of_the_day_is_rendered_and_claimed(
    sending_db: SendingDatabase, fake_resend: FakeResend
) -> None:
    add_users(sending_db.engine, users(250))
    seen: list[dict[str, int]] = []
    sender = ActingAfterFirstRequest(
        make_sender(), lambda: seen.append(statuses(sending_db.engine))
    )

    report = send_run(sending_db, sender)

    assert seen == [{"claimed": 100}]
    assert (report.claimed[DAY], report.dispatch.sent, report.dispatch.still_pending) == (
        250,
        250,
        0,
    )
    assert len(fake_resend.requests) == 3
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


class RunDiesAtFirstRequest(FakeResend):
    """A stand-in Resend at whose first request the send run is marked failed, as run monitoring
    marks a run whose worker was killed while its step process goes on sending."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        super().__init__()
        self._instance = instance

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        if not self.requests:  # the run dies while its first batch is on the way
            (run,) = self._instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            self._instance.report_run_failed(run, "the run worker was killed")
        super()._handle(handler)


def test_the_send_op_stops_before_its_next_batch_once_its_run_is_no_longer_started(
    sending_db: SendingDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    day = datetime.now(UTC).date() - timedelta(days=1)  # within the send window of today
    add_users(sending_db.engine, users(250), day=day)
    app_database = AppDatabase(
        config_path=str(write_config(tmp_path, sending_db.url, email={"unsubscribe_secret": "s"}))
    )
    loop = app_database.config.loop(LOOP)
    # No step retries: what stops the sender here is its run, not the step's recovery.
    job = build_send_job(
        loop.model_copy(update={"recovery": Recovery(retries=0)}),
        daily_partitions(app_database.config),
        1,
    )
    resources = {
        "app_database": app_database,
        "email": ResendEmail(api_key=API_KEY, from_address=FROM, requests_per_second=1000),
    }

    with (
        dg.instance_for_test() as instance,
        serving(RunDiesAtFirstRequest(instance), monkeypatch) as fake,
    ):
        dead = job.execute_in_process(
            partition_key=send_partition_key(day.isoformat(), 0),
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        assert not dead.success
        assert len(fake.requests) == 1
        assert statuses(sending_db.engine) == {"sent": 100, "claimed": 150}
        messages = [entry.user_message for entry in instance.all_logs(dead.run_id)]
        # The first batch went out alone, before the rest was claimed: the stop came before the
        # first of the other two.
        assert any("stopping before batch 1 of 2" in message for message in messages)

        retry = job.execute_in_process(
            partition_key=send_partition_key(day.isoformat(), 0),
            instance=instance,
            resources=resources,
        )
        assert retry.success
        assert Counter(fake.delivered_to()) == Counter(f"user{n}@example.com" for n in range(250))
    assert statuses(sending_db.engine) == {"sent": 250}


def test_the_shipped_instance_frees_the_resend_slot_of_a_send_run_that_died(
    create_database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed mid-send never releases its `resend` pool slot; the daemon's run monitoring
    frees it as the shipped `deploy/dagster.yaml` says, or four such crashes stop every send run."""
    shipped = yaml.safe_load((PROJECT_ROOT / "deploy" / "dagster.yaml").read_text())
    free_after = shipped["run_monitoring"]["free_slots_after_run_end_seconds"]
    url = make_url(create_database()).set(drivername="postgresql+psycopg2")
    overrides = {
        "storage": {"postgres": {"postgres_url": url.render_as_string(hide_password=False)}},
        "run_monitoring": shipped["run_monitoring"],
    }
    with dg.instance_for_test(overrides=overrides) as instance:
        slots = instance.event_log_storage
        slots.set_concurrency_slots("resend", 1)
        run = create_run_for_test(
            instance, job_name="send_re_engagement", status=dg.DagsterRunStatus.STARTED
        )
        assert slots.claim_concurrency_slot("resend", run.run_id, "send_emails").is_claimed
        instance.report_run_failed(run, "the run worker was killed")
        assert slots.get_concurrency_info("resend").active_run_ids == {run.run_id}

        # The daemon's concurrency pass, a little later than the shipped delay.
        later = get_current_datetime() + timedelta(seconds=free_after + 5)
        monkeypatch.setattr(monitoring_concurrency, "get_current_datetime", lambda: later)
        daemon = SimpleNamespace(instance=instance)
        list(
            monitoring_concurrency.execute_concurrency_slots_iteration(daemon, logging.getLogger())
        )

        assert slots.get_concurrency_info("resend").active_slot_count == 0
    assert 0 < free_after <= 300
