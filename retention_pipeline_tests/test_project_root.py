"""Dagster's own commands work from the project root of a fresh clone: the production instance
lives in deploy/, so nothing at the root makes them read its PostgreSQL storage settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import dagster_instance_config
from dagster_postgres import DagsterPostgresStorage

from retention_pipeline.config.loader import project_root

PRODUCTION_INSTANCE = project_root() / "deploy" / "dagster.yaml"
# What a deployment's environment holds (README, Deploying); the values are never used to connect.
STORAGE_VARIABLES = {
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "secret",
    "DAGSTER_PG_HOST": "db.internal",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_DB": "dagster",
}


def test_dg_check_defs_passes_from_the_project_root_without_dagster_home(tmp_path: Path):
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DAGSTER_HOME", "RETENTION_CONFIG", "RETENTION_DATABASE_URL")
        and not key.startswith("DAGSTER_PG_")
    }
    environment["RETENTION_HOME"] = str(tmp_path)  # no embedded server runs there
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dg"), "check", "defs"],
        cwd=project_root(),
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All definitions loaded successfully" in output
    assert "Traceback" not in output


def test_the_production_instance_lives_in_deploy_and_validates(monkeypatch: pytest.MonkeyPatch):
    assert not (project_root() / "dagster.yaml").exists()
    for name, value in STORAGE_VARIABLES.items():
        monkeypatch.setenv(name, value)

    config, custom_class = dagster_instance_config(str(PRODUCTION_INSTANCE.parent))

    assert custom_class is None
    storage = process_config(
        resolve_to_config_type(DagsterPostgresStorage.config_type()),
        config["storage"]["postgres"],
    )
    assert storage.success, storage.errors
    assert storage.value["postgres_db"]["hostname"] == "db.internal"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_monitoring"]["enabled"] is True


def test_installed_as_a_package_the_project_is_the_folder_the_command_starts_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from retention_pipeline.config import loader
    from retention_pipeline.database import embedded

    # `pip install .` puts the package in site-packages, with no pyproject.toml beside it.
    monkeypatch.setattr(loader, "SOURCE_ROOT", tmp_path / "site-packages")
    deployment = tmp_path / "srv" / "retention"
    deployment.mkdir(parents=True)
    monkeypatch.chdir(deployment)
    monkeypatch.delenv("RETENTION_CONFIG", raising=False)
    monkeypatch.delenv("RETENTION_HOME", raising=False)
    assert loader.project_root() == deployment
    assert loader.default_config_path() == deployment / "retention.yaml"
    assert embedded.retention_home() == deployment / ".retention"
    # A relative home is made absolute: Dagster refuses a relative DAGSTER_HOME under it.
    monkeypatch.setenv("RETENTION_HOME", "state")
    assert embedded.retention_home() == deployment / "state"
