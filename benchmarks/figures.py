"""What one partition is measured against: the same per-user figures as the snapshot, written by
one SQL statement the bare way (the floor: a 35-day window of the rollup plus an index probe for
users inactive longer) and the naive way (aggregating the raw events and sessions).

Both write every snapshot column but `last_actions` into a table of the `benchmark` schema; the
check `mismatches` counts the users whose figures differ from the pipeline's snapshot of the day.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import resolve_app_tables
from retention_pipeline.segments.snapshot.full import app_reads_sql

FIGURES = (
    "partition_date, user_id, email, name, timezone, signed_up_at, account_age_days, "
    "last_activity_at, previous_activity_at, active_today, events_7d, sessions_7d, "
    "baseline_sessions, baseline_sessions_per_week, active_days_28d, subscription_status, "
    "subscription_plan, monthly_amount_cents"
)
TABLES = ("floor_figures", "naive_figures")

BOUNDS = """bounds AS (
        SELECT CAST(:day AS date) AS day,
               (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz AS day_end
    )"""

# Same rounding and defaults as the snapshot's; `w` holds the window's figures.
SELECT_FIGURES = """b.day, u.user_id, u.email, u.name, u.timezone, u.signed_up_at,
           b.day - (u.signed_up_at AT TIME ZONE :tz)::date,
           {last_activity}, {previous_activity},
           coalesce(w.active_today, false), coalesce(w.events_7d, 0), coalesce(w.sessions_7d, 0),
           coalesce(w.baseline_sessions, 0),
           round(coalesce(w.baseline_sessions, 0)::numeric / CAST(:baseline_weeks AS integer), 2),
           coalesce(w.active_days_28d, 0),
           sub.status, sub.plan, sub.monthly_amount_cents"""

AGGREGATES = """max(greatest(a.last_event_at, a.last_session_at)) AS last_activity_at,
               max(greatest(a.last_event_at, a.last_session_at)) FILTER (WHERE a.day < b.day)
                   AS previous_activity_at,
               bool_or(a.day = b.day) AS active_today,
               sum(a.event_count) FILTER (WHERE a.day > b.day - 7) AS events_7d,
               sum(a.session_count) FILTER (WHERE a.day > b.day - 7) AS sessions_7d,
               sum(a.session_count) FILTER (
                   WHERE a.day > b.day - 7 - 7 * CAST(:baseline_weeks AS integer)
                     AND a.day <= b.day - 7) AS baseline_sessions,
               count(*) FILTER (WHERE a.day > b.day - 28) AS active_days_28d"""


def _schemas(connection: Connection, config: RetentionConfig) -> tuple[str, str]:
    preparer = connection.dialect.identifier_preparer
    return preparer.quote_schema(config.database.schema_), preparer.quote_schema("benchmark")


def _app_table(connection: Connection, config: RetentionConfig, name: str) -> str:
    """The demo app's table as mapped (its columns are the demo's own names)."""
    preparer = connection.dialect.identifier_preparer
    mapping = getattr(config.database.tables, name)
    return f"{preparer.quote_schema(mapping.schema_)}.{preparer.quote(mapping.table)}"


def create_figure_tables(connection: Connection, config: RetentionConfig) -> None:
    s, b = _schemas(connection, config)
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {b}"))
    for table in TABLES:
        connection.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {b}.{table} "
                f"(LIKE {s}.user_activity_snapshot INCLUDING DEFAULTS)"
            )
        )


def floor_sql(connection: Connection, config: RetentionConfig) -> str:
    """One statement: the window's aggregate, and for users with no activity in it before the
    day, the latest rollup row before it through the rollup's primary key."""
    s, b = _schemas(connection, config)
    reads = app_reads_sql(connection, resolve_app_tables(connection, config.database.tables))
    return f"""
    WITH {BOUNDS},
    app_users AS ({reads["users"]}),
    subscription AS ({reads["subscriptions"]}),
    w AS (
        SELECT a.user_id, {AGGREGATES}
        FROM {s}.activity_daily AS a, bounds AS b
        WHERE a.day > b.day - 7 - 7 * CAST(:baseline_weeks AS integer) AND a.day <= b.day
        GROUP BY a.user_id
    )
    INSERT INTO {b}.floor_figures ({FIGURES})
    SELECT {
        SELECT_FIGURES.format(
            last_activity="coalesce(w.last_activity_at, older.last_activity_at)",
            previous_activity="coalesce(w.previous_activity_at, older.last_activity_at)",
        )
    }
    FROM app_users AS u
    CROSS JOIN bounds AS b
    LEFT JOIN w USING (user_id)
    LEFT JOIN LATERAL (
        SELECT greatest(o.last_event_at, o.last_session_at) AS last_activity_at
        FROM {s}.activity_daily AS o
        WHERE w.previous_activity_at IS NULL AND o.user_id = u.user_id
          AND o.day <= b.day - 7 - 7 * CAST(:baseline_weeks AS integer)
        ORDER BY o.day DESC
        LIMIT 1
    ) AS older ON true
    LEFT JOIN subscription AS sub USING (user_id)"""


def naive_sql(connection: Connection, config: RetentionConfig) -> str:
    """One statement over the app's raw events and sessions up to the end of the day."""
    _, b = _schemas(connection, config)
    reads = app_reads_sql(connection, resolve_app_tables(connection, config.database.tables))
    per_day = """SELECT user_id::text AS user_id, (created_at AT TIME ZONE :tz)::date AS day,
                   count(*) AS n, max(created_at) AS last_at
            FROM {table}, bounds AS b
            WHERE user_id IS NOT NULL AND created_at < b.day_end
            GROUP BY 1, 2"""
    return f"""
    WITH {BOUNDS},
    app_users AS ({reads["users"]}),
    subscription AS ({reads["subscriptions"]}),
    a AS (
        SELECT coalesce(e.user_id, s.user_id) AS user_id, coalesce(e.day, s.day) AS day,
               coalesce(e.n, 0) AS event_count, coalesce(s.n, 0) AS session_count,
               e.last_at AS last_event_at, s.last_at AS last_session_at
        FROM ({per_day.format(table=_app_table(connection, config, "events"))}) AS e
        FULL JOIN ({per_day.format(table=_app_table(connection, config, "sessions"))}) AS s
            USING (user_id, day)
    ),
    w AS (
        SELECT a.user_id, {AGGREGATES}
        FROM a, bounds AS b
        GROUP BY a.user_id
    )
    INSERT INTO {b}.naive_figures ({FIGURES})
    SELECT {
        SELECT_FIGURES.format(
            last_activity="w.last_activity_at", previous_activity="w.previous_activity_at"
        )
    }
    FROM app_users AS u
    CROSS JOIN bounds AS b
    LEFT JOIN w USING (user_id)
    LEFT JOIN subscription AS sub USING (user_id)"""


def clear_sql(connection: Connection, table: str) -> str:
    """Run before each statement (untimed): each writes the day afresh."""
    b = connection.dialect.identifier_preparer.quote_schema("benchmark")
    return f"TRUNCATE {b}.{table}"


def mismatches(connection: Connection, config: RetentionConfig, table: str, day: object) -> int:
    """Users of the day whose figures in `table` differ from the snapshot's, or who are only in
    one of them."""
    s, b = _schemas(connection, config)
    columns = [column.strip() for column in FIGURES.split(",")]
    compared = ", ".join(f"x.{column}" for column in columns)
    return connection.execute(
        text(f"""
            SELECT count(*)
            FROM (SELECT {FIGURES} FROM {s}.user_activity_snapshot
                  WHERE partition_date = :day) AS x
            FULL JOIN (SELECT {FIGURES} FROM {b}.{table} WHERE partition_date = :day) AS y
                USING (user_id)
            WHERE ({compared}) IS DISTINCT FROM ({compared.replace("x.", "y.")})"""),
        {"day": day},
    ).scalar_one()
