"""How fast the drain folds captured rows into the rollup: the shipped fold against the one it
replaced (kept here only to be measured), on the same captured rows, side by side, with proof
that both leave the same rollup.

Each case's captured rows are prepared once in a scratch database, then every drain runs on a
fresh copy of it (CREATE DATABASE ... TEMPLATE), so both folds read the same rows into the same
rollup; the folds alternate. Cases:

- worst case, new days: `--rows` rows spread at random over 30 days and `--users` users (nearly
  every row a key of its own), into a rollup holding none of those days: a day's first drain
  after a quiet night, or a catch-up after the drain was down.
- worst case, held days: the same rows captured again, into a rollup already holding every key.
- app-shaped, first drain of a day: `--active` active users' day (about 40 events of 4 actions
  and 2 sessions each, spread over yesterday).
- app-shaped, a later drain of the day: the same again, into a rollup holding those user-days.

Each drain is timed whole (`update_rollup`), and, on a server of this machine, the CPU time of
the backend that ran it (the machine is shared: wall time includes waiting for a core). After
each drain both rollup tables are hashed row by row: every fold must leave the same contents.

    python -m benchmarks drain [--url URL] [--rows N] [--users N] [--active N] [--repeats R]
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import psycopg
from sqlalchemy import create_engine

from benchmarks.bench_capture import BATCH_INSERT, Scratch, libpq
from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline.tracking.sql import TrackingSql
from retention_pipeline_tests.helpers import make_config

APP_DAY_EVENTS = """
INSERT INTO events (user_id, name, properties, created_at)
SELECT 1 + (hashint4(g) & 2147483647) %% %(active)s,
       (ARRAY['project.created','report.exported','dashboard.viewed','invite.sent'])[1 + g %% 4],
       '{}'::jsonb,
       date_trunc('day', now()) - interval '1 day'
           + make_interval(secs => (hashint4(g + %(seed)s) & 2147483647) %% 86400)
FROM generate_series(1, %(active)s * 40) AS g
"""
APP_DAY_SESSIONS = """
INSERT INTO sessions (user_id, created_at)
SELECT 1 + g %% %(active)s,
       date_trunc('day', now()) - interval '1 day'
           + make_interval(secs => (hashint4(g + %(seed)s) & 2147483647) %% 86400)
FROM generate_series(1, %(active)s * 2) AS g
"""


# Read before any drain patches it.
SHIPPED_KEYS = TrackingSql._keys


def numeric_slot_keys(tz: str) -> str:
    """The keys of the fold before this benchmark: each row's slot from its elapsed seconds as a
    numeric (`extract`), where the shipped fold takes a double (`date_part`)."""
    shipped = SHIPPED_KEYS(tz)
    elapsed = "date_part('epoch', at - (day::timestamp AT TIME ZONE " + tz + "))"
    # The shipped text must still hold the expression replaced, or this is no longer the fold
    # before.
    assert elapsed in shipped, "TrackingSql._keys changed: update numeric_slot_keys"
    return shipped.replace(elapsed, f"extract(epoch FROM at - (day::timestamp AT TIME ZONE {tz}))")


# The folds differ only in how they sum the captured rows per key (`TrackingSql._keys`).
FOLDS = {"before (numeric slots)": numeric_slot_keys, "shipped": SHIPPED_KEYS}
# Every column of both rollup tables, hashed row by row: equal sums, equal contents.
CONTENTS = """
SELECT (SELECT count(*) || ':' || coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)
        FROM retention.activity_daily AS t)
       || ' ' ||
       (SELECT count(*) || ':' || coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)
        FROM retention.action_daily AS t)
"""


@dataclass
class Case:
    """One drain measured with each fold, on copies of the same captured rows."""

    label: str
    target: float
    rows: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)
    # The drain's backend's CPU seconds; empty when the server is not on this machine.
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)
    contents: dict[str, set[str]] = field(default_factory=dict)

    def rate(self, fold: str) -> float:
        return self.rows / statistics.median(self.seconds[fold])

    def cpu(self, fold: str) -> str:
        times = self.cpu_seconds.get(fold)
        return f"{statistics.median(times):.2f} s" if times else "–"


def _execute(url: str, statement: str, **parameters) -> None:
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute(statement, parameters)


def install_pipeline(url: str) -> None:
    engine = create_engine(url)
    install(engine, make_config(url))
    engine.dispose()


def _drain(url: str) -> None:
    engine = create_engine(url)
    update_rollup(engine, make_config(url))
    engine.dispose()


def backend_cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of a server process of this machine, None if it is not one."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain_each_fold(
    scratch: Scratch,
    case: Case,
    template: str,
    config_for: Callable[[str], RetentionConfig],
    repeats: int,
) -> Case:
    """Drain a fresh copy of `template` with each fold, `repeats` times, interleaved; every
    fold must leave the same rollup."""
    for _repeat in range(repeats):
        for label, keys in FOLDS.items():
            url = scratch.create_from("drain_run", template)
            # One pooled connection: the drain runs on the backend whose CPU time is read.
            engine = create_engine(url, pool_size=1, max_overflow=0)
            with engine.connect() as connection:
                backend = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            cpu_before = backend_cpu_seconds(backend)
            with mock.patch.object(TrackingSql, "_keys", staticmethod(keys)):
                update = update_rollup(engine, config_for(url))
            cpu_after = backend_cpu_seconds(backend)
            engine.dispose()
            if cpu_before is not None and cpu_after is not None:
                case.cpu_seconds.setdefault(label, []).append(cpu_after - cpu_before)
            case.contents.setdefault(label, set()).add(_contents(url))
            scratch.drop(url)
            case.rows = update.rows
            case.seconds.setdefault(label, []).append(update.seconds)
    if len({frozenset(contents) for contents in case.contents.values()}) != 1 or any(
        len(contents) != 1 for contents in case.contents.values()
    ):
        raise AssertionError(f"{case.label}: the folds left different rollups: {case.contents}")
    print(
        f"  {case.label}: "
        + "; ".join(
            f"{label} {case.rate(label):,.0f} rows/s (CPU {case.cpu(label)})"
            for label in case.seconds
        ),
        flush=True,
    )
    return case


def _contents(url: str) -> str:
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        return connection.execute(CONTENTS).fetchone()[0]


def measure(scratch: Scratch, rows: int, users: int, active: int, repeats: int) -> list[Case]:
    """The worst case and the app-shaped drains, each fold side by side."""
    print("  preparing the captured rows ...", flush=True)
    worst = scratch.create("drain_worst", users)
    install_pipeline(worst)
    _execute(worst, BATCH_INSERT, users=users, rows=rows)
    held = scratch.create_from("drain_worst_held", worst)
    _drain(held)
    _execute(held, BATCH_INSERT, users=users, rows=rows)
    app = scratch.create("drain_app", users)
    install_pipeline(app)
    _execute(app, APP_DAY_EVENTS, active=active, seed=7)
    _execute(app, APP_DAY_SESSIONS, active=active, seed=3)
    app_held = scratch.create_from("drain_app_held", app)
    _drain(app_held)
    _execute(app_held, APP_DAY_EVENTS, active=active, seed=11)
    _execute(app_held, APP_DAY_SESSIONS, active=active, seed=5)
    cases = [
        (
            Case(f"worst case, new days ({rows:,} rows over 30 days x {users:,} users)", 200_000),
            worst,
        ),
        (Case("worst case, every key already held (the same rows again)", 200_000), held),
        (Case(f"app-shaped, a day's first drain ({active:,} active users)", 400_000), app),
        (Case("app-shaped, a later drain of the same day", 400_000), app_held),
    ]
    for case, template in cases:
        _execute(template, "CHECKPOINT")
        drain_each_fold(scratch, case, template, make_config, repeats)
        scratch.drop(template)
    return [case for case, _ in cases]


def render(cases: list[Case], repeats: int) -> list[str]:
    before, shipped = FOLDS
    lines = [
        "| drain | rows | "
        + " | ".join(f"{label}, rows/s (CPU)" for label in FOLDS)
        + " | target | |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        rate = case.rate(shipped)
        lines.append(
            f"| {case.label} | {case.rows:,} | {case.rate(before):,.0f} ({case.cpu(before)}) | "
            f"{rate:,.0f} ({case.cpu(shipped)}) | ≥ {case.target:,.0f} | "
            f"{'met' if rate >= case.target else '**not met**'} |"
        )
    lines += [
        "",
        f"Each drain on a fresh copy (CREATE DATABASE ... TEMPLATE) of the same captured rows, "
        f"median of {repeats} repeat(s), the folds interleaved; the whole `update_rollup` is timed "
        "(locks, both capture tables, erasure, late days), and its backend's CPU time in "
        "parentheses. Both folds left the same rollup (every column of both tables) in every "
        "case. The fold before: each captured row's slot from its elapsed seconds as a numeric, "
        "kept in `benchmarks/bench_drain.py` only to be measured.",
    ]
    return lines


def main(server_url: str, rows: int, users: int, active: int, repeats: int) -> None:
    """`python -m benchmarks drain`: the four drains, each fold side by side, as Markdown."""
    scratch = Scratch(server_url)
    load_before = os.getloadavg()[0]
    try:
        cases = measure(scratch, rows, users, active, repeats)
    finally:
        scratch.drop_all()
    print()
    print("\n".join(render(cases, repeats)))
    print(
        f"\nLoad average (1 minute) of the machine ({os.cpu_count()} cores) when this benchmark "
        f"started and ended: {load_before:.2f}, {os.getloadavg()[0]:.2f}."
    )
