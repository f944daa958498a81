"""What the capture of a time updated in place costs the app, and how fast the drain folds
several sources, with proof that every change is counted once.

1. App UPDATE throughput, 4 client processes of single-row autocommit UPDATEs on `"Session"`
   (100k rows), on a database without tracking and one whose `updatedAt` is a source captured
   by `updates`, interleaved, `--rounds` rounds: (a) every update moves `updatedAt`; (b) 9 in
   10 leave it alone (they set a token and write `updatedAt` back unchanged, as ORMs that save
   every column do). After each tracked run, the drain's count must equal the updates that moved
   the column.
2. Polling under an app's inserts, with drains SIGKILLed mid-poll (`benchmarks/bench_polling.py`).
3. Drain throughput over three sources (an action table filtered by kind with a prefix, a
   constant-action table, the shorthand events): `--drain-rows` rows per source, captured by
   the triggers, then drained at once; and the drain's worst case and app-shaped drains
   (`benchmarks/bench_drain.py`). Each drain is measured with the shipped fold and the one it
   replaced, on copies of the same captured rows; then the full snapshot of yesterday built on
   each after its drain: three sources against the events source alone, the same rows.

    python -m benchmarks sources [--url URL] [--seconds S] [--rounds R] [--drain-rows N]
        [--worst-rows N] [--worst-users N] [--active-users N] [--drain-repeats R]
        [--polling-seconds S]
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import random
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from sqlalchemy import create_engine

from benchmarks import bench_drain, bench_polling
from benchmarks.bench_capture import CLIENTS, Scratch, libpq
from benchmarks.bench_drain import Case, drain_each_fold
from retention_pipeline.config.loader import parse_config
from retention_pipeline.segments.snapshot.build import build_snapshot
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT

SESSION_ROWS = 100_000
# A ratio of two timings within this is no slower on this shared machine.
SNAPSHOT_NOISE = 1.1
APP_TABLES = """
    CREATE TABLE "Session" (id bigserial PRIMARY KEY, "userId" integer NOT NULL, token text,
        "updatedAt" timestamp NOT NULL);
    INSERT INTO "Session" ("userId", token, "updatedAt")
        SELECT 1 + g % 1000, md5(g::text), now() - interval '3 days'
        FROM generate_series(1, %(rows)s) AS g;
    CREATE TABLE audit_log (id bigserial PRIMARY KEY, actor_id integer, kind text,
        created_at timestamptz NOT NULL);
    CREATE TABLE comments (id bigserial PRIMARY KEY, author integer, body text,
        created_at timestamptz NOT NULL);
"""
SOURCES = [
    {"table": "Session", "user": "userId", "at": "updatedAt", "login": True, "capture": "updates"},
    {
        "table": "audit_log",
        "user": "actor_id",
        "at": "created_at",
        "action": {"column": "kind", "prefix": "audit."},
        "where": [{"column": "kind", "in": ["DOCUMENT_CREATED", "DOCUMENT_SENT"]}],
    },
    {"table": "comments", "user": "author", "at": "created_at", "action": "comment.posted"},
]
FILL = {
    "events": "INSERT INTO events (user_id, name, created_at) "
    "SELECT 1 + (random() * 999)::int, 'e' || (random() * 20)::int, "
    "now() - random() * interval '30 days' FROM generate_series(1, %(rows)s)",
    "audit_log": "INSERT INTO audit_log (actor_id, kind, created_at) "
    "SELECT 1 + (random() * 999)::int, "
    "(ARRAY['DOCUMENT_CREATED', 'DOCUMENT_SENT'])[1 + (random())::int], "
    "now() - random() * interval '30 days' FROM generate_series(1, %(rows)s)",
    "comments": "INSERT INTO comments (author, body, created_at) "
    "SELECT 1 + (random() * 999)::int, 'x', now() - random() * interval '30 days' "
    "FROM generate_series(1, %(rows)s)",
}


def sources_config(url: str):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"].update(url=url, activity=SOURCES)
    return parse_config(document, environ={})


def _client(url: str, moving_share: float, seconds: float, seed: int, results) -> None:
    """Single-row UPDATEs until the deadline; reports (updates, updates that moved the time)."""
    rng = random.Random(seed)
    updates = moved = 0
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            row = rng.randint(1, SESSION_ROWS)
            if rng.random() < moving_share:
                connection.execute(
                    'UPDATE "Session" SET "updatedAt" = clock_timestamp() WHERE id = %s', (row,)
                )
                moved += 1
            else:
                connection.execute(
                    'UPDATE "Session" SET token = %s, "updatedAt" = "updatedAt" WHERE id = %s',
                    (str(rng.random()), row),
                )
            updates += 1
    results.put((updates, moved))


def run_updates(url: str, moving_share: float, seconds: float) -> tuple[float, int]:
    """Updates per second of 4 clients, and how many moved the time."""
    results = multiprocessing.Queue()
    clients = [
        multiprocessing.Process(target=_client, args=(url, moving_share, seconds, n, results))
        for n in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    counts = [results.get() for _ in clients]
    for client in clients:
        client.join()
    return sum(c[0] for c in counts) / seconds, sum(c[1] for c in counts)


def sessions_counted(url: str) -> int:
    with psycopg.connect(libpq(url)) as connection:
        return connection.execute(
            "SELECT coalesce(sum(session_count), 0) FROM retention.activity_daily"
        ).fetchone()[0]


@dataclass
class UpdateFigures:
    label: str
    plain: list[float]
    tracked: list[float]
    lost_or_doubled: int


def measure(scratch: Scratch, seconds: float, rounds: int, drain_rows: int, repeats: int) -> dict:
    plain = scratch.create("plain", 1000)
    tracked = scratch.create("sources", 1000)
    for url in (plain, tracked):
        with psycopg.connect(libpq(url), autocommit=True) as connection:
            connection.execute(APP_TABLES.replace("%(rows)s", str(SESSION_ROWS)))
            connection.execute("VACUUM ANALYZE")
    config = sources_config(tracked)
    engine = create_engine(tracked)
    install(engine, config)
    update_rollup(engine, config)
    figures = []
    for label, share in (("(a) every update moves `updatedAt`", 1.0), ("(b) 1 in 10", 0.1)):
        without, with_capture, wrong = [], [], 0
        for _round in range(rounds):
            without.append(run_updates(plain, share, seconds)[0])
            before = sessions_counted(tracked)
            throughput, moved = run_updates(tracked, share, seconds)
            with_capture.append(throughput)
            update_rollup(engine, config)
            wrong += abs(sessions_counted(tracked) - before - moved)
        figures.append(UpdateFigures(label, without, with_capture, wrong))
        print(
            f"  {label}: {statistics.median(without):.0f} -> "
            f"{statistics.median(with_capture):.0f} updates/s; lost or doubled: {wrong}",
            flush=True,
        )
    engine.dispose()
    scratch.drop(plain)
    # The same number of rows from the one shorthand source, for comparison on this machine.
    single = scratch.create_from("sources_single", tracked)
    with psycopg.connect(libpq(tracked), autocommit=True) as connection:
        for statement in FILL.values():
            connection.execute(statement.replace("%(rows)s", str(drain_rows)))
    with psycopg.connect(libpq(single), autocommit=True) as connection:
        connection.execute(FILL["events"].replace("%(rows)s", str(drain_rows * len(FILL))))
    drains, snapshots = [], {}
    for label, template in (
        (
            "3 sources (a filtered, prefixed action table; a constant action; the shorthand "
            "events)",
            tracked,
        ),
        ("the same number of rows of the events source alone", single),
    ):
        case = Case(label, 200_000)
        drains.append(drain_each_fold(scratch, case, template, sources_config, repeats))
        snapshots[label] = snapshot_seconds(template, rounds)
        scratch.drop(template)
    return {"updates": figures, "drains": drains, "snapshots": list(snapshots.values())}


def snapshot_seconds(url: str, repeats: int) -> list[float]:
    """Drain the database at `url`, then build yesterday's snapshot in full `repeats` times:
    seconds each. The snapshot reads the rollup, whatever sources filled it."""
    config = sources_config(url)
    engine = create_engine(url)
    update_rollup(engine, config)
    day = datetime.now(UTC).date() - timedelta(days=1)
    seconds = []
    for _repeat in range(repeats):
        with engine.begin() as connection:
            started = time.perf_counter()
            build_snapshot(connection, config, day)
            seconds.append(time.perf_counter() - started)
    engine.dispose()
    return seconds


def snapshot_ratios(results: dict) -> list[float]:
    """The snapshot's time over three sources against one source, the same rows in all."""
    several, single = results["snapshots"]
    return [a / b for a, b in zip(several, single, strict=True)]


@dataclass
class Options:
    seconds: float = 5
    rounds: int = 3
    drain_rows: int = 300_000
    worst_rows: int = 1_000_000
    worst_users: int = 100_000
    active_users: int = 5_000
    drain_repeats: int = 1
    polling_seconds: float = 20


def measure_all(server_url: str, options: Options) -> dict:
    """The activity sources' figures and the drain's, in scratch databases dropped at the end."""
    scratch = Scratch(server_url)
    load_before = os.getloadavg()[0]
    try:
        print("activity sources: UPDATE capture and the drain of several sources ...", flush=True)
        results = measure(
            scratch, options.seconds, options.rounds, options.drain_rows, options.drain_repeats
        )
        print("polling: drains killed mid-poll under an app's inserts ...", flush=True)
        results["polling"] = bench_polling.measure(scratch, options.polling_seconds)
        print("drain: worst case and app-shaped ...", flush=True)
        results["drain_cases"] = bench_drain.measure(
            scratch,
            options.worst_rows,
            options.worst_users,
            options.active_users,
            options.drain_repeats,
        )
        # The machine is shared: the load says how much of it the figures had.
        results["load_average"] = (load_before, os.getloadavg()[0])
        return results
    finally:
        scratch.drop_all()


def update_ratios(figure: UpdateFigures) -> list[float]:
    return [t / p for p, t in zip(figure.plain, figure.tracked, strict=True)]


def targets(results: dict) -> list[list[str]]:
    """Rows of `python -m benchmarks run`'s targets table: (shape, figure, measured, target,
    verdict)."""
    rows = []
    for figure in results["updates"]:
        ratio = statistics.median(update_ratios(figure))
        rows.append(
            [
                "sources",
                f"`capture: updates` UPDATE throughput / untracked, {figure.label}",
                f"{ratio:.2f} ({figure.lost_or_doubled} lost or doubled)",
                "≥ 0.8, 0 lost",
                "met" if ratio >= 0.8 and not figure.lost_or_doubled else "**not met**",
            ]
        )
    ratio = statistics.median(snapshot_ratios(results))
    rows.append(
        [
            "sources",
            "full snapshot after 3 sources / after the events source alone, same rows",
            f"{ratio:.2f} x",
            f"no slower (≤ {SNAPSHOT_NOISE:g}, the machine's noise)",
            "met" if ratio <= SNAPSHOT_NOISE else "**not met**",
        ]
    )
    rows.append(bench_polling.target_row(results["polling"]))
    _before, shipped = bench_drain.FOLDS
    for case in [*results["drains"][:1], *results["drain_cases"]]:
        rate = case.rate(shipped)
        rows.append(
            [
                "drain",
                case.label,
                f"{rate:,.0f} rows/s",
                f"≥ {case.target:,.0f} rows/s",
                "met" if rate >= case.target else "**not met**",
            ]
        )
    return rows


def render(results: dict, options: Options) -> str:
    started, ended = results["load_average"]
    lines = [
        "## Activity sources",
        "",
        f'4 client processes of single-row autocommit UPDATEs on a 100k-row `"Session"`, '
        f"{options.seconds:g} s per run, {options.rounds} rounds interleaved; ratio per round, "
        "median (min–max).",
        "",
        "| load | untracked updates/s | `capture: updates` updates/s | ratio | target | "
        "lost or doubled |",
        "|---|---|---|---|---|---|",
    ]
    for figure in results["updates"]:
        ratios = update_ratios(figure)
        lines.append(
            f"| {figure.label} | {statistics.median(figure.plain):,.0f} | "
            f"{statistics.median(figure.tracked):,.0f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | ≥ 0.8 | {figure.lost_or_doubled} |"
        )
    ratios = snapshot_ratios(results)
    several, single = results["snapshots"]
    lines += [
        "",
        f"The full snapshot of yesterday after draining the {options.drain_rows * 3:,} rows of "
        "three sources, and after the same number of the events source alone: "
        f"{statistics.median(several):.2f} s against {statistics.median(single):.2f} s, "
        f"{statistics.median(ratios):.2f} x ({min(ratios):.2f}–{max(ratios):.2f}) over "
        f"{len(ratios)} builds each.",
        "",
        *bench_polling.render(results["polling"]),
    ]
    lines += [
        "",
        "## Drain",
        "",
        f"Several sources: {options.drain_rows:,} captured rows per source. Worst case: rows "
        "spread at random over 30 days and the users, nearly every row a key of its own. "
        f"App-shaped: a day of {options.active_users:,} active users, about 40 events of 4 "
        "actions and 2 sessions each.",
        "",
        *bench_drain.render([*results["drains"], *results["drain_cases"]], options.drain_repeats),
        "",
        f"Load average (1 minute) of the machine ({os.cpu_count()} cores) when this benchmark "
        f"started and ended: {started:.2f}, {ended:.2f}.",
        "",
    ]
    return "\n".join(lines)
