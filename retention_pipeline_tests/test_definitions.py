"""The Dagster definitions load, validate with `dg check defs`, and the rollup asset runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import dagster as dg
from sqlalchemy import create_engine, text

from retention_pipeline.config.loader import project_root
from retention_pipeline.defs.activity import activity_rollup
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config, write_config


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
    assert rollup.parent_keys == {dg.AssetKey(["app", "events"]), dg.AssetKey(["app", "sessions"])}
    assert not graph.get(dg.AssetKey(["app", "events"])).is_materializable


def test_rollup_asset_reports_size_and_tracking_errors(app_database_url, tmp_path):
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (email, created_at) VALUES ('a@example.com', '2026-10-01')")
        )
        install(connection, make_config(app_database_url))
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "VALUES (1, 'x', '2026-11-20T10:00Z')"
            )
        )
        connection.execute(text("DROP TABLE retention.action_daily"))
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "VALUES (1, 'y', '2026-11-21T10:00Z')"
            )
        )
    engine.dispose()
    database = AppDatabase(config_path=str(write_config(tmp_path, app_database_url)))
    result = dg.materialize([activity_rollup], resources={"app_database": database})
    assert result.success
    (materialization,) = result.asset_materializations_for_node("retention__activity_rollup")
    assert materialization.metadata["dagster/row_count"].value == 1
    assert materialization.metadata["tracking_mode"].value == "triggers"
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["errors_last_24h"].value == 1


def test_rollup_asset_refuses_an_uninstalled_database(app_database_url, tmp_path):
    database = AppDatabase(config_path=str(write_config(tmp_path, app_database_url)))
    result = dg.materialize(
        [activity_rollup], resources={"app_database": database}, raise_on_error=False
    )
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "is at revision none, expected 0003: run `retention-pipeline db upgrade`" in message
