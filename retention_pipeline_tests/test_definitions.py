"""The Dagster definitions load, validate with `dg check defs`, and the rollup asset runs."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError

from retention_pipeline.cli import main
from retention_pipeline.config.loader import project_root
from retention_pipeline.database.connection import create_app_engine
from retention_pipeline.database.migrate import head_revision
from retention_pipeline.defs import build_definitions
from retention_pipeline.defs.partitions import START_DATE_ENV_VAR
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.defs.tracking import activity_rollup, rollup_reconciles_with_app_tables
from retention_pipeline.email.message import OutgoingEmail
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import OutboxEmail
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import (
    insert_sent_email,
    make_config,
    shipped_asset,
    write_config,
)

HEAD = head_revision()
# Nothing listens there: a database that is down.
DOWN = "postgresql://app@127.0.0.1:1/app"
user_activity_snapshot = shipped_asset(SNAPSHOT)
engagement_segments = shipped_asset(SEGMENTS)


def test_dg_check_defs_passes(tmp_path: Path):
    environment = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [str(Path(os.sys.executable).parent / "dg"), "check", "defs"],
        cwd=project_root(),
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully" in result.stdout + result.stderr


def test_app_tables_are_external_assets_upstream_of_the_rollup():
    from retention_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    rollup = graph.get(dg.AssetKey(["retention", "activity_rollup"]))
    assert rollup.parent_keys == {
        dg.AssetKey(["app", "activity", "events"]),
        dg.AssetKey(["app", "activity", "sessions"]),
        dg.AssetKey(["app", "users"]),
    }
    assert not graph.get(dg.AssetKey(["app", "activity", "events"])).is_materializable
    snapshot = graph.get(dg.AssetKey(["retention", "user_activity_snapshot"]))
    assert {dg.AssetKey(["app", "users"]), dg.AssetKey(["app", "subscriptions"])} <= (
        snapshot.parent_keys
    )


def test_each_activity_source_is_an_app_asset_and_an_app_that_bills_nothing_has_none(tmp_path):
    config = make_config(
        "postgresql://postgres@127.0.0.1:5432/unused",
        tables={
            "users": {
                "table": "users",
                "columns": {"id": "id", "email": "email", "created_at": "created_at"},
            }
        },
        activity=[
            {
                "name": "session_refreshes",
                "table": "Session",
                "user": "userId",
                "at": "updatedAt",
                "login": True,
                "capture": "updates",
            },
            # A last-seen column of the users table itself: a source named `users`.
            {
                "table": "users",
                "user": "id",
                "at": "lastActiveAt",
                "login": True,
                "capture": "updates",
            },
        ],
    )
    graph = build_definitions(config).resolve_asset_graph()
    rollup = graph.get(dg.AssetKey(["retention", "activity_rollup"]))
    assert rollup.parent_keys == {
        dg.AssetKey(["app", "activity", "session_refreshes"]),
        dg.AssetKey(["app", "activity", "users"]),
        dg.AssetKey(["app", "users"]),
    }
    source = graph.get(dg.AssetKey(["app", "activity", "session_refreshes"]))
    assert "updates in place" in (source.description or "")
    assert not graph.has(dg.AssetKey(["app", "subscriptions"]))
    snapshot = graph.get(dg.AssetKey(["retention", "user_activity_snapshot"]))
    assert dg.AssetKey(["app", "subscriptions"]) not in snapshot.parent_keys


def test_the_daily_job_drains_before_the_snapshot_and_a_schedule_drains_hourly():
    from retention_pipeline.definitions import defs

    job = defs.resolve_job_def("daily_retention")
    assert dg.AssetKey(["retention", "activity_rollup"]) in job.asset_layer.executable_asset_keys
    schedule = defs.resolve_schedule_def("drain_activity_hourly")
    assert schedule.cron_schedule == "30 * * * *"
    assert schedule.job_name == "drain_activity"
    # The reconciliation reads a whole day of every source for the last complete day: once a
    # day, in the daily run, not with each hourly drain.
    reconciliation = dg.AssetCheckKey(
        dg.AssetKey(["retention", "activity_rollup"]), "reconciles_with_app_tables"
    )
    assert reconciliation in job.asset_layer.asset_graph.asset_check_keys
    drain = defs.resolve_job_def("drain_activity")
    assert reconciliation not in drain.asset_layer.asset_graph.asset_check_keys


def test_rollup_asset_folds_the_capture_and_reconciles_the_last_day(app_database_url, tmp_path):
    engine = create_engine(app_database_url)
    yesterday_noon = "date_trunc('day', now() AT TIME ZONE 'UTC') - interval '12 hours'"
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (email, created_at) VALUES ('a@example.com', '2026-10-01')")
        )
    install(engine, make_config(app_database_url))
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                f"SELECT 1, 'x', ({yesterday_noon}) AT TIME ZONE 'UTC' FROM generate_series(1, 3)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO sessions (user_id, created_at) "
                f"VALUES (1, ({yesterday_noon}) AT TIME ZONE 'UTC')"
            )
        )
    database = AppDatabase(config_path=str(write_config(tmp_path, app_database_url)))
    resources = {
        "app_database": database,
        "email": OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@acme.test"),
    }
    result = dg.materialize(
        [activity_rollup, rollup_reconciles_with_app_tables], resources=resources
    )
    (materialization,) = result.asset_materializations_for_node("retention__activity_rollup")
    assert materialization.metadata["dagster/row_count"].value == 1
    assert materialization.metadata["users_on_last_day"].value == 1
    assert materialization.metadata["last_day"].value == materialization.metadata["first_day"].value
    assert materialization.metadata["folded_events"].value == 3
    assert materialization.metadata["folded_sessions"].value == 1
    assert materialization.metadata["tracking_mode"].value == "triggers"
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    assert check.metadata["app_events"].value == check.metadata["tracked_events"].value == 3
    assert check.metadata["counted_rows/events"].value == check.metadata["app_rows/events"].value

    # A rollup that lost a count no longer reconciles.
    with engine.begin() as connection:
        connection.execute(text("UPDATE retention.activity_daily SET event_count = 2"))
    engine.dispose()
    result = dg.materialize(
        [activity_rollup, rollup_reconciles_with_app_tables], resources=resources
    )
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert (check.metadata["app_events"].value, check.metadata["tracked_events"].value) == (3, 2)


def test_rollup_asset_refuses_an_uninstalled_database(app_database_url, tmp_path):
    database = AppDatabase(config_path=str(write_config(tmp_path, app_database_url)))
    result = dg.materialize(
        [activity_rollup],
        resources={
            "app_database": database,
            "email": OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@acme.test"),
        },
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    message = failure.step_failure_data.error.message
    assert f"is at revision none, expected {HEAD}: run `retention-pipeline db upgrade`" in message


def test_the_rollup_asset_erases_deleted_users_and_their_outbox_files(app_database_url, tmp_path):
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (id, email, created_at) VALUES "
                "(1, 'a@example.com', '2026-10-01'), (2, 'b@example.com', '2026-10-01')"
            )
        )
    install(engine, make_config(app_database_url))
    insert_sent_email(engine, "1", "key-1")
    insert_sent_email(engine, "2", "key-2")
    outbox = OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@acme.test")
    outbox.sender().send(
        [
            OutgoingEmail(key=key, to="x@example.com", subject="s", html="<p>h</p>", text="t")
            for key in ("key-1", "key-2")
        ]
    )
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM users WHERE id = 1"))
    engine.dispose()
    database = AppDatabase(config_path=str(write_config(tmp_path, app_database_url)))
    result = dg.materialize(
        [activity_rollup], resources={"app_database": database, "email": outbox}
    )
    (materialization,) = result.asset_materializations_for_node("retention__activity_rollup")
    assert materialization.metadata["erased_users"].value == 1
    assert materialization.metadata["erased_outbox_files"].value == 2
    assert sorted(path.name[:5] for path in (tmp_path / "outbox").iterdir()) == ["key-2", "key-2"]


def test_the_daily_assets_refuse_a_half_rebuilt_rollup(app_database_url, tmp_path):
    engine = create_engine(app_database_url)
    install(engine, make_config(app_database_url))
    with engine.begin() as connection:
        connection.execute(text("UPDATE retention.tracking_state SET rebuild_pending = true"))
    engine.dispose()
    database = AppDatabase(config_path=str(write_config(tmp_path, app_database_url)))
    with pytest.raises(dg.Failure, match=r"being rebuilt .*run it again if it stopped"):
        database.ensure_installed()


def test_every_daily_asset_retries_a_transient_failure(app_database_url, tmp_path, monkeypatch):
    """A database that drops the connection at 09:00 does not leave the day unbuilt: each daily
    asset retries (here without the shipped minute's delay), rebuilding its day whole."""
    from dagster._core.definitions.dependency import NodeHandle
    from sqlalchemy.exc import OperationalError

    from retention_pipeline.config import load_config
    from retention_pipeline.definitions import defs
    from retention_pipeline.defs import segments
    from retention_pipeline.defs.partitions import daily_partitions
    from retention_pipeline.defs.retries import DAILY_ASSET_RETRIES

    daily_job = defs.resolve_job_def("daily_retention")
    assets = daily_job.asset_layer.executable_asset_keys
    assert len(assets) == 6
    for key in assets:
        node = NodeHandle("__".join(key.path), None)
        assert daily_job.get_retry_policy_for_handle(node) == DAILY_ASSET_RETRIES, key

    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (id, email, created_at) VALUES (1, 'a@example.com', now())")
        )
    install(engine, make_config(app_database_url))
    engine.dispose()
    config_path = write_config(tmp_path, app_database_url)
    monkeypatch.setattr(segments, "DAILY_ASSET_RETRIES", dg.RetryPolicy(max_retries=1))
    snapshot, _ = segments.build_segment_assets(daily_partitions(load_config(config_path)))
    built = segments._snapshot_day
    attempts = []

    def connection_lost_once(context, app_database, day):
        attempts.append(day)
        if len(attempts) == 1:
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        return built(context, app_database, day)

    monkeypatch.setattr(segments, "_snapshot_day", connection_lost_once)
    result = dg.materialize(
        [snapshot],
        partition_key="2026-11-20",
        resources={"app_database": AppDatabase(config_path=str(config_path))},
    )
    assert result.success and len(attempts) == 2
    assert result.asset_materializations_for_node("retention__user_activity_snapshot")


def test_a_failing_integrity_check_keeps_the_snapshot_from_the_segments(app_database_url, tmp_path):
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (id, email, created_at) "
                "VALUES (1, 'a@example.com', '2026-11-01')"
            )
        )
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (1, '2026-11-19 12:00+00')")
        )
    install(engine, make_config(app_database_url))
    # A rollup that claims activity after the day's end: the snapshot of the 20th leaks it.
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE retention.activity_daily SET last_session_at = '2100-01-01'")
        )
    engine.dispose()
    database = AppDatabase(config_path=str(write_config(tmp_path, app_database_url)))
    result = dg.materialize(
        [user_activity_snapshot, engagement_segments],
        partition_key="2026-11-20",
        resources={"app_database": database},
        raise_on_error=False,
    )
    checks = {check.check_name: check.passed for check in result.get_asset_check_evaluations()}
    assert checks["no_activity_after_partition_end"] is False
    assert checks["reconciles_with_users"] is True
    assert result.asset_materializations_for_node("retention__user_activity_snapshot")
    assert not result.asset_materializations_for_node("retention__engagement_segments")
    assert not result.success


def test_the_shipped_instance_retries_only_crashed_runs_and_ends_dead_ones():
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_postgres import DagsterPostgresStorage

    # Validated against Dagster's instance schema: an unknown or mistyped key raises here.
    settings, _ = dagster_instance_config(str(project_root() / "deploy"))
    storage = validate_config(DagsterPostgresStorage.config_type(), settings["storage"]["postgres"])
    assert storage.success, storage.errors
    assert settings["run_retries"] == {
        "enabled": True,
        "max_retries": 3,
        "retry_on_asset_or_op_failure": False,
    }
    monitoring = settings["run_monitoring"]
    assert monitoring["enabled"] is True
    assert monitoring["start_timeout_seconds"] == monitoring["cancel_timeout_seconds"] == 180
    assert monitoring["max_runtime_seconds"] == 3 * 3600
    # The default run launcher cannot resume a run: a dead one is failed, not resumed.
    assert monitoring["max_resume_run_attempts"] == 0


def load_definitions(
    config: Path, program: str, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `program` in a fresh Python, loading the definitions as a code location does."""
    environment = {key: value for key, value in os.environ.items() if key != START_DATE_ENV_VAR}
    return subprocess.run(
        [sys.executable, "-c", program],
        env={**environment, "RETENTION_CONFIG": str(config), **(environ or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


FIRST_PARTITION = (
    "from retention_pipeline.definitions import defs; "
    "print(defs.resolve_job_def('daily_retention').partitions_def.get_first_partition_key())"
)


def without_start_date(config: Path) -> Path:
    config.write_text(
        "\n".join(line for line in config.read_text().splitlines() if "start_date" not in line)
    )
    return config


def test_the_definitions_read_retention_config_and_start_at_its_start_date(tmp_path):
    config = write_config(tmp_path, DOWN)
    config.write_text(
        config.read_text().replace("start_date: 2026-08-01", "start_date: 2026-10-01")
    )
    result = load_definitions(config, FIRST_PARTITION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2026-10-01"


def test_without_start_date_the_definitions_load_while_the_database_is_down(tmp_path):
    config = without_start_date(write_config(tmp_path, DOWN))

    # The day `dev` passes, from the database it prepared: nothing is read at load.
    passed = load_definitions(config, FIRST_PARTITION, {START_DATE_ENV_VAR: "2026-03-02"})
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.strip() == "2026-03-02"

    # Neither set: one line naming start_date, and still no attempt to reach the database.
    missing = load_definitions(config, FIRST_PARTITION)
    assert missing.returncode != 0
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "start_date: not set: add `start_date: YYYY-MM-DD` to the configuration, the first day "
            "snapshots and emails are made for (`retention-pipeline db upgrade` and "
            "`retention-pipeline check` print the first day with data)"
        )
    )


def test_loading_the_definitions_reads_the_configuration_once(tmp_path):
    config = write_config(tmp_path, DOWN)
    # The audit hook sees every open of the file, however it is read. The app database resource
    # the assets get holds the configuration the definitions loaded: using it reads nothing.
    program = f"""
import sys
import dagster as dg
reads = []
sys.addaudithook(
    lambda event, args: event == "open" and args[0] == {str(config)!r} and reads.append(args)
)
from retention_pipeline.definitions import defs
with dg.build_resources({{"app_database": defs.resources["app_database"]}}) as resources:
    assert resources.app_database.config.database.url == {DOWN!r}
print(len(reads))
"""
    result = load_definitions(config, program)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_check_and_db_upgrade_print_the_start_date_line_to_add(app_database_url, tmp_path, capsys):
    config = str(without_start_date(write_config(tmp_path, app_database_url)))
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (id, email, created_at) VALUES ('1', 'a@example.com', "
                "'2026-02-01'), ('2', 'b@example.com', '2026-03-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO sessions (user_id, created_at) VALUES "
                "('2', '2026-03-05 10:00+00'), ('1', '2026-03-02 23:30+00')"
            )
        )
    line = (
        "start_date: not set: add `start_date: 2026-03-02` to the configuration (the first day "
        "with data), or the first day snapshots and emails are made for"
    )
    assert main(["--config", config, "db", "upgrade"]) == 0
    assert line in capsys.readouterr().out.splitlines()
    assert main(["--config", config, "check"]) == 2
    assert f"error: {line}" in capsys.readouterr().err.splitlines()

    # Later installs keep the first day with data, even once that history is gone.
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM users WHERE id = '1'"))
    assert install(engine, make_config(app_database_url)).first_data_day == date(2026, 3, 2)
    engine.dispose()


def test_a_failed_statement_names_no_address_it_was_given(app_database_url):
    # A step's error, message and all, goes into Dagster's event log.
    engine = create_app_engine(app_database_url)
    with pytest.raises(ProgrammingError) as failed, engine.connect() as connection:
        connection.execute(
            text("INSERT INTO no_such_table (email) VALUES (:email)"), {"email": "ann@example.com"}
        )
    engine.dispose()
    assert 'relation "no_such_table" does not exist' in str(failed.value)
    assert "ann@example.com" not in str(failed.value)
