"""Exactly once in local time across a crash: the hourly send SIGKILLed in the middle of an hour's
sending, in a process of its own, the hour run again, then every hour of the days run again."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from retention_pipeline_tests.sending.local_time_support import (
    HOUR,
    ZONES,
    HourlyTicks,
    build_day,
    due_times,
    in_quiet_hours,
    local_time_config,
    local_time_document,
    people_in,
)
from retention_pipeline_tests.sending.support import (
    SendingDatabase,
    SlowFakeResend,
    User,
    serving,
    statuses,
)
from retention_pipeline_tests.sending.test_crash import PROJECT_ROOT, kill, start_worker, wait_for
from retention_pipeline_tests.sending.test_local_time import QUIET, QUIET_END, QUIET_START

DAY = date(2026, 11, 20)
BUILT_AT = datetime(2026, 11, 21, 9, 4, tzinfo=UTC)
# Tokyo's 09:00 after the build: midnight UTC.
TOKYO_HOUR = datetime(2026, 11, 22, 0, tzinfo=UTC)


def test_a_killed_hour_and_every_hour_run_again_send_each_member_once_in_their_hour(
    sending_db: SendingDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = local_time_config(sending_db.url, quiet_hours=QUIET)
    config_path = tmp_path / "retention.yaml"
    config_path.write_text(yaml.safe_dump(local_time_document(sending_db.url, quiet_hours=QUIET)))
    # Six batches due in Tokyo's hour, a few readers in every other zone.
    tokyo = [
        User(user_id=f"t{n:05d}", email=f"tokyo{n}@example.com", timezone="Asia/Tokyo")
        for n in range(600)
    ]
    people = [*people_in(ZONES, per_zone=5), *tokyo]
    build_day(sending_db, config, people, DAY, BUILT_AT)
    stored = due_times(sending_db, DAY)
    log = tmp_path / "worker.log"
    # The answer to the request that brings the deliveries to 200 waits to be released.
    fake = SlowFakeResend(response_delay=0.05, hold_at_delivered=200)

    with serving(fake, monkeypatch):
        ticks = HourlyTicks(sending_db, config, fake, DAY)
        first = BUILT_AT.replace(minute=0)
        hours = [first + n * HOUR for n in range(48)]
        for hour in hours:
            if hour != TOKYO_HOUR:
                ticks.run(hour)
                continue
            # Tokyo's hour, in a process of its own: killed with batch 2 accepted, unanswered.
            before = len(fake.delivered)
            worker = start_worker("--due", str(config_path), DAY.isoformat(), hour.isoformat(),
                                  log=log)  # fmt: skip
            wait_for(fake.holding.is_set, worker, log)
            kill(worker)
            fake.release.set()
            # The run had claimed Tokyo's 605 readers and confirmed its first batch.
            assert statuses(sending_db.engine)["claimed"] == 505
            for email in fake.delivered[before:]:
                ticks.sent_at.setdefault(email["to"][0], []).append(hour)
            # The hour run again, as the RetryPolicy would: the rest, under the same keys.
            fake.response_delay = 0
            again = subprocess.run(
                [sys.executable, "-m", "retention_pipeline_tests.sending.dispatch_worker",
                 "--due", str(config_path), DAY.isoformat(), hour.isoformat()],
                cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert again.returncode == 0, again.stderr[-2000:]
            # It claimed nothing new: the killed run had claimed the hour.
            assert json.loads(again.stdout.strip().splitlines()[-1]) == {"claimed": 0}
            for email in fake.delivered[before + 200 :]:
                ticks.sent_at.setdefault(email["to"][0], []).append(hour)
        # Every hour of the two days run again.
        requests = len(fake.requests)
        for hour in hours:
            ticks.run(hour)
        assert len(fake.requests) == requests

    # Every member once, nobody twice; Resend answered the resent batch from its store.
    assert Counter(fake.delivered_to()) == Counter(person.email for person in people)
    assert any(request.replayed for request in fake.requests)
    assert statuses(sending_db.engine) == {"sent": len(people)}
    # Nobody outside the hour after their 09:00, nor in their quiet hours.
    for address, (due_at, zone) in stored.items():
        (sent_at,) = ticks.sent_at[address]
        assert timedelta(0) <= sent_at - due_at < HOUR, (address, zone, due_at, sent_at)
        assert not in_quiet_hours(sent_at, zone, QUIET_START, QUIET_END)
