"""`python -m benchmarks run`: every figure of the issue's benchmark in one command, written to a
Markdown file (see the README's Benchmarks section for what each figure means).

For each data shape it seeds a scratch database with the demo generator, installs the pipeline
(rollup rebuilt from the app tables, no ANALYZE of its tables: statistics lag as they do on a
first day or in a backfill; the server's autovacuum is expected off), and measures in child
processes (benchmarks.worker, whose peak RSS is read when it exits) real Dagster materializations
of the assets, against one SQL statement the bare way and the naive way. Ratios are computed
repeat by repeat from figures taken next to each other, then summarized as median/min/max.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from tempfile import TemporaryDirectory
from zoneinfo import ZoneInfo

import dagster as dg
import yaml
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from benchmarks import bench_audience, bench_sources, figures
from benchmarks.bench_capture import median_ratio, run_load
from benchmarks.bench_critical_path import (
    BESIDE_STEPS,
    HISTORY_DAYS,
    PARTS,
    history_step,
    morning_step,
    write_critical_path_config,
)
from benchmarks.bench_sending import make_emails, measure
from retention_pipeline.config.loader import project_root
from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.demo import DemoSummary, seed_demo
from retention_pipeline.segments.snapshot.statement import snapshot_parameters
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config, write_config

HISTORIES = (60, 120, 180)
BACKFILL_DAYS = 30
GIB = 2**30
MB = 10**6
THROTTLED_REQUESTS_PER_SECOND = 2.0
MORNING_SECONDS = 60  # the target from the daily run's start to the first email, 1M users wide
AUDIENCE_GROWTH = 11.0  # the most the audience step may grow for 10x the users
AUDIENCE_OF_SNAPSHOT = 0.5  # the most the audience step may take of the snapshot step's time
# Below this the audience benchmark's history has too few episodes of each kind to mean much.
AUDIENCE_SMALLEST = 1000
CAPTURE_LOADS = (
    ("one multi-row INSERT per transaction", "multirow"),
    ("ORM-style transactions (1-10 event INSERTs + a session)", "orm"),
)


@dataclass(frozen=True)
class Shape:
    name: str
    days: int
    events_per_slot: int
    description: str


SHAPES = {
    "wide": Shape("wide", 90, 1, "90 days, about 3 events per active user-day"),
    "deep": Shape("deep", 90, 11, "90 days, about 30 events per active user-day"),
}


@dataclass(frozen=True)
class Options:
    users: int
    shapes: Sequence[str]
    repeats: int
    server_url: str
    output: Path
    growth_users: int
    capture_seconds: float
    emails: int
    sources: bool = True


# --- scratch databases -----------------------------------------------------------------------


class ScratchServer:
    """Databases created on the server for one run, dropped when it ends."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
        self.names: list[str] = []

    def _quote(self, name: str) -> str:
        return self.admin.dialect.identifier_preparer.quote(name)

    def url(self, name: str) -> str:
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    def create(self, label: str, template: str | None = None) -> str:
        """A new database, empty or a copy of `template`'s (which nothing may be connected to)."""
        name = f"bench_{label}_{uuid.uuid4().hex[:6]}"
        with self.admin.connect() as connection:
            copy = ""
            if template:
                copy = f" TEMPLATE {self._quote(make_url(template).database)}"
                # From PostgreSQL 15 a copy goes page by page through the WAL unless told to
                # copy the files (24 GB at a million users: under a minute).
                if connection.dialect.server_version_info >= (15,):
                    copy += " STRATEGY FILE_COPY"
            connection.execute(text(f"CREATE DATABASE {self._quote(name)}{copy}"))
        self.names.append(name)
        return self.url(name)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self.admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {self._quote(name)} WITH (FORCE)"))
        self.names.remove(name)

    def drop_all(self) -> None:
        for name in list(self.names):
            self.drop(self.url(name))
        self.admin.dispose()


@dataclass
class Database:
    url: str
    config: RetentionConfig
    config_path: Path
    summary: DemoSummary
    seed_seconds: float
    install_seconds: float
    rollup_rows: int
    plain_copy: str | None = None
    """The same app data without the pipeline, for the capture's side-by-side loads."""


def build_database(
    server: ScratchServer,
    shape: Shape,
    users: int,
    days: int,
    end: datetime,
    workdir: Path,
    *,
    with_plain_copy: bool = False,
) -> Database:
    """Seed, optionally copy before installing, install; write a configuration for the runs."""
    url = server.create(f"{shape.name}_{days}d")
    engine = create_engine(url)
    started = time.perf_counter()
    with engine.begin() as connection:
        summary = seed_demo(
            connection,
            users=users,
            days=days,
            seed=42,
            end=end,
            events_per_slot=shape.events_per_slot,
        )
    seed_seconds = time.perf_counter() - started
    engine.dispose()
    plain = server.create(f"{shape.name}_plain", template=url) if with_plain_copy else None
    config = make_config(url)
    engine = create_engine(url)
    started = time.perf_counter()
    report = install(engine, config)
    install_seconds = time.perf_counter() - started
    engine.dispose()
    directory = workdir / make_url(url).database
    directory.mkdir()
    config_path = write_config(directory, url)
    document = yaml.safe_load(config_path.read_text())
    # The daily partitions start with the data, so every day measured is a partition.
    document["start_date"] = (end - timedelta(days=days)).date().isoformat()
    config_path.write_text(yaml.safe_dump(document))
    print(
        f"  {make_url(url).database}: {summary.users:,} users, {summary.events:,} events, "
        f"{summary.sessions:,} sessions; seeded in {seed_seconds:.1f} s, installed in "
        f"{install_seconds:.1f} s ({report.rollup_rows:,} rollup rows)",
        flush=True,
    )
    return Database(
        url, config, config_path, summary, seed_seconds, install_seconds, report.rollup_rows, plain
    )


# --- steps run by the worker -------------------------------------------------------------------


def materialize_step(
    label: str, database: Database, assets: Sequence[str], days: Sequence[date]
) -> dict:
    return {
        "label": label,
        "url": database.url,
        "config": str(database.config_path),
        "assets": list(assets),
        "days": [day.isoformat() for day in days],
    }


def sql_step(label: str, database: Database, table: str, sql_for: Callable, day: date) -> dict:
    engine = create_engine(database.url)
    with engine.connect() as connection:
        sql, clear = sql_for(connection, database.config), figures.clear_sql(connection, table)
    engine.dispose()
    parameters = {**snapshot_parameters(database.config, day), "day": day.isoformat()}
    return {
        "label": label,
        "url": database.url,
        "sql": sql,
        "before": [clear],
        "parameters": parameters,
    }


def run_worker(plan: list[dict], config_path: Path, workdir: Path) -> tuple[list[dict], int]:
    """Run the steps in a child process; return their results and its peak RSS in bytes."""
    plan_path, results_path = workdir / "plan.json", workdir / "results.json"
    log_path = workdir / "worker.log"
    plan_path.write_text(json.dumps(plan))
    # Dagster logs every event to stderr: kept in a file, shown only when the worker fails.
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", str(plan_path), str(results_path)],
            cwd=project_root(),
            env={**os.environ, "RETENTION_CONFIG": str(config_path)},
            stderr=log,
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.stderr.write(log_path.read_text()[-5000:])
        raise RuntimeError(f"the benchmark worker failed (exit {process.returncode})")
    return json.loads(results_path.read_text()), usage.ru_maxrss * 1024


def by_label(results: list[dict]) -> dict[str, list[dict]]:
    """Each label's results, one per repeat, in order."""
    grouped: dict[str, list[dict]] = {}
    for result in results:
        grouped.setdefault(result["label"], []).append(result)
    return grouped


# --- measurements ------------------------------------------------------------------------------


@dataclass
class ShapeResults:
    shape: Shape
    main: Database
    days: dict[str, date]
    partition: dict[str, list[dict]] = field(default_factory=dict)
    mismatches: dict[str, int] = field(default_factory=dict)
    backfill: dict[str, list[dict]] = field(default_factory=dict)
    growth: dict[str, list[dict]] = field(default_factory=dict)
    growth_databases: dict[int, Database] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    # The morning's history: ten days of runs in one process, beside the stand-in Resend, which
    # keeps every request it is sent (about 6.5 kB an email). Shown, not judged: no run of the
    # pipeline's is that process.
    history_rss: int | None = None
    capture: list[tuple[str, list[float], list[float]]] = field(default_factory=list)
    morning: list[dict[str, float]] = field(default_factory=list)
    """The critical path's figures (`bench_critical_path.run_critical_path`), one per repeat."""
    morning_app_rows: int = 0
    """The rows the app wrote since the hourly drain, waiting for the morning's drain."""


def measure_shape(
    server: ScratchServer, shape: Shape, options: Options, end: datetime, workdir: Path
) -> ShapeResults:
    print(f"{shape.name}: building {options.users:,} users ({shape.description}) ...", flush=True)
    main = build_database(
        server, shape, options.users, shape.days, end, workdir, with_plain_copy=True
    )
    last = end.date() - timedelta(days=1)
    # The backfill ends the day before the last: the last is the morning's, built once.
    full_day = last - timedelta(days=BACKFILL_DAYS + 2)
    next_day = full_day + timedelta(days=1)
    results = ShapeResults(
        shape, main, {"full": full_day, "incremental": next_day, "last": last - timedelta(days=1)}
    )
    # No pool: the worker ends every other connection to the database after each step.
    engine = create_engine(main.url, poolclass=NullPool)
    with engine.begin() as connection:
        figures.create_figure_tables(connection, main.config)

    print(f"{shape.name}: one partition ...", flush=True)
    plan = []
    for _repeat in range(options.repeats):
        plan += [
            materialize_step("snapshot, full build", main, ["snapshot"], [full_day]),
            materialize_step("segments, after the full build", main, ["segments"], [full_day]),
            materialize_step("snapshot, incremental", main, ["snapshot"], [next_day]),
            materialize_step("segments, incremental", main, ["segments"], [next_day]),
            sql_step("SQL floor", main, "floor_figures", figures.floor_sql, next_day),
            sql_step("naive", main, "naive_figures", figures.naive_sql, next_day),
        ]
    partition, results.peak_rss["one partition"] = run_worker(plan, main.config_path, workdir)
    results.partition = by_label(partition)
    with engine.connect() as connection:
        for table in figures.TABLES:
            results.mismatches[table] = figures.mismatches(connection, main.config, table, next_day)

    print(f"{shape.name}: {BACKFILL_DAYS}-day backfill ...", flush=True)
    backfill_days = [next_day + timedelta(days=n) for n in range(1, BACKFILL_DAYS + 1)]
    # Users sign up all along the demo's history, so the days of the range grow: the day they
    # are compared with is the middle one, rebuilt (rolled forward) after each backfill.
    middle_day = backfill_days[BACKFILL_DAYS // 2]
    results.days["middle"] = middle_day
    plan = []
    for _repeat in range(options.repeats):
        plan += [
            materialize_step("backfill", main, ["snapshot", "segments"], backfill_days),
            materialize_step("one incremental day", main, ["snapshot", "segments"], [middle_day]),
        ]
    backfill, results.peak_rss["backfill"] = run_worker(plan, main.config_path, workdir)
    results.backfill = by_label(backfill)

    results.days["morning"] = last
    measure_morning(server, results, end, workdir, options.repeats)

    print(f"{shape.name}: growth with history ({options.growth_users:,} users) ...", flush=True)
    for history in HISTORIES:
        results.growth_databases[history] = build_database(
            server, shape, options.growth_users, history, end, workdir
        )
    plan = [
        materialize_step(
            f"{history} days, first day",
            database,
            ["snapshot", "segments"],
            [last - timedelta(days=1)],
        )
        for history, database in results.growth_databases.items()
    ]
    for _repeat in range(options.repeats):
        plan += [
            materialize_step(f"{history} days", database, ["snapshot", "segments"], [last])
            for history, database in results.growth_databases.items()
        ]
    growth, results.peak_rss["growth"] = run_worker(plan, main.config_path, workdir)
    results.growth = by_label(growth)
    for database in results.growth_databases.values():
        server.drop(database.url)

    print(f"{shape.name}: capture ...", flush=True)
    # The morning ran on copies: the app's half hour before it still waits in `main`'s capture.
    update_rollup(engine, main.config)
    for label, load in CAPTURE_LOADS:
        without, with_capture = [], []
        for _repeat in range(options.repeats):
            without.append(
                run_load(
                    main.plain_copy, load, False, options.users, options.capture_seconds
                ).throughput
            )
            with_capture.append(
                run_load(main.url, load, False, options.users, options.capture_seconds).throughput
            )
            update_rollup(engine, main.config)
        results.capture.append((label, without, with_capture))
    engine.dispose()
    server.drop(main.plain_copy)
    server.drop(main.url)
    return results


def measure_morning(
    server: ScratchServer, results: ShapeResults, end: datetime, workdir: Path, repeats: int
) -> None:
    """The critical path of `results.days["morning"]`, `repeats` times: its history is run once
    on the shape's database, then each repeat runs the morning on a copy of it."""
    main, day = results.main, results.days["morning"]
    print(f"{results.shape.name}: the morning's history ...", flush=True)
    start_date = yaml.safe_load(main.config_path.read_text())["start_date"]

    def config_for(url: str) -> Path:
        directory = workdir / f"{make_url(url).database}_morning"
        return write_critical_path_config(directory, url, start_date)

    history_config = config_for(main.url)
    history = history_step("history", main.url, history_config, day, end)
    (prepared,), results.history_rss = run_worker([history], history_config, workdir)
    results.morning_app_rows = int(prepared["parts"]["app rows"])
    for repeat in range(repeats):
        print(f"{results.shape.name}: the morning's critical path, {repeat + 1} ...", flush=True)
        url = server.create(f"{results.shape.name}_morning", template=main.url)
        config = config_for(url)
        (morning,), rss = run_worker(
            [morning_step("critical path", url, config, day)], config, workdir
        )
        server.drop(url)
        results.morning.append(morning["parts"])
        results.peak_rss["critical path"] = max(results.peak_rss.get("critical path", 0), rss)
        sent, first = morning["parts"], results.morning[0]
        if (sent["emails"], sent["send runs asked"]) != (first["emails"], first["send runs asked"]):
            raise RuntimeError(
                f"repeat {repeat + 1} of the morning sent {sent['emails']:.0f} emails in the first "
                f"of {sent['send runs asked']:.0f} send runs, the first repeat "
                f"{first['emails']:.0f} of {first['send runs asked']:.0f}: not the same morning"
            )


@dataclass
class SendingResults:
    emails: int
    unthrottled: list = field(default_factory=list)
    throttled: list = field(default_factory=list)


def measure_sending(options: Options) -> SendingResults:
    print("sending ...", flush=True)
    emails = make_emails(options.emails)
    results = SendingResults(options.emails)
    for _repeat in range(options.repeats):
        results.unthrottled.append(measure(emails, 1e9))
        results.throttled.append(measure(emails, THROTTLED_REQUESTS_PER_SECOND))
    return results


# --- the report --------------------------------------------------------------------------------


def spread(values: Sequence[float], unit: str = "s", digits: int = 2) -> str:
    """median (min-max)"""
    return (
        f"{statistics.median(values):.{digits}f} {unit} "
        f"({min(values):.{digits}f}–{max(values):.{digits}f})"
    )


def verdict(value: float, limit: float, at_most: bool = True) -> str:
    return "met" if (value <= limit if at_most else value >= limit) else "**not met**"


def step_seconds(results: list[dict]) -> list[float]:
    return [result["step_seconds"] for result in results]


def summed(snapshots: list[dict], segments: list[dict], key: str) -> list[float]:
    """Repeat by repeat, the snapshot's figure plus the segments' that followed it."""
    return [a[key] + b[key] for a, b in zip(snapshots, segments, strict=True)]


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def mib(values: Sequence[int]) -> str:
    return spread([value / 2**20 for value in values], "MiB", 1)


def render_shape(results: ShapeResults, options: Options) -> tuple[list[str], list[list[str]]]:
    """The shape's section, and its rows of the targets table."""
    shape, main, partition = results.shape, results.main, results.partition
    summary = main.summary
    per_user_day = summary.events / max(main.rollup_rows, 1)
    lines = [
        f"## {shape.name}: {summary.users:,} users, {shape.description}",
        "",
        f"{summary.events:,} events, {summary.sessions:,} sessions, {main.rollup_rows:,} rollup "
        f"rows ({per_user_day:.1f} events per active user-day). Seeded in "
        f"{main.seed_seconds:.0f} s, installed (rollup rebuilt) in {main.install_seconds:.0f} s.",
        f"Days measured: full build {results.days['full']}, incremental "
        f"{results.days['incremental']}, backfill to {results.days['last']}.",
        "",
        "### One partition",
        "",
        "| step | time, median (min–max) | temp files | build |",
        "|---|---|---|---|",
    ]
    for label, runs in partition.items():
        builds = sorted({build for run in runs for build in run["builds"]})
        lines.append(
            f"| {label} | {spread(step_seconds(runs))} | "
            f"{mib([run['temp_bytes'] for run in runs])} | {', '.join(builds) or '—'} |"
        )
    full = summed(
        partition["snapshot, full build"],
        partition["segments, after the full build"],
        "step_seconds",
    )
    incremental = summed(
        partition["snapshot, incremental"], partition["segments, incremental"], "step_seconds"
    )
    floor = step_seconds(partition["SQL floor"])
    naive = step_seconds(partition["naive"])
    wall = summed(partition["snapshot, incremental"], partition["segments, incremental"], "seconds")
    incremental_temp = summed(
        partition["snapshot, incremental"], partition["segments, incremental"], "temp_bytes"
    )
    full_temp = summed(
        partition["snapshot, full build"], partition["segments, after the full build"], "temp_bytes"
    )
    lines += [
        "",
        "Step times are Dagster's own step durations (the asset and its checks); the two "
        f"incremental runs took {spread(wall)} from `materialize` to its return.",
        f"Figures written by the SQL floor that differ from the snapshot's: "
        f"{results.mismatches['floor_figures']} users; by the naive statement: "
        f"{results.mismatches['naive_figures']} (every column but `last_actions`).",
        "",
        "| ratio, repeat by repeat | median (min–max) | target | |",
        "|---|---|---|---|",
    ]
    targets = []
    incremental_vs_floor = ratios(incremental, floor)
    naive_vs_incremental = ratios(naive, incremental)
    rows = [
        ("snapshot + segments, incremental / SQL floor", incremental_vs_floor, "≤ 1.0", 1.0, True),
        ("snapshot + segments, full build / SQL floor", ratios(full, floor), "", None, True),
        (
            "naive / snapshot + segments, incremental",
            naive_vs_incremental,
            "≥ 10 (deep)" if shape.name == "deep" else "",
            10.0 if shape.name == "deep" else None,
            False,
        ),
    ]
    for label, values, target, limit, at_most in rows:
        met = verdict(statistics.median(values), limit, at_most) if limit else ""
        lines.append(f"| {label} | {spread(values, 'x')} | {target or '—'} | {met} |")
        if limit:
            targets.append([shape.name, label, spread(values, "x"), target, met])

    lines += ["", "### Growth with history", ""]
    growth_users = results.growth_databases[HISTORIES[0]].summary.users
    lines += [
        f"{growth_users:,} users seeded with 60, 120 and 180 days of history; each database's "
        "last day built incrementally after a full build of the day before (snapshot + segments "
        "steps).",
        "",
        "| history | one incremental day | temp files | events |",
        "|---|---|---|---|",
    ]
    for history, database in results.growth_databases.items():
        runs = results.growth[f"{history} days"]
        lines.append(
            f"| {history} days | {spread(step_seconds(runs))} | "
            f"{mib([run['temp_bytes'] for run in runs])} | {database.summary.events:,} |"
        )
    growth = ratios(
        step_seconds(results.growth[f"{HISTORIES[-1]} days"]),
        step_seconds(results.growth[f"{HISTORIES[0]} days"]),
    )
    met = verdict(statistics.median(growth), 1.2)
    lines += ["", f"180 / 60 days, repeat by repeat: {spread(growth, 'x')} (target ≤ 1.2: {met})."]
    targets.append(
        [shape.name, "one day at 180 / 60 days of history", spread(growth, "x"), "≤ 1.2", met]
    )

    backfill, day = results.backfill["backfill"], results.backfill["one incremental day"]
    backfill_ratio = ratios(
        [run["seconds"] for run in backfill], [BACKFILL_DAYS * s for s in step_seconds(day)]
    )
    builds = sorted({build for run in backfill for build in run["builds"]})
    met = verdict(statistics.median(backfill_ratio), 1.2)
    lines += [
        "",
        f"### {BACKFILL_DAYS}-day backfill",
        "",
        f"Days {results.days['incremental'] + timedelta(days=1)} to {results.days['last']} in "
        f"order, {backfill[0]['runs']} Dagster run(s) (snapshot builds: {', '.join(builds)}), "
        f"against one incremental day as the daily run makes it (snapshot + segments steps): "
        f"{results.days['middle']}, the middle of the range (users sign up all along the "
        "history), rebuilt after each backfill.",
        "",
        "| figure | median (min–max) |",
        "|---|---|",
        f"| backfill, from the first `materialize` to the last's return | "
        f"{spread([run['seconds'] for run in backfill])} |",
        f"| its Dagster steps alone | {spread(step_seconds(backfill))} |",
        f"| one incremental day (steps) | {spread(step_seconds(day))} |",
        f"| one incremental day, whole run | {spread([run['seconds'] for run in day])} |",
        f"| temp files per backfilled day | "
        f"{mib([run['temp_bytes'] // BACKFILL_DAYS for run in backfill])} |",
        f"| backfill / {BACKFILL_DAYS} × one day | {spread(backfill_ratio, 'x')} |",
    ]
    targets.append(
        [
            shape.name,
            f"{BACKFILL_DAYS}-day backfill / {BACKFILL_DAYS} × one day",
            spread(backfill_ratio, "x"),
            "≤ 1.2",
            met,
        ]
    )

    morning_lines, morning_targets = render_morning(results)
    lines += morning_lines
    targets += morning_targets

    peak = max(results.peak_rss.values())
    worst_temp = max(incremental_temp + full_temp)
    lines += [
        "",
        "### Memory and temp files",
        "",
        "Peak RSS of the worker process (Dagster, the assets' Python side, the psycopg client): "
        + ", ".join(f"{block} {rss / 2**20:.0f} MiB" for block, rss in results.peak_rss.items())
        + "."
        + (
            f" The morning's history, ten days of daily and send runs in one process beside the "
            f"stand-in Resend that keeps every request: {results.history_rss / 2**20:.0f} MiB "
            "(not a run of the pipeline's: not judged)."
            if results.history_rss is not None
            else ""
        ),
        f"Temp files of one partition (snapshot + segments): incremental "
        f"{mib(incremental_temp)}, full build {mib(full_temp)}.",
    ]
    targets.append(
        [
            shape.name,
            "peak RSS of the run process",
            f"{peak / 2**20:.0f} MiB",
            "≤ 1 GiB",
            verdict(peak, GIB),
        ]
    )
    targets.append(
        [
            shape.name,
            "temp files per partition (worst of full and incremental)",
            f"{worst_temp / 2**20:.1f} MiB",
            "< 64 MB",
            verdict(worst_temp, 64 * MB),
        ]
    )

    lines += [
        "",
        "### Capture",
        "",
        f"4 client processes, {options.capture_seconds:g} s per run, on a copy of the seeded "
        "database without the pipeline and on the installed one, alternately; the tracked one "
        "drained after each run.",
        "",
        "| app load | no capture | with capture | ratio |",
        "|---|---|---|---|",
    ]
    for label, without, with_capture in results.capture:
        lines.append(
            f"| {label} | {spread(without, 'txn/s', 0)} | {spread(with_capture, 'txn/s', 0)} | "
            f"{median_ratio(without, with_capture):.2f} |"
        )
    return lines, targets


def render_morning(results: ShapeResults) -> tuple[list[str], list[list[str]]]:
    """The critical path's section, and its rows of the targets table."""
    mornings, shape = results.morning, results.shape

    def row(name: str, figures: Sequence[float], bold: bool = False) -> str:
        median = f"{statistics.median(figures):.2f}"
        median = f"**{median}**" if bold else median
        return f"| {name} | {median} | {min(figures):.2f}–{max(figures):.2f} |"

    def each(part: str) -> list[float]:
        return [morning[part] for morning in mornings]

    first_send = mornings[0]
    lines = [
        "",
        "### The morning's critical path",
        "",
        f"{results.days['morning']} as its 09:00 run makes it, three loops (the shipped one, "
        f"`at_risk` and `dormant`, three steps each) with the episodes of the {HISTORY_DAYS} "
        f"days' daily runs before it (the recent days' audiences sent), and "
        f"{results.morning_app_rows:,} rows the app wrote since "
        "the hourly drain: the `daily_retention` job, the send sensor, then the first send run "
        "it asks for against the stand-in Resend, unthrottled, executed in process (the "
        "sensor's wait for its daemon tick, up to 30 s, and the launch of the send run are not "
        "counted). "
        + (
            f"The same morning was run {len(mornings)} times, each on its own copy of the "
            if len(mornings) > 1
            else "The morning was run once, on a copy of the "
        )
        + "database as the history left it (a copy of its files: it starts from a checkpoint, "
        "none of its pages in PostgreSQL's buffers).",
        "",
        "Each part's median is its own: the medians need not add up to the total's.",
        "",
        "| part | seconds, median | min–max |",
        "|---|---|---|",
        *(row(part, each(part)) for part in PARTS),
        row("**daily run's start to the first email accepted**", each("total"), bold=True),
        "",
        "The daily run's steps the first email does not wait for, run once the first send run "
        "was done (in production the check runs beside the snapshot, segments and audience, "
        "outcomes and performance beside the send: their load is not in the figures above):",
        "",
        "| step | seconds, median | min–max |",
        "|---|---|---|",
        *(row(step, each(step)) for step in BESIDE_STEPS.values()),
        "",
        f"The sensor asked for {first_send['send runs asked']:.0f} send runs in every repeat; "
        f"the first sent {first_send['emails']:,.0f} emails, in "
        f"{statistics.median(each('send run')):.1f} s (median).",
    ]
    # Each repeat's audience against its own snapshot: the two ran side by side.
    audience_vs_snapshot = ratios(each("audience"), each("snapshot"))
    total = each("total")
    targets = [
        [
            shape.name,
            "audience step / snapshot step (3 loops)",
            spread(audience_vs_snapshot, "x"),
            "≤ 0.5",
            verdict(statistics.median(audience_vs_snapshot), 0.5),
        ]
    ]
    if shape.name == "wide":
        targets.append(
            [
                shape.name,
                "daily run's start to the first email",
                spread(total, "s", 1),
                f"≤ {MORNING_SECONDS} s (1M users)",
                verdict(statistics.median(total), MORNING_SECONDS),
            ]
        )
    return lines, targets


def machine_lines(server_url: str) -> list[str]:
    engine: Engine = create_engine(server_url)
    with engine.connect() as connection:
        settings = {
            name: connection.execute(text("SELECT current_setting(:name)"), {"name": name}).scalar()
            for name in ("server_version", "autovacuum", "work_mem", "shared_buffers", "jit")
        }
    engine.dispose()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return [
        "| | |",
        "|---|---|",
        f"| CPU cores | {os.cpu_count()} |",
        f"| RAM | {memory / GIB:.0f} GiB |",
        f"| PostgreSQL | {settings['server_version']} (autovacuum {settings['autovacuum']}, "
        f"work_mem {settings['work_mem']}, shared_buffers {settings['shared_buffers']}, "
        f"jit {settings['jit']}) |",
        f"| Python | {platform.python_version()} |",
        f"| Dagster | {dg.__version__} |",
        f"| date | {datetime.now(UTC):%Y-%m-%d %H:%M} UTC |",
    ]


def sources_options(options: Options) -> bench_sources.Options:
    """The activity sources' and the drain's benchmark at the run's load time and repeats."""
    return bench_sources.Options(seconds=options.capture_seconds, rounds=options.repeats)


def render(
    options: Options,
    shapes: list[ShapeResults],
    audience: list[bench_audience.Figures],
    sending: SendingResults,
    sources: dict | None,
    machine: list[str],
    seconds: float,
) -> str:
    command = (
        f"python -m benchmarks run --users {options.users} --shape "
        f"{'both' if len(options.shapes) > 1 else options.shapes[0]} --repeats {options.repeats}"
        + ("" if options.sources else " --skip-sources")
    )
    body, targets = [], []
    for results in shapes:
        lines, rows = render_shape(results, options)
        body += ["", *lines]
        targets += rows
    body += [
        "",
        "## Audience step",
        "",
        "`build_audiences` of three loops (three steps each) on a day's snapshot with a month "
        "of episodes and assignments behind it (`benchmarks/bench_audience.py`), each repeat "
        "right after the snapshot step of the same number of users (the demo's app, its last "
        "day rolled forward), on scratch databases of its own; median (min–max) of the repeats.",
        "",
        bench_audience.render(audience),
    ]
    largest = audience[-1]
    targets.append(
        [
            "audience",
            f"3 loops / snapshot step, {largest.users:,} users",
            spread(largest.against_snapshot, "x"),
            f"≤ {AUDIENCE_OF_SNAPSHOT:g}",
            verdict(statistics.median(largest.against_snapshot), AUDIENCE_OF_SNAPSHOT),
        ]
    )
    if len(audience) > 1:
        small, large = audience
        growth = ratios(large.seconds, small.seconds)
        targets.append(
            [
                "audience",
                f"3 loops, {large.users:,} / {small.users:,} users",
                spread(growth, "x"),
                f"≤ {AUDIENCE_GROWTH:g} for {large.users / small.users:g}x the users",
                verdict(statistics.median(growth), AUDIENCE_GROWTH),
            ]
        )
    peak = [sent.peak_requests_per_second for sent in sending.throttled]
    met = verdict(max(peak), THROTTLED_REQUESTS_PER_SECOND)
    targets.append(
        ["—", "throttled sending, most requests in any second", str(max(peak)), "≤ 2", met]
    )
    if sources is not None:
        targets += bench_sources.targets(sources)
        body += ["", bench_sources.render(sources, sources_options(options))]
    unthrottled = [sending.emails / sent.seconds for sent in sending.unthrottled]
    throttled = [sending.emails / sent.seconds for sent in sending.throttled]
    lines = [
        "# Benchmark results",
        "",
        f"`{command}`, {seconds / 60:.1f} minutes in all. Each figure: median (min–max) of "
        f"{options.repeats} repeats; each ratio computed repeat by repeat from figures taken "
        "next to each other, then summarized. The machine is shared: figures are noisy.",
        "",
        "## Machine",
        "",
        *machine,
        "",
        "## Targets",
        "",
        "| shape | figure | measured | target | |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in targets),
        "| — | sharded sending, 4 concurrent send runs | not measured here | shared limit, "
        "exactly once | see `retention_pipeline_tests/sending/test_shards.py` |",
        *body,
        "",
        "## Sending",
        "",
        f"{sending.emails:,} rendered emails through `ResendSender` to the fake Resend server "
        "(100 per request).",
        "",
        "| mode | emails/s | most requests in any second |",
        "|---|---|---|",
        f"| unthrottled | {spread(unthrottled, 'emails/s', 0)} | "
        f"{max(sent.peak_requests_per_second for sent in sending.unthrottled)} |",
        f"| throttled at {THROTTLED_REQUESTS_PER_SECOND:g} requests/s | "
        f"{spread(throttled, 'emails/s', 0)} | {max(peak)} |",
        "",
    ]
    return "\n".join(lines)


def run_morning(options: Options) -> None:
    """`python -m benchmarks morning`: the critical path alone, on a database seeded for it
    (the `HISTORY_DAYS` daily runs before the measured day build its snapshots and episodes)."""
    started = time.perf_counter()
    server = ScratchServer(options.server_url)
    zone = ZoneInfo(make_config(options.server_url).timezone)
    end = datetime.combine(datetime.now(zone).date(), clock.min, tzinfo=zone)
    sections = []
    try:
        with TemporaryDirectory(prefix="retention-bench-") as directory:
            for name in options.shapes:
                shape = SHAPES[name]
                print(f"{name}: building {options.users:,} users ...", flush=True)
                main = build_database(
                    server, shape, options.users, shape.days, end, Path(directory)
                )
                last = end.date() - timedelta(days=1)
                results = ShapeResults(shape, main, {"morning": last})
                measure_morning(server, results, end, Path(directory), options.repeats)
                lines, targets = render_morning(results)
                sections += [f"## {name}: {options.users:,} users, {shape.description}", *lines]
                sections += [
                    "",
                    *(f"Target: {row[1]}: {row[2]} ({row[3]}: {row[4]})" for row in targets),
                    "",
                ]
                server.drop(main.url)
    finally:
        server.drop_all()
    report = "\n".join(["# The morning's critical path", "", *sections])
    options.output.write_text(report)
    print(report)
    print(f"wrote {options.output} in {(time.perf_counter() - started) / 60:.1f} minutes")


def run(options: Options) -> None:
    started = time.perf_counter()
    server = ScratchServer(options.server_url)
    # Data ends at the start of today in the loops' timezone: yesterday is the last whole day.
    zone = ZoneInfo(make_config(options.server_url).timezone)
    end = datetime.combine(datetime.now(zone).date(), clock.min, tzinfo=zone)
    try:
        with TemporaryDirectory(prefix="retention-bench-") as directory:
            shapes = [
                measure_shape(server, SHAPES[name], options, end, Path(directory))
                for name in options.shapes
            ]
        sizes = sorted(
            {max(options.users // 10, AUDIENCE_SMALLEST), max(options.users, AUDIENCE_SMALLEST)}
        )
        print(f"audience step at {', '.join(f'{n:,}' for n in sizes)} users ...", flush=True)
        audience = [
            bench_audience.measure_scratch(options.server_url, users, options.repeats)
            for users in sizes
        ]
        sending = measure_sending(options)
        sources = (
            bench_sources.measure_all(options.server_url, sources_options(options))
            if options.sources
            else None
        )
        machine = machine_lines(options.server_url)
    finally:
        server.drop_all()
    report = render(
        options, shapes, audience, sending, sources, machine, time.perf_counter() - started
    )
    options.output.write_text(report)
    print(f"wrote {options.output} in {(time.perf_counter() - started) / 60:.1f} minutes")
