"""How fast the drain folds captured rows into the rollup: the shipped fold against the one it
replaced (kept here only to be measured), on the same captured rows, side by side.

Each case's captured rows are prepared once in a scratch database, then every drain runs on a
fresh copy of it (CREATE DATABASE ... TEMPLATE), so both folds read the same rows into the same
rollup. Cases:

- worst case, new days: `--rows` rows spread at random over 30 days and `--users` users (nearly
  every row a key of its own), into a rollup holding none of those days: a day's first drain
  after a quiet night, or a catch-up after the drain was down.
- worst case, held days: the same rows captured again, into a rollup already holding every key.
- app-shaped, first drain of a day: `--active` active users' day (about 40 events of 4 actions
  and 2 sessions each, spread over yesterday).
- app-shaped, a later drain of the day: the same again, into a rollup holding those user-days.

    python -m benchmarks drain [--url URL] [--rows N] [--users N] [--active N] [--repeats R]
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import psycopg
from sqlalchemy import create_engine

from benchmarks.bench_capture import BATCH_INSERT, Scratch, libpq
from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline.tracking.sql import TrackingSql, slot_sql, visit_count_sql
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


def upsert_every_key(
    self: TrackingSql,
    source: str,
    tz: str,
    visit_gap_minutes: int,
    *,
    into_emptied_days: bool = False,
) -> str:
    """The fold before this benchmark: one ON CONFLICT upsert per key into both tables, and
    the slots built row by row (a shift per row, OR-ed per key, then per user-day)."""
    s = self.q_schema
    add_action = add_daily = ""
    if not into_emptied_days:
        add_action = """
            ON CONFLICT (user_id, day, event_name) DO UPDATE
            SET event_count = t.event_count + EXCLUDED.event_count,
                last_at = greatest(t.last_at, EXCLUDED.last_at)"""
        merged_visits = visit_count_sql(
            "(t.active_slots | EXCLUDED.active_slots)", visit_gap_minutes
        )
        add_daily = f"""
            ON CONFLICT (user_id, day) DO UPDATE
            SET event_count = t.event_count + EXCLUDED.event_count,
                session_count = t.session_count + EXCLUDED.session_count,
                last_event_at = greatest(t.last_event_at, EXCLUDED.last_event_at),
                last_session_at = greatest(t.last_session_at, EXCLUDED.last_session_at),
                active_slots = t.active_slots | EXCLUDED.active_slots,
                visit_count = {merged_visits}"""
    return f"""
        WITH source AS ({source}),
        per_key AS (
            SELECT kind, user_id, day, event_name,
                   sum(n)::integer AS n, max(at) FILTER (WHERE n > 0) AS last_at,
                   bit_or({slot_sql("at", "day", tz)}) FILTER (WHERE n > 0) AS slots
            FROM (SELECT *, (at AT TIME ZONE {tz})::date AS day FROM source) AS dated
            GROUP BY 1, 2, 3, 4
            HAVING sum(n) > 0
        ),
        actions AS (
            INSERT INTO {s}.action_daily AS t (user_id, day, event_name, event_count, last_at)
            SELECT user_id, day, event_name, n, last_at
            FROM per_key WHERE kind = 'e'
            ORDER BY user_id COLLATE "C", day, event_name COLLATE "C"{add_action}
        ),
        per_day AS (
            SELECT user_id, day,
                   coalesce(sum(n) FILTER (WHERE kind = 'e'), 0) AS events,
                   coalesce(sum(n) FILTER (WHERE kind = 's'), 0) AS sessions,
                   max(last_at) FILTER (WHERE kind = 'e') AS last_event_at,
                   max(last_at) FILTER (WHERE kind = 's') AS last_session_at,
                   bit_or(slots) AS slots
            FROM per_key
            GROUP BY 1, 2
        ),
        daily AS (
            INSERT INTO {s}.activity_daily AS t
                (user_id, day, event_count, session_count, last_event_at, last_session_at,
                 active_slots, visit_count)
            SELECT user_id, day, events, sessions, last_event_at, last_session_at, slots,
                   {visit_count_sql("slots", visit_gap_minutes)}
            FROM per_day
            ORDER BY user_id COLLATE "C", day{add_daily}
            RETURNING day
        ),
        user_days AS (SELECT day, count(*) AS user_days FROM daily GROUP BY day),
        rows_added AS (
            SELECT day, coalesce(sum(n) FILTER (WHERE kind = 'e'), 0) AS events,
                   coalesce(sum(n) FILTER (WHERE kind = 's'), 0) AS sessions
            FROM per_key GROUP BY day
        )
        SELECT day, user_days.user_days, rows_added.events, rows_added.sessions
        FROM user_days JOIN rows_added USING (day)"""


FOLDS = {"before (an upsert per key)": upsert_every_key, "shipped": TrackingSql.fold}


@dataclass
class Case:
    """One drain measured with each fold, on copies of the same captured rows."""

    label: str
    target: float
    rows: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, fold: str) -> float:
        return self.rows / statistics.median(self.seconds[fold])


def _execute(url: str, statement: str, **parameters) -> None:
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute(statement, parameters)


def _install(url: str) -> None:
    engine = create_engine(url)
    install(engine, make_config(url))
    engine.dispose()


def _drain(url: str) -> None:
    engine = create_engine(url)
    update_rollup(engine, make_config(url))
    engine.dispose()


def drain_each_fold(
    scratch: Scratch,
    case: Case,
    template: str,
    config_for: Callable[[str], RetentionConfig],
    repeats: int,
) -> Case:
    """Drain a fresh copy of `template` with each fold, `repeats` times, interleaved."""
    for _repeat in range(repeats):
        for label, fold in FOLDS.items():
            url = scratch.create_from("drain_run", template)
            engine = create_engine(url)
            with mock.patch.object(TrackingSql, "fold", fold):
                update = update_rollup(engine, config_for(url))
            engine.dispose()
            scratch.drop(url)
            case.rows = update.rows
            case.seconds.setdefault(label, []).append(update.seconds)
    print(
        f"  {case.label}: "
        + "; ".join(f"{label} {case.rate(label):,.0f} rows/s" for label in case.seconds),
        flush=True,
    )
    return case


def measure(scratch: Scratch, rows: int, users: int, active: int, repeats: int) -> list[Case]:
    """The worst case and the app-shaped drains, each fold side by side."""
    print("  preparing the captured rows ...", flush=True)
    worst = scratch.create("drain_worst", users)
    _install(worst)
    _execute(worst, BATCH_INSERT, users=users, rows=rows)
    held = scratch.create_from("drain_worst_held", worst)
    _drain(held)
    _execute(held, BATCH_INSERT, users=users, rows=rows)
    app = scratch.create("drain_app", users)
    _install(app)
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
        "| drain | rows | " + " | ".join(f"{label}, rows/s" for label in FOLDS) + " | target | |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        rate = case.rate(shipped)
        lines.append(
            f"| {case.label} | {case.rows:,} | {case.rate(before):,.0f} | {rate:,.0f} | "
            f"≥ {case.target:,.0f} | {'met' if rate >= case.target else '**not met**'} |"
        )
    lines += [
        "",
        f"Each drain on a fresh copy (CREATE DATABASE ... TEMPLATE) of the same captured rows, "
        f"median of {repeats} repeat(s), the folds interleaved; the whole `update_rollup` is timed "
        "(locks, both capture tables, erasure, late days). The fold before: one ON CONFLICT "
        "upsert per key, kept in `benchmarks/bench_drain.py` only to be measured.",
    ]
    return lines
