"""What activity capture costs the app, side by side in one run, and proof that it counts every
row exactly once.

1. Concurrent loads: 4 client processes for `--seconds` each, on a database without tracking
   and one with it, interleaved, `--rounds` rounds: one multi-row INSERT per transaction, and
   ORM-style transactions (1-10 single-row event INSERTs plus one session), each over 100k
   users and over 20 hot users.
2. Single-row autocommit inserts and one 300k-row INSERT ... SELECT: no trigger, the shipped
   capture (one row appended per event), and the alternative measured against it (rows
   pre-aggregated per statement before appending).
3. Drain throughput, and the capture's peak size over a simulated 24-hour day (each hour
   `--hour-seconds` of load, then the hourly drain).
4. An install on a table of `--install-events` events while 4 clients keep inserting: the
   longest app statement wait, the install killed with SIGKILL after two day ranges and run
   again, a drain killed with SIGKILL, then everything drained.

Every database is reconciled at the end, user by user and day by day, against the app tables.

    python benchmarks/bench_capture.py --url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from retention_pipeline.config.loader import project_root
from retention_pipeline.database.connection import normalize_url
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config, write_config

APP_SCHEMA = (project_root() / "retention_pipeline" / "demo" / "schema.sql").read_text()
HOT_USERS = 20
CLIENTS = 4

# The alternative design, kept here only to be measured against the shipped one.
PRE_AGGREGATE = """
CREATE TABLE retention.capture_aggregated (
    kind "char" NOT NULL, user_id text NOT NULL, day date NOT NULL, event_name text,
    n integer NOT NULL, last_at timestamptz NOT NULL
) WITH (autovacuum_enabled = false);
CREATE OR REPLACE FUNCTION retention.track_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    tz text;
BEGIN
    SELECT timezone INTO tz FROM retention.tracking_state;
    INSERT INTO retention.capture_aggregated
    SELECT 'e', user_id::text, (created_at AT TIME ZONE tz)::date,
           left(coalesce(nullif(name, ''), '(unnamed)'), 200), count(*), max(created_at)
    FROM new_rows
    WHERE user_id IS NOT NULL AND created_at IS NOT NULL AND isfinite(created_at)
    GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END
$body$;
"""

BATCH_INSERT = """
INSERT INTO events (user_id, name, properties, created_at)
SELECT 1 + (hashint4(g) & 2147483647) %% %(users)s,
       (ARRAY['project.created','report.exported','dashboard.viewed','invite.sent'])[1 + g %% 4],
       '{}'::jsonb,
       now() - make_interval(secs => (hashint4(g + 7) & 2147483647) %% (30 * 86400))
FROM generate_series(1, %(rows)s) AS g
"""

EVENT_NAMES = ("project.created", "report.exported", "dashboard.viewed", "invite.sent")


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Scratch:
    """Scratch databases on the server, dropped at the end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.names: list[str] = []

    def create(self, label: str, users: int) -> str:
        name = f"bench_capture_{label}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(libpq(self.server_url), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        url = make_url(self.server_url).set(database=name).render_as_string(hide_password=False)
        with psycopg.connect(libpq(url), autocommit=True) as connection:
            connection.execute(APP_SCHEMA.replace("{schema}", "public"))
            connection.execute(
                "INSERT INTO users (email, created_at) "
                "SELECT 'u' || g || '@example.com', now() - interval '400 days' "
                "FROM generate_series(1, %s) AS g",
                (users,),
            )
            connection.execute("VACUUM ANALYZE")
        return url

    def create_from(self, label: str, template_url: str) -> str:
        """A copy of the database at `template_url` (which nothing may be connected to)."""
        name = f"bench_capture_{label}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(libpq(self.server_url), autocommit=True) as connection:
            connection.execute(
                f'CREATE DATABASE "{name}" TEMPLATE "{make_url(template_url).database}"'
            )
        self.names.append(name)
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with psycopg.connect(libpq(self.server_url), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.remove(name)

    def drop_all(self) -> None:
        with psycopg.connect(libpq(self.server_url), autocommit=True) as connection:
            for name in self.names:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- app clients -------------------------------------------------------------------------


def _client(url, shape, users, hot, seconds, seed, results, stop) -> None:
    """One app process: transactions until the deadline or `stop`; reports (count, worst
    transaction time, 99th percentile)."""
    rng = random.Random(seed)
    pick = (lambda: rng.randint(1, HOT_USERS)) if hot else (lambda: rng.randint(1, users))
    transactions, worst, waits = 0, 0.0, []
    with psycopg.connect(libpq(url)) as connection:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline and not stop.is_set():
            user, events = pick(), rng.randint(1, 10)
            started = time.perf_counter()
            if shape == "multirow":
                values = ", ".join(["(%s, %s, '{}', now())"] * events)
                params = [v for _ in range(events) for v in (user, rng.choice(EVENT_NAMES))]
                connection.execute(
                    f"INSERT INTO events (user_id, name, properties, created_at) VALUES {values}",
                    params,
                )
            else:
                for _ in range(events):
                    connection.execute(
                        "INSERT INTO events (user_id, name, properties, created_at) "
                        "VALUES (%s, %s, '{}', now())",
                        (user, rng.choice(EVENT_NAMES)),
                    )
            connection.execute(
                "INSERT INTO sessions (user_id, created_at) VALUES (%s, now())", (user,)
            )
            connection.commit()
            wait = time.perf_counter() - started
            worst = max(worst, wait)
            waits.append(wait)
            transactions += 1
    waits.sort()
    results.put((transactions, worst, waits[int(len(waits) * 0.99)] if waits else 0.0))


@dataclass
class LoadResult:
    throughput: float
    worst_wait: float
    p99_wait: float


class Clients:
    """CLIENTS app processes running one load until a deadline or until stopped."""

    def __init__(self, url: str, shape: str, hot: bool, users: int, seconds: float, seed=0):
        self.results: multiprocessing.Queue = multiprocessing.Queue()
        self.stop_event = multiprocessing.Event()
        self.processes = [
            multiprocessing.Process(
                target=_client,
                args=(url, shape, users, hot, seconds, seed + n, self.results, self.stop_event),
            )
            for n in range(CLIENTS)
        ]
        for process in self.processes:
            process.start()

    def finish(self, seconds: float) -> LoadResult:
        outcomes = [self.results.get() for _ in self.processes]
        for process in self.processes:
            process.join()
        return LoadResult(
            throughput=sum(count for count, _, _ in outcomes) / seconds,
            worst_wait=max(worst for _, worst, _ in outcomes),
            p99_wait=max(p99 for _, _, p99 in outcomes),
        )

    def stop(self, seconds: float) -> LoadResult:
        self.stop_event.set()
        return self.finish(seconds)


def run_load(url: str, shape: str, hot: bool, users: int, seconds: float) -> LoadResult:
    return Clients(url, shape, hot, users, seconds).finish(seconds)


# --- measurements ------------------------------------------------------------------------


def concurrent_loads(
    plain: str, tracked: str, args
) -> tuple[list[tuple[str, list[float], list[float]]], list[tuple[int, float]]]:
    """Each load on both databases, interleaved; the tracked database is drained after each
    run, as the hourly drain would. Returns the throughputs and each drain's rows and time."""
    loads = [
        ("one multi-row INSERT per txn, 100k users", "multirow", False),
        ("same, 20 hot users", "multirow", True),
        ("ORM-style txns, 100k users", "orm", False),
        ("ORM-style txns, 20 hot users", "orm", True),
    ]
    rows, drains = [], []
    config = make_config(tracked)
    engine = create_engine(tracked)
    for label, shape, hot in loads:
        without, with_tracking = [], []
        for _round in range(args.rounds):
            without.append(run_load(plain, shape, hot, args.users, args.seconds).throughput)
            with_tracking.append(run_load(tracked, shape, hot, args.users, args.seconds).throughput)
            update = update_rollup(engine, config)
            drains.append((update.rows, update.seconds))
        rows.append((label, without, with_tracking))
        print(
            f"  {label}: {statistics.median(without):.0f} -> "
            f"{statistics.median(with_tracking):.0f} txn/s",
            flush=True,
        )
    engine.dispose()
    return rows, drains


def time_single_rows(url: str, count: int, users: int) -> float:
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        started = time.perf_counter()
        for number in range(count):
            connection.execute(
                "INSERT INTO events (user_id, name, properties, created_at) "
                "VALUES (%s, 'dashboard.viewed', '{}', now())",
                (1 + number % users,),
            )
        return time.perf_counter() - started


def time_batch(url: str, rows: int, users: int) -> float:
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute("CHECKPOINT")
        started = time.perf_counter()
        connection.execute(BATCH_INSERT, {"users": users, "rows": rows})
        return time.perf_counter() - started


def insert_costs(scratch: Scratch, args) -> tuple[dict[str, tuple[list[float], list[float]]], str]:
    urls = {}
    for design in ("none", "append", "aggregate"):
        urls[design] = scratch.create(design, args.users)
        if design != "none":
            install(create_engine(urls[design]), make_config(urls[design]))
        if design == "aggregate":
            with psycopg.connect(libpq(urls[design]), autocommit=True) as connection:
                connection.execute(PRE_AGGREGATE)
    results: dict[str, tuple[list[float], list[float]]] = {d: ([], []) for d in urls}
    for _round in range(args.rounds):
        for design, url in urls.items():
            results[design][0].append(time_single_rows(url, args.single, args.users))
        for design, url in urls.items():
            results[design][1].append(time_batch(url, args.batch, args.users))
    for url in (urls["none"], urls["aggregate"]):
        scratch.names.remove(make_url(url).database)
        with psycopg.connect(libpq(scratch.server_url), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE "{make_url(url).database}" WITH (FORCE)')
    return results, urls["append"]


def capture_size(connection) -> tuple[int, int]:
    return connection.execute(
        "SELECT (SELECT count(*) FROM retention.activity_capture_0)"
        " + (SELECT count(*) FROM retention.activity_capture_1),"
        " pg_total_relation_size('retention.activity_capture_0')"
        " + pg_total_relation_size('retention.activity_capture_1')"
    ).fetchone()


def drain_throughput(url: str, rows: int, users: int) -> tuple[float, int]:
    """The worst case: `rows` rows spread at random over 30 days and `users` users, so almost
    every row is a key of its own, drained at once."""
    config, engine = make_config(url), create_engine(url)
    update_rollup(engine, config)
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute(BATCH_INSERT, {"users": users, "rows": rows})
    update = update_rollup(engine, config)
    engine.dispose()
    return update.rows / update.seconds, update.rows


def simulated_day(url: str, args) -> tuple[int, int, float]:
    """24 hours, each `--hour-seconds` of the hot ORM load, then the hourly drain; returns the
    capture's peak rows and bytes, and the longest drain."""
    config, engine = make_config(url), create_engine(url)
    peak_rows = peak_bytes = 0
    longest_drain = 0.0
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        for _hour in range(24):
            run_load(url, "orm", True, args.users, args.hour_seconds)
            rows, size = capture_size(connection)
            peak_rows, peak_bytes = max(peak_rows, rows), max(peak_bytes, size)
            started = time.perf_counter()
            update_rollup(engine, config)
            longest_drain = max(longest_drain, time.perf_counter() - started)
    engine.dispose()
    return peak_rows, peak_bytes, longest_drain


def build_history(url: str, events: int, users: int) -> None:
    sessions = events // 10
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute("DROP INDEX events_user_id_created_at_idx, events_created_at_idx")
        connection.execute(
            "INSERT INTO events (user_id, name, properties, created_at) "
            "SELECT 1 + (hashint4(g) & 2147483647) %% %(users)s, "
            "(ARRAY['project.created','report.exported','dashboard.viewed','invite.sent'])"
            "[1 + g %% 4], '{}'::jsonb, "
            "now() - interval '1 hour' - make_interval(secs => (hashint4(g + 7) & 2147483647) "
            "%% (90 * 86400)) FROM generate_series(1, %(rows)s) AS g",
            {"users": users, "rows": events},
        )
        connection.execute(
            "INSERT INTO sessions (user_id, created_at) "
            "SELECT 1 + (hashint4(g) & 2147483647) %% %(users)s, "
            "now() - interval '1 hour' - make_interval(secs => (hashint4(g + 3) & 2147483647) "
            "%% (90 * 86400)) FROM generate_series(1, %(rows)s) AS g",
            {"users": users, "rows": sessions},
        )
        connection.execute(APP_SCHEMA.replace("{schema}", "public"))
        connection.execute("VACUUM ANALYZE")


def cli(config_path: Path, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "retention_pipeline.cli", "--config", str(config_path), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def online_install(url: str, args, workdir: Path) -> dict[str, float | int]:
    """Install on a large history while clients insert; kill it after two day ranges, run it
    again; then kill a drain midway and drain everything."""
    print(f"  building {args.install_events:,} events ...", flush=True)
    build_history(url, args.install_events, args.users)
    config_path = write_config(workdir, url)
    clients = Clients(url, "orm", False, args.users, 3600, seed=100)
    time.sleep(2)
    started = time.perf_counter()
    first = cli(config_path, "db", "upgrade")
    for line in first.stdout:
        print(f"    {line.rstrip()}", flush=True)
        if "rollup rebuild 2/" in line:
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    print("    (killed with SIGKILL; running it again)", flush=True)
    second = cli(config_path, "db", "upgrade")
    for line in second.stdout:
        print(f"    {line.rstrip()}", flush=True)
    second.wait()
    install_seconds = time.perf_counter() - started
    time.sleep(args.hour_seconds)
    drain = cli(config_path, "db", "refresh")
    time.sleep(0.3)
    drain.send_signal(signal.SIGKILL)
    drain.wait()
    load = clients.stop(time.perf_counter() - started)
    update_rollup(create_engine(url), make_config(url))
    return {
        "install_seconds": install_seconds,
        "worst_wait": load.worst_wait,
        "p99_wait": load.p99_wait,
        "install_exit": second.returncode,
    }


def reconcile(url: str) -> tuple[int, int, int]:
    """Compare the rollup with the app tables user by user and day by day (events, sessions,
    and events by name); returns (user-days compared, mismatched user-days, mismatched
    actions)."""
    with psycopg.connect(libpq(url)) as connection:
        connection.execute("SET work_mem = '256MB'")
        tz = connection.execute("SELECT timezone FROM retention.tracking_state").fetchone()[0]
        compared, mismatched = connection.execute(
            """
            WITH e AS (
                SELECT user_id::text AS user_id, (created_at AT TIME ZONE %(tz)s)::date AS day,
                       count(*) AS n FROM events
                WHERE user_id IS NOT NULL AND isfinite(created_at) GROUP BY 1, 2),
            s AS (
                SELECT user_id::text AS user_id, (created_at AT TIME ZONE %(tz)s)::date AS day,
                       count(*) AS n FROM sessions WHERE isfinite(created_at) GROUP BY 1, 2),
            truth AS (
                SELECT user_id, day, coalesce(e.n, 0) AS events, coalesce(s.n, 0) AS sessions
                FROM e FULL JOIN s USING (user_id, day))
            SELECT count(*), count(*) FILTER (
                       WHERE r.user_id IS NULL OR t.user_id IS NULL
                          OR (r.event_count, r.session_count) <> (t.events, t.sessions))
            FROM truth AS t FULL JOIN retention.activity_daily AS r USING (user_id, day)""",
            {"tz": tz},
        ).fetchone()
        actions = connection.execute(
            """
            WITH truth AS (
                SELECT user_id::text AS user_id, (created_at AT TIME ZONE %(tz)s)::date AS day,
                       left(coalesce(nullif(name, ''), '(unnamed)'), 200) AS event_name,
                       count(*) AS n FROM events
                WHERE user_id IS NOT NULL AND isfinite(created_at) GROUP BY 1, 2, 3)
            SELECT count(*) FROM truth AS t
            FULL JOIN retention.action_daily AS r USING (user_id, day, event_name)
            WHERE r.user_id IS NULL OR t.user_id IS NULL OR r.event_count <> t.n""",
            {"tz": tz},
        ).fetchone()[0]
    return compared, mismatched, actions


def median_ratio(base: list[float], other: list[float]) -> float:
    return statistics.median(o / b for b, o in zip(base, other, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a server URL (databases are created there)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--single", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=300_000)
    parser.add_argument("--drain-rows", type=int, default=1_000_000)
    parser.add_argument("--hour-seconds", type=float, default=3)
    parser.add_argument("--install-events", type=int, default=10_000_000)
    args = parser.parse_args()
    scratch = Scratch(normalize_url(args.url))
    try:
        run(scratch, args)
    finally:
        scratch.drop_all()


def run(scratch: Scratch, args) -> None:
    print("concurrent loads (txn/s, median of rounds; without -> with tracking):", flush=True)
    plain = scratch.create("plain", args.users)
    tracked = scratch.create("tracked", args.users)
    install(create_engine(tracked), make_config(tracked))
    loads, drains = concurrent_loads(plain, tracked, args)

    print("single-row and batch inserts ...", flush=True)
    inserts, append_url = insert_costs(scratch, args)
    rate, drained = drain_throughput(append_url, args.drain_rows, args.users)
    print(f"  drain: {drained:,} rows at {rate:,.0f} rows/s", flush=True)

    print("simulated day ...", flush=True)
    peak_rows, peak_bytes, longest_drain = simulated_day(tracked, args)

    print("online install ...", flush=True)
    big = scratch.create("install", args.users)
    with tempfile.TemporaryDirectory() as workdir:
        online = online_install(big, args, Path(workdir))

    print()
    print("| load | no tracking | with capture | ratio (pairwise median) |")
    print("|---|---|---|---|")
    for label, without, with_tracking in loads:
        print(
            f"| {label} | {statistics.median(without):.0f} txn/s | "
            f"{statistics.median(with_tracking):.0f} txn/s | "
            f"{median_ratio(without, with_tracking):.2f} |"
        )
    print()
    print("| insert | no trigger | capture (shipped) | pre-aggregate per statement |")
    print("|---|---|---|---|")
    base_single = inserts["none"][0]
    single_ms = {d: 1000 * statistics.median(v[0]) / args.single for d, v in inserts.items()}
    print(
        f"| {args.single:,} single-row autocommit inserts | {single_ms['none']:.3f} ms | "
        f"{single_ms['append']:.3f} ms (x{median_ratio(base_single, inserts['append'][0]):.2f}) "
        f"| {single_ms['aggregate']:.3f} ms "
        f"(x{median_ratio(base_single, inserts['aggregate'][0]):.2f}) |"
    )
    base_batch = inserts["none"][1]
    batch = {d: statistics.median(v[1]) for d, v in inserts.items()}
    print(
        f"| one {args.batch:,}-row INSERT ... SELECT | {batch['none']:.2f} s | "
        f"{batch['append']:.2f} s (x{median_ratio(base_batch, inserts['append'][1]):.2f}) | "
        f"{batch['aggregate']:.2f} s (x{median_ratio(base_batch, inserts['aggregate'][1]):.2f}) |"
    )
    print()
    app_rows = sum(rows for rows, _ in drains)
    app_rate = app_rows / sum(seconds for _, seconds in drains)
    print(
        f"drain of what the loads wrote: {app_rows:,} rows in {len(drains)} drains at "
        f"{app_rate:,.0f} rows/s (largest drain {max(rows for rows, _ in drains):,} rows)"
    )
    print(
        f"drain, worst case ({drained:,} rows over 30 days and {args.users:,} users, nearly "
        f"every row a key of its own): {rate:,.0f} rows/s"
    )
    print(
        f"simulated day (24 x {args.hour_seconds:g} s of the hot ORM load, drained hourly): "
        f"capture peak {peak_rows:,} rows, {peak_bytes / 2**20:.1f} MiB; "
        f"longest drain {longest_drain:.2f} s"
    )
    print(
        f"install on {args.install_events:,} events with 4 clients inserting (killed after two "
        f"day ranges and run again, exit {online['install_exit']}): "
        f"{online['install_seconds']:.1f} s; longest app transaction "
        f"{online['worst_wait'] * 1000:.0f} ms, p99 {online['p99_wait'] * 1000:.0f} ms"
    )
    print()
    print("| database | user-days compared | mismatched user-days | mismatched actions |")
    print("|---|---|---|---|")
    for label, url in (
        ("concurrent loads + simulated day", tracked),
        ("single/batch + drain", append_url),
        ("online install + killed install + killed drain", big),
    ):
        compared, mismatched, actions = reconcile(url)
        print(f"| {label} | {compared:,} | {mismatched} | {actions} |")


if __name__ == "__main__":
    main()
