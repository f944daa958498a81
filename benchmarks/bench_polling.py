"""Polling under an app's load: nothing lost or counted twice across drains, late rows, rows
committed long after their time, and drains SIGKILLed in the middle of their poll.

4 client processes insert comments for `--seconds` (a polled source: `capture: polling`, as a
view or an app allowing no trigger is read). Of their rows, most are stamped with the time of
the insert, a tenth hours late (an import, a mobile client syncing), and every client holds
some transactions open for a second before committing, so rows appear after later-stamped
ones were already polled. Meanwhile drains run one after another in processes of their own;
every `KILL_EVERY`th is SIGKILLed while its poll's statement runs (seen in `pg_stat_activity`,
so the kill is known to have landed mid-poll). After the load, two more drains; then each
user-day's count in the rollup is compared with the app's rows: rows the rollup lacks are lost,
rows it has too many are doubled.

    python -m benchmarks polling [--url URL] [--seconds S]
"""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import psycopg
import yaml
from sqlalchemy import create_engine

from benchmarks.bench_capture import CLIENTS, Scratch, libpq
from retention_pipeline.config.loader import parse_config
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT

USERS = 1000
COMMENTS = (
    "CREATE TABLE comments (id bigserial PRIMARY KEY, author integer, created_at timestamptz)"
)
SOURCE = {
    "table": "comments",
    "user": "author",
    "at": "created_at",
    "action": "comment.posted",
    "capture": "polling",
}
LATE_SHARE = 0.1
HELD_OPEN_SHARE = 0.005
KILL_EVERY = 3
# The poll's own statement: the one that reads the source's new rows.
POLL_STATEMENT = "polled_now"
# Each user-day's comments against the rollup's count of them.
COMPARISON = """
    WITH app AS (
        SELECT author::text AS user_id, (created_at AT TIME ZONE 'UTC')::date AS day,
               count(*) AS n
        FROM comments GROUP BY 1, 2
    ),
    rollup AS (SELECT user_id, day, event_count AS n FROM retention.activity_daily)
    SELECT coalesce(sum(greatest(coalesce(app.n, 0) - coalesce(rollup.n, 0), 0)), 0),
           coalesce(sum(greatest(coalesce(rollup.n, 0) - coalesce(app.n, 0), 0)), 0),
           (SELECT count(*) FROM comments)
    FROM app FULL JOIN rollup USING (user_id, day)"""


def document(url: str) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(SHIPPED_DOCUMENT))
    raw["database"]["tables"].pop("events")
    raw["database"]["tables"].pop("sessions")
    raw["database"].update(url=url, activity=[SOURCE])
    return raw


def _client(url: str, seconds: float, seed: int) -> None:
    """Inserts of 1 to 5 rows, one transaction each, until the deadline."""
    rng = random.Random(seed)
    with psycopg.connect(libpq(url)) as connection:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            late = "random() * interval '6 hours'" if rng.random() < LATE_SHARE else "interval '0'"
            connection.execute(
                "INSERT INTO comments (author, created_at) "
                f"SELECT 1 + (random() * %s)::int, clock_timestamp() - {late} "
                "FROM generate_series(1, 1 + (random() * 4)::int)",
                (USERS - 1,),
            )
            if rng.random() < HELD_OPEN_SHARE:
                time.sleep(1.0)  # stamped before, seen by drains only after
            connection.commit()


@dataclass
class PollingFigures:
    seconds: float
    rows: int
    drains: int
    killed_mid_poll: int
    lost: int
    doubled: int


def _drain(url: str, config_path: Path, kill: bool) -> bool:
    """One drain in a process of its own; with `kill`, SIGKILLed while its poll's statement
    runs. Returns whether a kill landed mid-poll."""
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "retention_pipeline_tests.tracking_worker",
            "drain",
            url,
            str(config_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if not kill:
        _, error = worker.communicate()
        if worker.returncode != 0:
            raise RuntimeError(f"a drain failed: {error.decode().strip().splitlines()[-1:]}")
        return False
    with psycopg.connect(libpq(url), autocommit=True) as watcher:
        while worker.poll() is None:
            polling = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE %s",
                (f"%{POLL_STATEMENT}%",),
            ).fetchone()[0]
            if polling:
                worker.kill()
                worker.wait()
                return True
            time.sleep(0.002)
    return False


def measure(scratch: Scratch, seconds: float) -> PollingFigures:
    url = scratch.create("polling", USERS)
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute(COMMENTS)
    raw = document(url)
    engine = create_engine(url)
    install(engine, parse_config(raw, environ={}))
    engine.dispose()
    clients = [
        multiprocessing.Process(target=_client, args=(url, seconds, seed))
        for seed in range(CLIENTS)
    ]
    drains = killed = 0
    with TemporaryDirectory(prefix="retention-polling-") as directory:
        config_path = Path(directory) / "retention.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        for client in clients:
            client.start()
        while any(client.is_alive() for client in clients):
            drains += 1
            killed += _drain(url, config_path, kill=drains % KILL_EVERY == 0)
        for client in clients:
            client.join()
        for _last in range(2):
            _drain(url, config_path, kill=False)
    with psycopg.connect(libpq(url)) as connection:
        lost, doubled, rows = connection.execute(COMPARISON).fetchone()
    scratch.drop(url)
    return PollingFigures(seconds, rows, drains, killed, int(lost), int(doubled))


def target_row(figures: PollingFigures) -> list[str]:
    """The row of `python -m benchmarks run`'s targets table."""
    met = figures.lost == figures.doubled == 0 and figures.killed_mid_poll > 0
    return [
        "sources",
        "polling: rows lost or doubled across drains, late rows and drains killed mid-poll",
        f"{figures.lost} lost, {figures.doubled} doubled of {figures.rows:,} "
        f"({figures.killed_mid_poll} drain(s) killed mid-poll)",
        "0 lost, 0 doubled",
        "met" if met else "**not met**",
    ]


def render(figures: PollingFigures) -> list[str]:
    return [
        "## Polling",
        "",
        f"{CLIENTS} client processes inserting comments into a polled source for "
        f"{figures.seconds:g} s ({LATE_SHARE:.0%} of the rows stamped up to 6 hours late, "
        f"{HELD_OPEN_SHARE:.0%} of the transactions held open for a second before their "
        f"commit), drains one after another meanwhile, one in {KILL_EVERY} SIGKILLed while "
        "its poll's statement ran; two drains after the load; each user-day's count in the "
        "rollup against the app's rows (`benchmarks/bench_polling.py`).",
        "",
        "| rows | drains | killed mid-poll | lost | doubled |",
        "|---|---|---|---|---|",
        f"| {figures.rows:,} | {figures.drains} | {figures.killed_mid_poll} | {figures.lost} | "
        f"{figures.doubled} |",
    ]
