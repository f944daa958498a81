"""`database.read_url`: the snapshot reads the app's users and subscriptions from the replica, in
real Dagster runs, while the rollup and the pipeline's tables stay on the primary; a replica
without the mapped columns stops the run and `check` in one line naming it. The replica here is
a second database of the same server, which is not a standby: the server on this machine has
none, so the wait for a standby's replay is not exercised."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.cli import main
from retention_pipeline.defs.segments import engagement_segments, user_activity_snapshot
from retention_pipeline.demo import seed_demo
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config, write_config

END = datetime(2026, 11, 21, tzinfo=ZoneInfo("UTC"))
DAY = "2026-11-20"


@pytest.fixture
def primary_and_replica(create_database):
    """Two databases seeded alike; the pipeline installed on the first. On the second, the
    replica, user 5's email and plan differ, so a snapshot shows where it read them."""
    primary, replica = create_database(), create_database()
    for url in (primary, replica):
        engine = create_engine(url)
        with engine.begin() as connection:
            seed_demo(connection, users=60, days=60, seed=11, end=END)
        engine.dispose()
    engine = create_engine(primary)
    install(engine, make_config(primary))
    replica_engine = create_engine(replica)
    with replica_engine.begin() as connection:
        connection.execute(text("UPDATE users SET email = 'replica@example.com' WHERE id = 5"))
        connection.execute(
            text("""
                INSERT INTO subscriptions
                    (user_id, status, plan, amount_cents, billing_interval, updated_at)
                VALUES (5, 'active', 'replica-plan', 1000, 'month', now())""")
        )
    yield engine, replica_engine, primary, replica
    engine.dispose()
    replica_engine.dispose()


def materialize_day(config_path: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [user_activity_snapshot, engagement_segments],
        partition_key=DAY,
        resources={"app_database": AppDatabase(config_path=config_path)},
        raise_on_error=False,
    )


def snapshot_of_user_5(engine) -> tuple:
    with engine.connect() as connection:
        return connection.execute(
            text("""
                SELECT email, subscription_plan FROM retention.user_activity_snapshot
                WHERE partition_date = :day AND user_id = '5'"""),
            {"day": DAY},
        ).one()


def test_the_snapshot_reads_users_and_subscriptions_from_the_replica(primary_and_replica, tmp_path):
    engine, _, primary, replica = primary_and_replica
    config_path = str(write_config(tmp_path, primary, read_url=replica))
    result = materialize_day(config_path)
    assert result.success
    assert snapshot_of_user_5(engine) == ("replica@example.com", "replica-plan")
    (materialization,) = result.asset_materializations_for_node("retention__user_activity_snapshot")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["app_read_from"] == "the replica (not a standby: read as it is)"
    assert metadata["replica_rows/users"] == 60
    assert all(check.passed for check in result.get_asset_check_evaluations())
    assert main(["--config", config_path, "check"]) == 0

    # Without read_url the same day reads the primary again.
    primary_only = tmp_path / "primary-only"
    primary_only.mkdir()
    assert materialize_day(str(write_config(primary_only, primary))).success
    assert snapshot_of_user_5(engine)[0] != "replica@example.com"


def test_a_replica_without_a_mapped_column_stops_the_run_and_check(
    primary_and_replica, tmp_path, capsys
):
    engine, replica_engine, primary, replica = primary_and_replica
    with replica_engine.begin() as connection:
        connection.execute(text("ALTER TABLE subscriptions DROP COLUMN plan"))
    config_path = str(write_config(tmp_path, primary, read_url=replica))
    problem = (
        "database.read_url: database.tables.subscriptions.columns.plan: column 'plan' does not "
        "exist in public.subscriptions"
    )

    result = materialize_day(config_path)
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert problem in failure.step_failure_data.error.cause.message
    with engine.connect() as connection:
        assert not connection.execute(
            text("SELECT count(*) FROM retention.snapshot_builds WHERE partition_date = :day"),
            {"day": DAY},
        ).scalar_one()

    assert main(["--config", config_path, "check"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"error: {problem}") for line in errors), errors
