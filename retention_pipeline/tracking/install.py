"""Install, refresh and remove what the pipeline adds to the app database.

`install` validates the mapping, applies migrations, records the tracking timezone and mode,
installs the triggers and backfills the rollup, all in the caller's transaction: a failure at
any step leaves the database as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database import migrate
from retention_pipeline.database.app_tables import resolve_app_tables, table_sql
from retention_pipeline.tracking.sql import TrackingSql, trigger_name

TRACKED_KINDS = ("events", "sessions")


@dataclass(frozen=True)
class InstallReport:
    revision: str
    mode: str
    timezone: str
    backfilled: bool
    rollup_rows: int


def tracking_sql(connection: Connection, config: RetentionConfig) -> TrackingSql:
    resolved = resolve_app_tables(connection, config.database.tables)
    return TrackingSql(
        dialect=connection.dialect,
        schema=config.database.schema_,
        events=resolved["events"],
        sessions=resolved["sessions"],
    )


def _lock(connection: Connection, schema: str) -> None:
    # Two processes installing at once (say, two dagster runs) take turns.
    connection.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
        {"key": f"retention-pipeline:{schema}"},
    )


def _read_state(connection: Connection, sql: TrackingSql) -> dict | None:
    row = (
        connection.execute(
            text(f"SELECT timezone, mode, refreshed_through FROM {sql.q_schema}.tracking_state")
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


def tracked_timezone(connection: Connection, schema: str) -> str | None:
    """The timezone the rollup buckets days in."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return connection.execute(text(f"SELECT timezone FROM {s}.tracking_state")).scalar()


def install(connection: Connection, config: RetentionConfig) -> InstallReport:
    """Bring the pipeline's schema, triggers and rollup up to date with the configuration."""
    sql = tracking_sql(connection, config)
    _lock(connection, sql.schema)
    migrate.upgrade(connection, sql.schema)
    state = _read_state(connection, sql)
    mode, timezone = config.database.tracking, config.timezone
    connection.execute(
        text(f"""
            INSERT INTO {sql.q_schema}.tracking_state (timezone, mode) VALUES (:tz, :mode)
            ON CONFLICT (singleton) DO UPDATE SET timezone = :tz, mode = :mode"""),
        {"tz": timezone, "mode": mode},
    )
    for kind in TRACKED_KINDS:
        connection.execute(text(sql.drop_trigger(kind)))
        if mode == "triggers":
            connection.execute(text(sql.trigger_function(kind)))
            connection.execute(text(sql.create_trigger(kind)))
    # Day buckets depend on the timezone, and triggers only see rows inserted after they exist:
    # rebuild whenever the rollup may be missing rows or bucketed differently.
    needs_backfill = (
        state is None or state["timezone"] != timezone or (state["mode"] != mode == "triggers")
    )
    if needs_backfill:
        refresh(connection, sql, since=None)
    rows = connection.execute(text(f"SELECT count(*) FROM {sql.q_schema}.activity_daily")).scalar()
    return InstallReport(
        revision=migrate.head_revision(),
        mode=mode,
        timezone=timezone,
        backfilled=needs_backfill,
        rollup_rows=int(rows or 0),
    )


def refresh(connection: Connection, sql: TrackingSql, since: date | None) -> None:
    """Recompute the rollup from the app tables for every day from `since` (all days if None)."""
    s = sql.q_schema
    tz = f"(SELECT timezone FROM {s}.tracking_state)"
    if since is None:
        connection.execute(text(f"TRUNCATE {s}.activity_daily, {s}.action_daily"))
        events_filter = sessions_filter = day_filter = "TRUE"
    else:
        for table in ("activity_daily", "action_daily"):
            connection.execute(
                text(f"DELETE FROM {s}.{table} WHERE day >= :since"), {"since": since}
            )
        start = f"(CAST(:since AS date)::timestamp AT TIME ZONE {tz})"
        events_filter = f"{sql.timestamp(sql.events)} >= {start}"
        sessions_filter = f"{sql.timestamp(sql.sessions)} >= {start}"
        day_filter = "day >= :since"
    params = {} if since is None else {"since": since}
    for statement in sql.rebuild(events_filter, sessions_filter, day_filter, tz):
        connection.execute(text(statement), params)
    connection.execute(text(f"UPDATE {s}.tracking_state SET refreshed_through = now()"))


def refresh_from(connection: Connection, config: RetentionConfig, since: date) -> None:
    """Recompute the rollup from `since` on, in either mode: the repair for days the triggers
    skipped (see `tracking_errors`). App inserts into the tracked tables wait until it commits,
    so the triggers cannot add to days while they are being rebuilt."""
    sql = tracking_sql(connection, config)
    _lock(connection, sql.schema)
    if _read_state(connection, sql) is None:
        raise RuntimeError("the pipeline is not installed: run `retention-pipeline db upgrade`")
    for table in (sql.events, sql.sessions):
        connection.execute(text(f"LOCK TABLE {sql.table_name(table)} IN SHARE ROW EXCLUSIVE MODE"))
    refresh(connection, sql, since)


def refresh_incremental(connection: Connection, config: RetentionConfig) -> date | None:
    """Trigger-free mode: recompute from the day before the last refresh, so rows that arrived
    late (up to a day) are still counted. Returns the first recomputed day."""
    sql = tracking_sql(connection, config)
    _lock(connection, sql.schema)
    state = _read_state(connection, sql)
    if state is None:
        raise RuntimeError("the pipeline is not installed: run `retention-pipeline db upgrade`")
    since = _day_before(connection, state["refreshed_through"], state["timezone"])
    refresh(connection, sql, since)
    return since


def _day_before(connection: Connection, moment: datetime | None, timezone: str) -> date | None:
    if moment is None:
        return None
    return connection.execute(
        text("SELECT (CAST(:moment AS timestamptz) AT TIME ZONE :tz)::date - 1"),
        {"moment": moment, "tz": timezone},
    ).scalar_one()


def uninstall(connection: Connection, config: RetentionConfig) -> None:
    """Remove the triggers from the app tables and drop the pipeline's schema."""
    schema = config.database.schema_
    _lock(connection, schema)
    preparer = connection.dialect.identifier_preparer
    trigger = preparer.quote(trigger_name(schema))
    for _name, mapping in config.database.tables.items():
        table = table_sql(mapping, preparer)
        exists = connection.execute(
            text("SELECT to_regclass(:name) IS NOT NULL"), {"name": table}
        ).scalar()
        if exists:
            connection.execute(text(f"DROP TRIGGER IF EXISTS {trigger} ON {table}"))
    connection.execute(text(f"DROP SCHEMA IF EXISTS {preparer.quote_schema(schema)} CASCADE"))


@dataclass(frozen=True)
class RollupStatus:
    mode: str
    timezone: str
    rows: int
    users: int
    first_day: date | None
    last_day: date | None
    recent_errors: int
    last_error: str | None


def rollup_status(connection: Connection, schema: str) -> RollupStatus:
    """What the rollup holds, and how many tracking errors the last day saw."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    row = connection.execute(
        text(f"""
        SELECT state.mode, state.timezone, rollup.rows, rollup.users, rollup.first_day,
               rollup.last_day, errors.recent, errors.last_message
        FROM {s}.tracking_state AS state,
             (SELECT count(*) AS rows, count(DISTINCT user_id) AS users,
                     min(day) AS first_day, max(day) AS last_day
              FROM {s}.activity_daily) AS rollup,
             (SELECT count(*) AS recent,
                     (array_agg(sqlstate || ': ' || message ORDER BY id DESC))[1] AS last_message
              FROM {s}.tracking_errors
              WHERE occurred_at > now() - interval '1 day') AS errors""")
    ).one()
    return RollupStatus(*row)
