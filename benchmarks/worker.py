"""The process that runs a benchmark's materializations and SQL steps, so that its peak RSS is
theirs alone: `python -m benchmarks.worker PLAN RESULTS` reads a list of steps (JSON), runs them
in order and writes one result per step (JSON). RETENTION_CONFIG must name a configuration whose
start_date precedes every day of the plan: the daily partitions are built from it.

A step is a Dagster materialization of `assets` over `days` (in order, as the defs allow a
backfill to run: see `backfill`), one SQL statement (`sql`, with `parameters`), or a morning's
history or critical path (`critical_path`: see `benchmarks.bench_critical_path`). Around each,
the scratch database's `pg_stat_database.temp_bytes` is read; the step's connections are closed
first, since a backend reports its temp files only when idle for a while or when it exits.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import dagster as dg
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from benchmarks.bench_critical_path import run_critical_path, run_history
from retention_pipeline.database.batch import tune_for_batch
from retention_pipeline.defs.partitions import daily_partitions
from retention_pipeline.defs.segments import build_segment_assets
from retention_pipeline.resources.app_database import AppDatabase

ASSET_NAMES = ("snapshot", "segments")  # in the order build_segment_assets returns them
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


@dataclass
class StepResult:
    label: str
    seconds: float
    """Wall time of the whole step, Dagster's run start-up included."""
    step_seconds: float
    """For materializations, the sum of the Dagster steps' own durations; else `seconds`."""
    temp_bytes: int
    runs: int = 0
    builds: list[str] = field(default_factory=list)
    """The snapshot's `build` metadata (full or incremental) of each day materialized."""
    parts: dict[str, float] = field(default_factory=dict)
    """For a critical path, its figures (`bench_critical_path.run_critical_path`)."""


def backfill(
    assets: Sequence[dg.AssetsDefinition],
    days: Sequence[str],
    app_database: AppDatabase,
    instance: dg.DagsterInstance,
) -> list[dg.ExecuteInProcessResult]:
    """Materialize `assets` over `days`, ascending, the way the assets' BackfillPolicy has a
    backfill run them: one run per day without a policy, runs of at most
    `max_partitions_per_run` days with one (None: a single run over the whole range)."""
    policy = assets[0].backfill_policy
    if policy is None or len(days) == 1:
        chunks = [[day] for day in days]
    else:
        size = policy.max_partitions_per_run or len(days)
        chunks = [list(days[start : start + size]) for start in range(0, len(days), size)]
    results = []
    for chunk in chunks:
        if len(chunk) == 1:
            arguments = {"partition_key": chunk[0]}
        else:
            arguments = {"tags": {RANGE_START_TAG: chunk[0], RANGE_END_TAG: chunk[-1]}}
        results.append(
            dg.materialize(
                assets, instance=instance, resources={"app_database": app_database}, **arguments
            )
        )
    return results


def temp_bytes(monitor: Connection) -> int:
    """The database's temp bytes once every other backend of it (the step's) has exited."""
    monitor.execute(
        text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        others = monitor.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
        if not others:
            break
        time.sleep(0.05)
    monitor.execute(text("SELECT pg_stat_clear_snapshot()"))
    return monitor.execute(
        text("SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database()")
    ).scalar_one()


def run_materialization(step: dict, instance: dg.DagsterInstance) -> StepResult:
    # A fresh resource per step: its engine's connections are the step's, closed after it.
    app_database = AppDatabase(config_path=step["config"])
    built = dict(
        zip(ASSET_NAMES, build_segment_assets(daily_partitions(app_database.config)), strict=True)
    )
    assets = [built[name] for name in step["assets"]]
    started = time.perf_counter()
    results = backfill(assets, step["days"], app_database, instance)
    seconds = time.perf_counter() - started
    step_seconds, builds = 0.0, []
    for result in results:
        if not result.success:
            raise RuntimeError(f"{step['label']}: the run failed")
        for stats in instance.get_run_step_stats(result.run_id):
            step_seconds += stats.end_time - stats.start_time
        for materialization in result.asset_materializations_for_node(
            "retention__user_activity_snapshot"
        ):
            builds.append(materialization.metadata["build"].value)
    return StepResult(step["label"], seconds, step_seconds, 0, len(results), builds)


def run_morning(step: dict, instance: dg.DagsterInstance) -> StepResult:
    """A morning's history (`parts` holds only `app rows`), or the morning itself."""
    plan = step["critical_path"]
    day = date.fromisoformat(plan["day"])
    started = time.perf_counter()
    if "history_days" in plan:
        history = [day - timedelta(days=n) for n in range(plan["history_days"], 0, -1)]
        capture_end = datetime.fromisoformat(plan["capture_end"])
        app_rows = run_history(step["config"], history, capture_end, instance)
        seconds = time.perf_counter() - started
        return StepResult(step["label"], seconds, seconds, 0, parts={"app rows": app_rows})
    parts = run_critical_path(step["config"], day, instance)
    seconds = time.perf_counter() - started
    return StepResult(step["label"], seconds, parts["total"], 0, parts=parts)


def run_sql(step: dict) -> StepResult:
    engine = create_engine(step["url"], poolclass=NullPool)
    try:
        with engine.begin() as connection:
            for statement in step.get("before", []):
                connection.execute(text(statement))
            # Measured as the pipeline runs its own statements.
            tune_for_batch(connection)
            started = time.perf_counter()
            connection.execute(text(step["sql"]), step["parameters"])
            seconds = time.perf_counter() - started
    finally:
        engine.dispose()
    return StepResult(step["label"], seconds, seconds, 0)


def main(plan_path: str, results_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    instance = dg.DagsterInstance.ephemeral()
    monitors: dict[str, Connection] = {}
    results = []
    for step in plan:
        if step["url"] not in monitors:
            engine = create_engine(step["url"], poolclass=NullPool, isolation_level="AUTOCOMMIT")
            monitors[step["url"]] = engine.connect()
        monitor = monitors[step["url"]]
        before = temp_bytes(monitor)
        if "sql" in step:
            result = run_sql(step)
        elif "critical_path" in step:
            result = run_morning(step, instance)
        else:
            result = run_materialization(step, instance)
        result.temp_bytes = temp_bytes(monitor) - before
        results.append(asdict(result))
        print(
            f"    {result.label}: {result.seconds:.2f} s, temp {result.temp_bytes / 2**20:.1f} MiB"
            + "".join(f", {n} {build}" for build, n in Counter(result.builds).items()),
            flush=True,
        )
    for monitor in monitors.values():
        monitor.close()
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
