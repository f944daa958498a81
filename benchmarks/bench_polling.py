"""Polling under an app's load: nothing lost or counted twice across drains, late rows, rows
committed long after their time, and drains SIGKILLed in the middle of their poll.

4 client processes insert comments for `--seconds` (a polled source: `capture: polling`, as a
view or an app allowing no trigger is read). Of their rows, most are stamped with the time of
the insert, a tenth hours late (an import, a mobile client syncing), and every client holds
some transactions open for a second before committing, so rows appear after later-stamped
ones were already polled. Meanwhile drains run one after another in processes of their own;
the first and every `KILL_EVERY`th after it is SIGKILLed in the middle of its poll, alternately
before its read and after its fold into the rollup (held there by a lock on `polled_rows`, and
seen waiting in `pg_stat_activity`: the kill is known to have landed). After the load, two more
drains; then each user-day's count in the rollup is compared with the app's rows: rows the
rollup lacks are lost, rows it has too many are doubled.

    python -m benchmarks polling [--url URL] [--seconds S]
"""

from __future__ import annotations

import copy
import multiprocessing
import random
import subprocess
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
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT, drain_command, kill_mid_poll

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
# Where a killed drain stops (`kill_mid_poll`): at the poll's read of what it counted, and after
# its fold into the rollup, before its record of the rows it counted.
KILL_POINTS = ("ACCESS EXCLUSIVE", "SHARE")
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
    raw = copy.deepcopy(SHIPPED_DOCUMENT)
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


def _drain(url: str, config_path: Path) -> None:
    """One drain in a process of its own, as the hourly schedule runs it."""
    worker = subprocess.run(drain_command(url, config_path), capture_output=True, text=True)
    if worker.returncode != 0:
        raise RuntimeError(f"a drain failed: {worker.stderr.strip().splitlines()[-1:]}")


def measure(scratch: Scratch, seconds: float) -> PollingFigures:
    url = scratch.create("polling", USERS)
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute(COMMENTS)
    raw = document(url)
    engine = create_engine(url)
    install(engine, parse_config(raw, environ={}))
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
            if drains % KILL_EVERY:
                _drain(url, config_path)
            else:  # the first, and every KILL_EVERYth after it
                kill_mid_poll(engine, url, config_path, KILL_POINTS[killed % len(KILL_POINTS)])
                killed += 1
            drains += 1
        for client in clients:
            client.join()
        for _last in range(2):
            _drain(url, config_path)
    engine.dispose()
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
        f"{HELD_OPEN_SHARE:.1%} of the transactions held open for a second before their "
        f"commit), drains one after another meanwhile, the first and one in {KILL_EVERY} "
        "after it SIGKILLed in its poll (alternately before its read and after its fold into "
        "the rollup); two drains after the load; each user-day's count in the rollup against "
        "the app's rows (`benchmarks/bench_polling.py`).",
        "",
        "| rows | drains | killed mid-poll | lost | doubled |",
        "|---|---|---|---|---|",
        f"| {figures.rows:,} | {figures.drains} | {figures.killed_mid_poll} | {figures.lost} | "
        f"{figures.doubled} |",
    ]
