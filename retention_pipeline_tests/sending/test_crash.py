"""Exactly once across crashes: `send_pending` in another process, SIGKILLed mid-send, then run
again to completion, against a real local HTTP server standing in for Resend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from retention_pipeline_tests.helpers import write_config
from retention_pipeline_tests.sending.support import (
    SendingDatabase,
    SlowFakeResend,
    add_users,
    compose_and_claim,
    serving,
    statuses,
    users,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def start_worker(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "retention_pipeline_tests.sending.dispatch_worker", *args],
            cwd=PROJECT_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def wait_for(condition: Callable[[], bool], worker: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if worker.poll() is not None:
            pytest.fail(f"the worker exited early ({worker.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for the worker:\n{log.read_text()}")
        time.sleep(0.01)


def kill(worker: subprocess.Popen[bytes]) -> None:
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait(timeout=10) == -signal.SIGKILL


def test_a_killed_send_resumes_and_delivers_every_email_exactly_once(
    sending_db: SendingDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    add_users(sending_db.engine, users(800))
    assert compose_and_claim(sending_db) == 800
    log = tmp_path / "worker.log"
    # 0.3 s between accepting a batch and answering; the answer to batch 3 waits to be released.
    fake = SlowFakeResend(response_delay=0.3, hold_at_delivered=300)

    with serving(fake, monkeypatch):
        # Crash 1: batch 3 is accepted, the worker has not heard back, so has not recorded it.
        worker = start_worker(sending_db.url, log=log)
        wait_for(fake.holding.is_set, worker, log)
        kill(worker)
        fake.release.set()
        assert fake.delivered_count == 300
        assert statuses(sending_db.engine) == {"sent": 200, "claimed": 600}

        # Crash 2: somewhere after two more batches went out.
        worker = start_worker(sending_db.url, log=log)
        wait_for(lambda: fake.delivered_count >= 500, worker, log)
        kill(worker)
        assert statuses(sending_db.engine)["claimed"] > 0

        # The run the RetryPolicy would start: to completion.
        fake.response_delay = 0
        finished = subprocess.run(
            [
                sys.executable,
                "-m",
                "retention_pipeline_tests.sending.dispatch_worker",
                sending_db.url,
            ],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["still_pending"] == 0
    # Every email delivered exactly once, though batches were sent again after each crash.
    assert Counter(fake.delivered_to()) == Counter(f"user{n}@example.com" for n in range(800))
    # The second run began by re-sending batch 3 under its key, and was answered from the store.
    assert fake.requests[3].idempotency_key == fake.requests[2].idempotency_key
    assert fake.requests[3].replayed
    assert len({request.idempotency_key for request in fake.requests}) == 8
    assert statuses(sending_db.engine) == {"sent": 800}
    # Re-sent batches were answered from the idempotency store: the log has the first send's ids.
    delivered_ids = {email["to"][0]: email["id"] for email in fake.delivered}
    with sending_db.engine.connect() as connection:
        logged_ids = dict(
            connection.execute(
                text("SELECT email, provider_id FROM retention.email_send_log")
            ).all()
        )
    assert logged_ids == delivered_ids


def test_a_killed_dagster_send_run_is_run_again_and_delivers_every_email_exactly_once(
    sending_db: SendingDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same, through the real job: the run worker dies (SIGKILL) mid-send after claiming,
    and the run launched again composes, claims nothing twice and resends under the same keys."""
    # The job claims only days within the send window of today: yesterday's audience.
    day = datetime.now(UTC).date() - timedelta(days=1)
    add_users(sending_db.engine, users(500), day=day)
    config = write_config(tmp_path, sending_db.url, email={"unsubscribe_secret": "s3cret"})
    job = ["--job", str(config), day.isoformat()]
    log = tmp_path / "job.log"
    fake = SlowFakeResend(response_delay=0.3, hold_at_delivered=200)

    with serving(fake, monkeypatch):
        worker = start_worker(*job, log=log)
        wait_for(fake.holding.is_set, worker, log)
        kill(worker)
        fake.release.set()
        assert statuses(sending_db.engine) == {"sent": 100, "claimed": 400}

        fake.response_delay = 0
        finished = subprocess.run(
            [sys.executable, "-m", "retention_pipeline_tests.sending.dispatch_worker", *job],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )

    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads(finished.stdout.strip().splitlines()[-1]) == {"success": True}
    assert Counter(fake.delivered_to()) == Counter(f"user{n}@example.com" for n in range(500))
    assert statuses(sending_db.engine) == {"sent": 500}
