"""Cost of activity tracking on the app's inserts, side by side in one run.

For each design (no trigger, row-level trigger, the shipped statement-level trigger) it times
single-row inserts committed one by one, as an app makes them, and one batched INSERT ... SELECT.

    python benchmarks/bench_triggers.py --url postgresql://postgres@127.0.0.1:5432/postgres \
        --single 5000 --batch 1000000
"""

from __future__ import annotations

import argparse
import time
import uuid

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.config.loader import project_root
from retention_pipeline.database.connection import normalize_url
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config

APP_SCHEMA = (project_root() / "retention_pipeline" / "demo" / "schema.sql").read_text()

# The alternative design, kept here only to be measured against the shipped one.
ROW_LEVEL = """
CREATE OR REPLACE FUNCTION retention.track_events_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    tz text;
    d date;
BEGIN
    IF NEW.user_id IS NULL OR NEW.created_at IS NULL OR NOT isfinite(NEW.created_at) THEN
        RETURN NULL;
    END IF;
    SELECT timezone INTO tz FROM retention.tracking_state;
    d := (NEW.created_at AT TIME ZONE tz)::date;
    INSERT INTO retention.action_daily AS t (user_id, day, event_name, event_count, last_at)
    VALUES (NEW.user_id::text, d, left(coalesce(nullif(NEW.name, ''), '(unnamed)'), 200), 1,
            NEW.created_at)
    ON CONFLICT (user_id, day, event_name) DO UPDATE
    SET event_count = t.event_count + 1, last_at = greatest(t.last_at, EXCLUDED.last_at);
    INSERT INTO retention.activity_daily AS t (user_id, day, event_count, last_event_at)
    VALUES (NEW.user_id::text, d, 1, NEW.created_at)
    ON CONFLICT (user_id, day) DO UPDATE
    SET event_count = t.event_count + 1,
        last_event_at = greatest(t.last_event_at, EXCLUDED.last_event_at);
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'retention-pipeline: activity tracking skipped a row: %', SQLERRM;
    RETURN NULL;
END
$body$;
DROP TRIGGER IF EXISTS retention_track_activity ON public.events;
CREATE TRIGGER retention_track_activity AFTER INSERT ON public.events
FOR EACH ROW EXECUTE FUNCTION retention.track_events_row();
"""

BATCH_INSERT = """
INSERT INTO events (user_id, name, properties, created_at)
SELECT 1 + (hashint4(g) & 2147483647) %% %(users)s,
       (ARRAY['project.created','report.exported','dashboard.viewed','invite.sent'])[1 + g %% 4],
       '{}'::jsonb,
       now() - make_interval(secs => (hashint4(g + 7) & 2147483647) %% (30 * 86400))
FROM generate_series(1, %(rows)s) AS g
"""


def prepare(server_url: str, design: str, users: int) -> str:
    name = f"bench_triggers_{design}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        _install(engine, url, design, users)
    except BaseException:
        engine.dispose()
        drop(server_url, url)
        raise
    engine.dispose()
    return url


def _install(engine, url: str, design: str, users: int) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql(APP_SCHEMA.replace("{schema}", "public"))
        connection.execute(
            text(
                "INSERT INTO users (email, created_at) SELECT 'u' || g || '@example.com', now() "
                "FROM generate_series(1, :users) AS g"
            ),
            {"users": users},
        )
        if design != "none":
            install(connection, make_config(url))
        if design == "row":
            connection.execute(text(ROW_LEVEL))


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


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
        started = time.perf_counter()
        connection.execute(BATCH_INSERT, {"users": users, "rows": rows})
        return time.perf_counter() - started


def drop(server_url: str, url: str) -> None:
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a server URL (databases are created there)")
    parser.add_argument("--single", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()
    server_url = normalize_url(args.url)
    results = {}
    for design in ("none", "row", "statement"):
        url = prepare(server_url, design, args.users)
        try:
            single = time_single_rows(url, args.single, args.users)
            batch = time_batch(url, args.batch, args.users)
        finally:
            drop(server_url, url)
        results[design] = (single, batch)
    base_single, base_batch = results["none"]
    print(f"{'design':<12}{'single-row inserts':>28}{'batched INSERT ... SELECT':>34}")
    for design, (single, batch) in results.items():
        print(
            f"{design:<12}{args.single / single:>12.0f} rows/s"
            f" {1000 * single / args.single:>6.3f} ms"
            f" x{single / base_single:<4.2f}"
            f"{batch:>12.2f} s for {args.batch:,} x{batch / base_batch:.2f}"
        )


if __name__ == "__main__":
    main()
