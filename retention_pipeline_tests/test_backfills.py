"""A one-run backfill of past days with the shipped configuration: each day's audience is the
one that day's own run would have picked, and each day reports its own numbers."""

from __future__ import annotations

from datetime import date, timedelta

import dagster as dg
import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import daily_assets, make_config, write_config

DAYS = [date(2026, 11, 10) + timedelta(days=offset) for offset in range(4)]
SEGMENTS = dg.AssetKey(["retention", "engagement_segments"])
AUDIENCE = dg.AssetKey(["retention", "reengagement_audience"])


@pytest.fixture
def backfilled(app_database_url, tmp_path):
    """Twelve users, user k last seen on November 1 + k, and one run over DAYS of the snapshot,
    segments and audience with the shipped configuration (the seed's NOW() condition)."""
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (id, email, name, created_at) "
                "SELECT g, 'u' || g || '@example.com', 'User ' || g, '2026-09-01' "
                "FROM generate_series(1, 12) AS g"
            )
        )
        connection.execute(
            text(
                "INSERT INTO sessions (user_id, created_at) "
                "SELECT g, TIMESTAMPTZ '2026-11-01 12:00+00' + g * interval '1 day' "
                "FROM generate_series(1, 12) AS g"
            )
        )
    install(engine, make_config(app_database_url))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            daily_assets("user_activity_snapshot", "engagement_segments", "reengagement_audience"),
            instance=instance,
            resources={
                "app_database": AppDatabase(
                    config_path=str(write_config(tmp_path, app_database_url))
                )
            },
            tags={
                "dagster/asset_partition_range_start": DAYS[0].isoformat(),
                "dagster/asset_partition_range_end": DAYS[-1].isoformat(),
            },
        )
        assert result.success
        yield engine, instance
    engine.dispose()


def dormant_as_of(day: date) -> set[str]:
    """The users with no activity in the 7 days up to the end of `day`: user k was last seen on
    November 1 + k."""
    return {str(k) for k in range(1, 13) if date(2026, 11, 1 + k) < day - timedelta(days=6)}


def test_a_backfilled_days_audience_holds_only_users_dormant_as_of_that_day(backfilled):
    engine, _instance = backfilled
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT partition_date, user_id FROM retention.reengagement_audience")
        ).all()
    audience = {day: {user for on, user in rows if on == day} for day in DAYS}
    for day in DAYS:
        assert audience[day] <= dormant_as_of(day), day
    # Everyone dormant by a day entered on the day they became so: nobody missing, no one early.
    assert set().union(*audience.values()) == dormant_as_of(DAYS[-1]) == {"1", "2", "3", "4", "5"}
    assert audience[DAYS[0]] == dormant_as_of(DAYS[0]) == {"1", "2"}


def test_each_backfilled_day_reports_its_own_numbers(backfilled):
    _engine, instance = backfilled
    dormant_counts = {day.isoformat(): len(dormant_as_of(day)) for day in DAYS}
    for asset, key in (
        (SEGMENTS, "re_engagement/dormant"),
        (AUDIENCE, "re_engagement/candidates"),
    ):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset), limit=100
        ).records
        # One materialization per day, with that day's numbers: the UI plots one point per day.
        metadata = {
            record.partition_key: record.asset_materialization.metadata for record in records
        }
        assert len(records) == len(metadata) == len(DAYS), asset
        assert {day: m[key].value for day, m in metadata.items()} == dormant_counts, asset
        for day_metadata in metadata.values():
            assert day_metadata["days"].value == "2026-11-10 to 2026-11-13 (4 days, one run)"
            assert "per_day" not in day_metadata
