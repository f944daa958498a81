"""What the rollup holds, and whether it agrees with the app's tables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.tracking.sql import CAPTURE_TABLES
from retention_pipeline.tracking.state import tracking_sql


@dataclass(frozen=True)
class RollupStatus:
    mode: str
    timezone: str
    rows: int
    users: int
    first_day: date | None
    last_day: date | None


def rollup_status(connection: Connection, schema: str) -> RollupStatus:
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    row = connection.execute(
        text(f"""
        SELECT state.mode, state.timezone, rollup.rows, rollup.users, rollup.first_day,
               rollup.last_day
        FROM {s}.tracking_state AS state,
             (SELECT count(*) AS rows, count(DISTINCT user_id) AS users,
                     min(day) AS first_day, max(day) AS last_day
              FROM {s}.activity_daily) AS rollup""")
    ).one()
    return RollupStatus(*row)


@dataclass(frozen=True)
class DayReconciliation:
    day: date
    app_events: int
    tracked_events: int
    app_sessions: int
    tracked_sessions: int

    @property
    def matches(self) -> bool:
        return (self.app_events, self.app_sessions) == (self.tracked_events, self.tracked_sessions)


def reconcile_last_day(connection: Connection, config: RetentionConfig) -> DayReconciliation:
    """The app's events and sessions of the last complete day, against the rollup plus the
    capture not yet folded, in one snapshot. Counted for known users only: rows of unknown or
    erased users are not the rollup's concern. An event deleted in the app after it was counted
    shows here as a difference."""
    sql = tracking_sql(connection, config)
    preparer = connection.dialect.identifier_preparer
    s = sql.q_schema
    known = (
        f"EXISTS (SELECT FROM {sql.table_name(sql.users)} AS u "
        f"WHERE {sql.users.column_sql('id', 'u', preparer)}::text = r.user_id)"
    )
    in_day = "{at} >= (SELECT lower FROM bounds) AND {at} < (SELECT upper FROM bounds)"
    app = " UNION ALL ".join(
        sql.captured_rows(kind, sql.table_name(sql.tracked_table(kind)), in_day)
        for kind in ("events", "sessions")
    )
    captured = " UNION ALL ".join(
        f"SELECT kind, user_id FROM {s}.{table} AS r "
        "WHERE at >= (SELECT lower FROM bounds) AND at < (SELECT upper FROM bounds)"
        for table in CAPTURE_TABLES
    )
    row = connection.execute(
        text(f"""
            WITH bounds AS (
                SELECT day, day::timestamp AT TIME ZONE :tz AS lower,
                       (day + 1)::timestamp AT TIME ZONE :tz AS upper
                FROM (SELECT (now() AT TIME ZONE :tz)::date - 1 AS day) AS yesterday
            ),
            app AS (SELECT kind, count(*) AS n FROM ({app}) AS r WHERE {known} GROUP BY kind),
            captured AS (
                SELECT kind, count(*) AS n FROM ({captured}) AS r WHERE {known} GROUP BY kind
            ),
            rolled AS (
                SELECT coalesce(sum(event_count), 0) AS events,
                       coalesce(sum(session_count), 0) AS sessions
                FROM {s}.activity_daily AS r
                WHERE day = (SELECT day FROM bounds) AND {known}
            )
            SELECT (SELECT day FROM bounds),
                   coalesce((SELECT n FROM app WHERE kind = 'e'), 0),
                   (SELECT events FROM rolled)
                       + coalesce((SELECT n FROM captured WHERE kind = 'e'), 0),
                   coalesce((SELECT n FROM app WHERE kind = 's'), 0),
                   (SELECT sessions FROM rolled)
                       + coalesce((SELECT n FROM captured WHERE kind = 's'), 0)"""),
        {"tz": config.timezone},
    ).one()
    return DayReconciliation(*row)
