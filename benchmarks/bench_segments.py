"""Time and peak memory of one daily partition (snapshot + segments) at demo scale.

Creates a scratch database, seeds the demo history, installs (backfilling the rollup), then
materializes one partition of `user_activity_snapshot` and `engagement_segments` in a real
Dagster run in this process, and reports each phase's time and this process's peak RSS: the
work happens in PostgreSQL, so the Python side stays small whatever the number of events.

    python benchmarks/bench_segments.py --url postgresql://postgres@127.0.0.1:5432/postgres \
        --users 1000000 --days 90
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.database.connection import normalize_url
from retention_pipeline.defs.segments import engagement_segments, user_activity_snapshot
from retention_pipeline.demo import seed_demo
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config, write_config


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a server URL (a database is created there)")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    server_url = normalize_url(args.url)
    name = f"bench_segments_{uuid.uuid4().hex[:6]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    day = datetime.now(UTC).date() - timedelta(days=1)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
    try:
        started = time.perf_counter()
        with engine.begin() as connection:
            summary = seed_demo(
                connection, users=args.users, days=args.days, seed=args.seed, end=end
            )
        seeded = time.perf_counter()
        report = install(engine, make_config(url))
        installed = time.perf_counter()
        with engine.connect() as connection:
            connection.execute(text("ANALYZE"))
        rss_before = peak_rss_mib()
        with tempfile.TemporaryDirectory() as directory:
            database = AppDatabase(config_path=str(write_config(Path(directory), url)))
            run_started = time.perf_counter()
            result = dg.materialize(
                [user_activity_snapshot],
                partition_key=day.isoformat(),
                resources={"app_database": database},
            )
            snapshot_done = time.perf_counter()
            result_segments = dg.materialize(
                [engagement_segments],
                partition_key=day.isoformat(),
                resources={"app_database": database},
            )
            segments_done = time.perf_counter()
        assert result.success and result_segments.success
        print(f"demo: {summary}")
        print(
            f"seed {seeded - started:.1f}s; install + rollup backfill {installed - seeded:.1f}s "
            f"({report.rollup_rows:,} rollup rows)"
        )
        print(
            f"partition {day}: user_activity_snapshot {snapshot_done - run_started:.1f}s, "
            f"engagement_segments {segments_done - snapshot_done:.1f}s"
        )
        print(
            f"peak RSS of this process: {rss_before:.0f} MiB before the runs, "
            f"{peak_rss_mib():.0f} MiB after"
        )
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
