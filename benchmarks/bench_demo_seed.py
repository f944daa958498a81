"""Time seed_demo on a scratch database.

    python benchmarks/bench_demo_seed.py \
        --url postgresql+psycopg://postgres@127.0.0.1:5432/postgres --users 1000000 --days 90

--url points at any database of the server (it is only used to create and drop the scratch one).
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa

from retention_pipeline.demo import seed_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of the PostgreSQL server")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    admin_url = sa.make_url(args.url)
    scratch = f"bench_demo_seed_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{scratch}"')
    engine = sa.create_engine(admin_url.set(database=scratch))
    try:
        end = datetime(2025, 6, 1, 12, tzinfo=UTC)
        started = time.perf_counter()
        with engine.begin() as connection:
            summary = seed_demo(
                connection, users=args.users, days=args.days, seed=args.seed, end=end
            )
        elapsed = time.perf_counter() - started
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE "{scratch}"')
        admin.dispose()

    rows = summary.users + summary.events + summary.sessions + summary.subscriptions
    print(f"users={summary.users} days={args.days}")
    print(
        f"events={summary.events} sessions={summary.sessions} subscriptions={summary.subscriptions}"
    )
    print("habits=" + " ".join(f"{habit}:{count}" for habit, count in summary.habits.items()))
    print(f"elapsed={elapsed:.1f}s rows={rows} rows_per_s={rows / elapsed:,.0f}")


if __name__ == "__main__":
    main()
