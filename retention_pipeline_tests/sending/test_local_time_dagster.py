"""Local-time delivery through Dagster: the hourly schedule of a loop sending at a local time, and
a real run of its send job at the real hour, with the per-hour metadata it reports."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml

from retention_pipeline.config import parse_config
from retention_pipeline.defs import build_definitions
from retention_pipeline.defs.sending import SEND_LOG, send_job_name, send_partition_key
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import ResendEmail
from retention_pipeline_tests.helpers import TEST_EMAIL_IDENTITY, shipped_definitions
from retention_pipeline_tests.sending.local_time_support import (
    ZONES,
    build_day,
    due_times,
    local_time_document,
    people_in,
)
from retention_pipeline_tests.sending.support import (
    API_KEY,
    FROM,
    LOOP,
    SECRET,
    SendingDatabase,
)
from retention_pipeline_tests.sending.test_local_time import QUIET


def test_the_hourly_schedule_launches_a_run_per_shard_of_each_loop_with_due_times() -> None:
    document = local_time_document("postgresql://db.invalid/app")
    document["email"]["send_shards"] = 2
    definitions = build_definitions(parse_config(document, environ={}))
    schedule = definitions.resolve_schedule_def(f"send_{LOOP}_hourly")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 * * * *", "UTC")
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=datetime(2026, 11, 22, 0, tzinfo=UTC),
            repository_def=definitions.get_repository_def(),
        )
        requests = schedule.evaluate_tick(context).run_requests or []
    # The run is named for the day just ended in the loops' timezone (UTC): the 21st.
    assert [(request.partition_key, request.run_key) for request in requests] == [
        ("2026-11-21|0", "2026-11-22T00:0"),
        ("2026-11-21|1", "2026-11-22T00:1"),
    ]
    assert {request.tags["retention/send_hour"] for request in requests} == {"2026-11-22T00:00Z"}

    # A loop sending right after its run has no hourly schedule.
    assert [each.name for each in shipped_definitions().schedules or ()] == [
        "drain_activity_hourly",
        "daily_retention_schedule",
    ]


def test_a_send_run_at_the_real_hour_sends_the_members_due_and_reports_each_hour(
    sending_db: SendingDatabase, fake_resend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = local_time_document(sending_db.url, quiet_hours=QUIET)
    document["email"].update(TEST_EMAIL_IDENTITY, unsubscribe_secret=SECRET)
    config_path = tmp_path / "retention.yaml"
    config_path.write_text(yaml.safe_dump(document))
    config = parse_config(document, environ={})
    # Built 12 hours ago: some readers' 09:00 has come since, the others' is still ahead (no
    # two of the zones' 09:00s are 5 hours apart, so both halves of the day hold some).
    built_at = datetime.now(UTC) - timedelta(hours=12)
    day = built_at.date() - timedelta(days=1)
    people = people_in(ZONES, per_zone=2)
    build_day(sending_db, config, people, day, built_at)
    started = datetime.now(UTC)

    job = build_definitions(config).resolve_job_def(send_job_name(LOOP))
    result = job.execute_in_process(
        partition_key=send_partition_key(day.isoformat(), 0),
        resources={
            "app_database": AppDatabase(config_path=str(config_path)),
            "email": ResendEmail(api_key=API_KEY, from_address=FROM, requests_per_second=1000),
        },
    )
    assert result.success

    stored = due_times(sending_db, day)
    due = {address for address, (due_at, _zone) in stored.items() if due_at <= started}
    waiting = len(stored) - len(due)
    assert due and waiting  # the run is a fair test of both
    # 09:00 is never in quiet hours, and nobody is stale 12 hours after the build: everyone due
    # went out, once; nobody else did.
    assert Counter(fake_resend.delivered_to()) == Counter(due)
    (materialization,) = [
        event.step_materialization_data.materialization
        for event in result.all_events
        if event.is_step_materialization
        and event.step_materialization_data.materialization.asset_key == SEND_LOG
        and event.step_materialization_data.materialization.partition == day.isoformat()
    ]
    metadata = materialization.metadata
    assert metadata["sent_this_run"].value == len(due)
    assert metadata["re_engagement/due/waiting"].value == waiting
    table = metadata["re_engagement/due/hours"]
    assert isinstance(table, dg.MarkdownMetadataValue)
    rows = [line.split(" | ") for line in table.value.splitlines()[2:]]
    assert sum(int(row[1]) for row in rows) == len(due)  # sent, by hour of due time
    assert sum(int(row[4]) for row in rows) == waiting
    # The hours are UTC, as the header says; a reader's hour is their own 09:00.
    tokyo = next(a for a, (_due, zone) in stored.items() if zone == "Asia/Tokyo")
    assert stored[tokyo][0].astimezone(ZoneInfo("Asia/Tokyo")).hour == 9
