"""The full build: every user's snapshot of the day from the whole rollup up to it."""

from __future__ import annotations

from sqlalchemy import Connection

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import ResolvedTable, resolve_app_tables
from retention_pipeline.segments.snapshot.billing import subscription_sql
from retention_pipeline.segments.snapshot.statement import (
    BOUNDS,
    LAST_ACTIONS_LOOKBACK_DAYS,
    AppNames,
    app_users_sql,
    counted_column,
    insert_snapshot,
)

# Restricts a full build to the users of :only (those a rolled-forward build has no row for).
ONLY_THESE_USERS = "{} IN (SELECT unnest(CAST(:only AS text[])))"


def activity_figures(counted: str) -> str:
    """What the snapshot keeps of a user's rollup rows up to the day (`a`, bounds `b`); the
    session figures sum the rollup's column `counted` (`counted_column`)."""
    return f"""
                   max(greatest(a.last_event_at, a.last_session_at)) AS last_activity_at,
                   max(greatest(a.last_event_at, a.last_session_at))
                       FILTER (WHERE a.day < b.day) AS previous_activity_at,
                   bool_or(a.day = b.day) AS active_today,
                   coalesce(sum(a.event_count) FILTER (WHERE a.day > b.day - 7), 0) AS events_7d,
                   coalesce(sum(a.{counted}) FILTER (WHERE a.day > b.day - 7), 0) AS sessions_7d,
                   coalesce(sum(a.{counted}) FILTER (
                       WHERE a.day > b.day - 7 - 7 * CAST(:baseline_weeks AS integer)
                         AND a.day <= b.day - 7), 0) AS baseline_sessions,
                   count(*) FILTER (WHERE a.day > b.day - 28) AS active_days_28d"""


def _per_user(s: str, counted: str, only_listed_users: bool) -> tuple[str, str]:
    """The rollup's figures per user up to the day, and each user's actions in the lookback
    (once per action, at its latest), for every user or only for the users bound as :only. Those
    are read user by user through the primary keys: an aggregate per listed user, which the
    planner cannot turn into a scan of everyone's history."""
    actions_window = f"x.day <= b.day AND x.day > b.day - {LAST_ACTIONS_LOOKBACK_DAYS}"
    if not only_listed_users:
        return (
            f"""SELECT a.user_id, {activity_figures(counted)}
            FROM {s}.activity_daily AS a, bounds AS b
            WHERE a.day <= b.day
            GROUP BY a.user_id""",
            f"""SELECT x.user_id, x.event_name, max(x.last_at) AS last_at
            FROM {s}.action_daily AS x, bounds AS b
            WHERE {actions_window}
            GROUP BY x.user_id, x.event_name""",
        )
    listed = "unnest(CAST(:only AS text[])) AS listed(user_id) CROSS JOIN bounds AS b"
    return (
        f"""SELECT listed.user_id, figures.*
            FROM {listed}
            CROSS JOIN LATERAL (
                SELECT {activity_figures(counted)}
                FROM {s}.activity_daily AS a
                WHERE a.user_id = listed.user_id AND a.day <= b.day
            ) AS figures""",
        f"""SELECT listed.user_id, per_name.event_name, per_name.last_at
            FROM {listed}
            CROSS JOIN LATERAL (
                SELECT x.event_name, max(x.last_at) AS last_at
                FROM {s}.action_daily AS x
                WHERE x.user_id = listed.user_id AND {actions_window}
                GROUP BY x.event_name
            ) AS per_name""",
    )


def _latest_actions_sql(last_per_name: str) -> str:
    """Each user's `:last_actions` latest distinct actions as a JSON array, newest first, from
    a query giving (user_id, event_name, last_at) once per user and action."""
    return f"""
            SELECT ranked.user_id,
                   jsonb_agg(jsonb_build_object('name', ranked.event_name, 'at', ranked.last_at)
                             ORDER BY ranked.last_at DESC, ranked.event_name) AS last_actions
            FROM (
                SELECT per_name.*, row_number() OVER (
                           PARTITION BY per_name.user_id
                           ORDER BY per_name.last_at DESC, per_name.event_name) AS rank
                FROM ({last_per_name}) AS per_name
            ) AS ranked
            WHERE ranked.rank <= CAST(:last_actions AS integer)
            GROUP BY ranked.user_id"""


def app_reads_sql(connection: Connection, tables: dict[str, ResolvedTable]) -> dict[str, str]:
    """The snapshot's reads of the app tables as standalone SELECTs (same binds as the
    snapshot), for checking a mapping before the pipeline's schema exists."""
    names = AppNames(connection, tables)
    return {
        "users": f"WITH {BOUNDS} {app_users_sql(names)}",
        **({"subscriptions": subscription_sql(names)} if "subscriptions" in tables else {}),
    }


def snapshot_sql(
    connection: Connection,
    config: RetentionConfig,
    tables: dict[str, ResolvedTable] | None = None,
    *,
    only_listed_users: bool = False,
) -> str:
    """The statement that inserts the day's snapshot from the whole rollup up to the day, for
    every user or, with `only_listed_users`, for those bound as :only; `tables` resolves the
    mapping when None."""
    names = AppNames(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    only = ONLY_THESE_USERS if only_listed_users else ""
    activity, actions = _per_user(s, counted_column(config), only_listed_users)
    return f"""
        WITH {BOUNDS},
        app_users AS (
            {app_users_sql(names, only)}
        ),
        activity AS (
            {activity}
        ),
        recent_actions AS ({_latest_actions_sql(actions)}),
        subscription AS (
            {subscription_sql(names, only)}
        )
        {insert_snapshot(s)}
        SELECT b.day, u.user_id, u.email, u.name, u.timezone, u.signed_up_at,
               b.day - (u.signed_up_at AT TIME ZONE :tz)::date,
               act.last_activity_at, act.previous_activity_at, coalesce(act.active_today, false),
               coalesce(ra.last_actions, '[]'::jsonb),
               coalesce(act.events_7d, 0), coalesce(act.sessions_7d, 0),
               coalesce(act.baseline_sessions, 0),
               round(coalesce(act.baseline_sessions, 0)::numeric
                     / CAST(:baseline_weeks AS integer), 2),
               coalesce(act.active_days_28d, 0),
               sub.status, sub.plan, sub.monthly_amount_cents, sub.currency
        FROM app_users AS u
        CROSS JOIN bounds AS b
        LEFT JOIN activity AS act USING (user_id)
        LEFT JOIN recent_actions AS ra USING (user_id)
        LEFT JOIN subscription AS sub USING (user_id)"""
