"""The snapshot and segment assets in real Dagster runs, and the 09:00 schedule across DST."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from dagster._utils.schedules import cron_string_iterator
from sqlalchemy import create_engine, text

from retention_pipeline.config import parse_config
from retention_pipeline.defs.schedules import build_daily_schedules, daily_retention_job
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import (
    SHIPPED_DOCUMENT,
    make_config,
    shipped_asset,
    write_config,
)

user_activity_snapshot = shipped_asset(SNAPSHOT)
engagement_segments = shipped_asset(SEGMENTS)

UTC = ZoneInfo("UTC")
DAILY_TABLES = ("user_activity_snapshot", "classified_segments")
END = datetime(2026, 11, 21, tzinfo=UTC)


@pytest.fixture
def database(app_database_url, tmp_path):
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (id, email, name, created_at) "
                "SELECT g, 'u' || g || '@example.com', "
                "'User ' || g, '2026-09-01' FROM generate_series(1, 12) AS g"
            )
        )
        # Users 1-2 went quiet 8 days before the 20th ends; 3-12 are active until the 18th.
        connection.execute(
            text(
                "INSERT INTO sessions (user_id, created_at) SELECT g, CAST(:end AS timestamptz) "
                "- interval '8 days' FROM generate_series(1, 2) AS g"
            ),
            {"end": END},
        )
        connection.execute(
            text(
                "INSERT INTO sessions (user_id, created_at) SELECT g, CAST(:end AS timestamptz) "
                "- interval '2 days 12 hours' FROM generate_series(3, 12) AS g"
            ),
            {"end": END},
        )
    install(engine, make_config(app_database_url))
    yield engine, AppDatabase(config_path=str(write_config(tmp_path, app_database_url)))
    engine.dispose()


def materialize_day(app_database: AppDatabase, key: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [user_activity_snapshot, engagement_segments],
        partition_key=key,
        resources={"app_database": app_database},
    )


def test_a_day_materializes_with_counts_preview_and_passing_checks(database):
    _engine, app_database = database
    result = materialize_day(app_database, "2026-11-20")
    assert result.success
    (snapshot,) = result.asset_materializations_for_node("retention__user_activity_snapshot")
    assert snapshot.metadata["dagster/row_count"].value == 12
    (segments,) = result.asset_materializations_for_node("retention__engagement_segments")
    assert segments.metadata["re_engagement/dormant"].value == 2
    assert segments.metadata["re_engagement/active"].value == 10
    assert "no activity for 8 days" in segments.metadata["preview"].value
    checks = {check.check_name: check.passed for check in result.get_asset_check_evaluations()}
    assert checks == {
        "reconciles_with_users": True,
        "no_user_vanished": True,
        "no_activity_after_partition_end": True,
        "one_segment_per_user": True,
        "plausible_dormant_flow": True,
    }


def partition_state(engine, table: str, day: str) -> tuple[float, int] | None:
    """(rows the planner's statistics expect, bytes on disk) of the day's partition; None when
    there is no such partition."""
    with engine.connect() as connection:
        return connection.execute(
            text("""
                SELECT reltuples, pg_relation_size(oid) FROM pg_class
                WHERE oid = to_regclass(:name)"""),
            {"name": f"retention.{table}_{day.replace('-', '')}"},
        ).first()


def test_a_day_is_rebuilt_in_its_own_partition_with_fresh_statistics(database):
    engine, app_database = database
    assert materialize_day(app_database, "2026-11-20").success
    first = {table: partition_state(engine, table, "2026-11-20") for table in DAILY_TABLES}
    # Rebuilt: the day's partition is emptied, not deleted from row by row, so it leaves no dead
    # rows behind (nothing would vacuum them here: autovacuum may be off).
    result = materialize_day(app_database, "2026-11-20")
    assert result.success
    for table in DAILY_TABLES:
        planned, size = partition_state(engine, table, "2026-11-20")
        # Analyzed as soon as written: the next step plans with the day's real size.
        assert planned == 12, table
        assert size == first[table][1], table
    (snapshot,) = result.asset_materializations_for_node("retention__user_activity_snapshot")
    assert snapshot.metadata["temp_bytes"].value >= 0
    assert snapshot.metadata["partitions_dropped"].value == 0


def test_days_older_than_keep_days_are_dropped(app_database_url, tmp_path):
    engine = create_engine(app_database_url)
    install(engine, make_config(app_database_url))
    app_database = AppDatabase(
        config_path=str(write_config(tmp_path, app_database_url, keep_days=35))
    )
    days = ("2026-10-10", "2026-10-16", "2026-11-19", "2026-11-20")
    for day in days:
        assert materialize_day(app_database, day).success
    for table in DAILY_TABLES:
        kept = [day for day in days if partition_state(engine, table, day) is not None]
        # Building the 19th drops what is more than 35 days older: the 10th, not the 16th.
        assert kept == ["2026-10-16", "2026-11-19", "2026-11-20"], table
    with engine.connect() as connection:
        read = connection.execute(
            text(
                "SELECT DISTINCT partition_date::text FROM retention.segment_rules_used ORDER BY 1"
            )
        ).scalars()
        assert list(read) == ["2026-10-16", "2026-11-19", "2026-11-20"]
    engine.dispose()


def test_a_backfill_is_one_run_that_builds_its_days_in_order(database):
    engine, app_database = database
    result = dg.materialize(
        [user_activity_snapshot, engagement_segments],
        resources={"app_database": app_database},
        tags={
            "dagster/asset_partition_range_start": "2026-11-17",
            "dagster/asset_partition_range_end": "2026-11-20",
        },
    )
    assert result.success
    with engine.connect() as connection:
        builds = connection.execute(
            text("SELECT partition_date::text, path FROM retention.snapshot_builds ORDER BY 1")
        ).all()
        segmented = connection.execute(
            text(
                "SELECT partition_date::text, count(*) FROM retention.engagement_segments "
                "GROUP BY 1 ORDER BY 1"
            )
        ).all()
    # Oldest first: each day after the first rolled the one before forward.
    assert [tuple(row) for row in builds] == [
        ("2026-11-17", "full"),
        ("2026-11-18", "incremental"),
        ("2026-11-19", "incremental"),
        ("2026-11-20", "incremental"),
    ]
    assert [tuple(row) for row in segmented] == [
        (day, 12) for day in ("2026-11-17", "2026-11-18", "2026-11-19", "2026-11-20")
    ]
    snapshots = result.asset_materializations_for_node("retention__user_activity_snapshot")
    assert sorted(m.partition for m in snapshots) == [
        "2026-11-17",
        "2026-11-18",
        "2026-11-19",
        "2026-11-20",
    ]
    for snapshot in snapshots:
        assert snapshot.metadata["days"].value == "2026-11-17 to 2026-11-20 (4 days, one run)"
        assert snapshot.metadata["dagster/row_count"].value == 12
    build_of = {m.partition: m.metadata["build"].value for m in snapshots}
    assert build_of == {day: path for day, path in builds}  # each day's own figures
    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert checks["one_segment_per_user"].passed
    assert checks["one_segment_per_user"].metadata["failing_days"].value == "none"


def test_a_jump_in_dormant_users_warns(database):
    _engine, app_database = database
    # At the end of the 24th users 3-12 have been away 6.5 days; at the end of the 25th, 7.5.
    assert materialize_day(app_database, "2026-11-24").success
    result = materialize_day(app_database, "2026-11-25")
    assert result.success
    check = next(
        check
        for check in result.get_asset_check_evaluations()
        if check.check_name == "plausible_dormant_flow"
    )
    assert check.passed is False
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["jumps"].text == "re_engagement: 2 -> 12"


def berlin_config():
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["loops"][0]["steps"][0]["trigger"]["timezone"] = "Europe/Berlin"
    return parse_config(document, environ={})


@pytest.mark.parametrize(
    ("tick", "partition"),
    [
        (datetime(2026, 3, 29, 9, tzinfo=ZoneInfo("Europe/Berlin")), "2026-03-28"),  # 23-hour day
        (datetime(2026, 3, 30, 9, tzinfo=ZoneInfo("Europe/Berlin")), "2026-03-29"),
        (datetime(2026, 10, 26, 9, tzinfo=ZoneInfo("Europe/Berlin")), "2026-10-25"),  # 25 hours
        (datetime(2026, 1, 1, 9, tzinfo=ZoneInfo("Europe/Berlin")), "2025-12-31"),
    ],
)
def test_the_schedule_runs_the_day_just_ended_in_the_loop_timezone(tick, partition):
    (schedule,) = build_daily_schedules(berlin_config(), daily_retention_job)
    request = schedule(dg.build_schedule_context(scheduled_execution_time=tick))
    assert request.partition_key == partition
    assert request.run_key == partition


def test_the_schedule_fires_at_nine_local_time_across_daylight_saving():
    (schedule,) = build_daily_schedules(berlin_config(), daily_retention_job)
    assert schedule.execution_timezone == "Europe/Berlin"
    start = datetime(2026, 3, 27, 12, tzinfo=UTC).timestamp()
    ticks = cron_string_iterator(start, schedule.cron_schedule, "Europe/Berlin")
    utc_hours = [next(ticks).astimezone(UTC) for _ in range(4)]
    assert [tick.day for tick in utc_hours] == [28, 29, 30, 31]
    assert [tick.hour for tick in utc_hours] == [8, 7, 7, 7]  # CET, then CEST
    assert all(tick.astimezone(ZoneInfo("Europe/Berlin")).hour == 9 for tick in utc_hours)
    assert (utc_hours[1] - utc_hours[0]) == timedelta(hours=23)


def test_a_user_deleted_from_the_app_is_reported_the_next_day(database):
    engine, app_database = database
    assert materialize_day(app_database, "2026-11-20").success
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM users WHERE id = 12"))
    result = materialize_day(app_database, "2026-11-21")
    check = next(
        check
        for check in result.get_asset_check_evaluations()
        if check.check_name == "no_user_vanished"
    )
    assert check.passed is False
    assert check.metadata["vanished_users"].value == 1
