"""The rolled-forward build: the day's snapshot from the day before's and the rollup days
entering or leaving its windows, and when it may be used."""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import Connection, text

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


def in_lookback(at: str) -> str:
    """Whether the timestamp `at` falls in the last actions' lookback before the day's end."""
    return f"(({at} AT TIME ZONE :tz)::date > b.day - {LAST_ACTIONS_LOOKBACK_DAYS})"


def rolled_forward_sql(
    connection: Connection,
    config: RetentionConfig,
    tables: dict[str, ResolvedTable] | None = None,
) -> str:
    """The statement that inserts the day's snapshot of every user the day before's snapshot
    holds, from that row and the rollup days entering or leaving each window: the day itself,
    the day 7 days back (leaves the 7-day sums, enters the baseline), the day the baseline
    leaves, the day 28 days back, and the day's actions. No read of the history before."""
    names = AppNames(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    counted = counted_column(config)
    # A list is newest first. Anyone's list of the day before is kept, less the actions that
    # left the lookback (only its last, oldest, action need be looked at to know there are none).
    kept_before = f"""CASE
                   WHEN coalesce({in_lookback("(p.last_actions->-1->>'at')::timestamptz")}, true)
                       THEN p.last_actions
                   ELSE coalesce((
                       SELECT jsonb_agg(action ORDER BY position)
                       FROM jsonb_array_elements(p.last_actions)
                            WITH ORDINALITY AS listed(action, position)
                       WHERE {in_lookback("(action->>'at')::timestamptz")}
                   ), '[]'::jsonb)
               END"""
    # Every action of the day is newer than any the day before's list holds: a user who acted
    # on the day gets the day's actions, then those of the kept list not done again that day,
    # the first `:last_actions` of them. Plain JSON path calls: nothing re-sorted, no subquery run
    # per user.
    kept_actions = f"""CASE
                   WHEN t.user_id IS NULL THEN {kept_before}
                   ELSE jsonb_path_query_array(
                       t.actions || jsonb_path_query_array(
                           {kept_before}, '$[*] ? (!(@.name == $today[*]))',
                           jsonb_build_object('today', t.names)),
                       '$[0 to $last]',
                       jsonb_build_object('last', CAST(:last_actions AS integer) - 1))
               END"""
    return f"""
        WITH {BOUNDS},
        app_users AS (
            {app_users_sql(names)}
        ),
        previous AS (
            -- The bound value itself, not the bounds' column: only then does PostgreSQL read the
            -- day before's partition alone instead of every day's.
            SELECT p.* FROM {s}.user_activity_snapshot AS p
            WHERE p.partition_date = CAST(:day AS date) - 1
        ),
        todays_actions AS (
            -- Each user's actions of the day, newest first, as the snapshot lists them.
            SELECT x.user_id, jsonb_agg(x.event_name) AS names,
                   jsonb_agg(jsonb_build_object('name', x.event_name, 'at', x.last_at)
                             ORDER BY x.last_at DESC, x.event_name) AS actions
            FROM {s}.action_daily AS x, bounds AS b
            WHERE x.day = b.day
            GROUP BY x.user_id
        ),
        window_edges AS (
            SELECT a.user_id,
                   max(greatest(a.last_event_at, a.last_session_at)) FILTER (WHERE a.day = b.day)
                       AS last_activity_today,
                   bool_or(a.day = b.day) AS active_today,
                   bool_or(a.day = b.day - 28) AS active_28_days_back,
                   coalesce(sum(a.event_count) FILTER (WHERE a.day = b.day), 0) AS events_today,
                   coalesce(sum(a.event_count) FILTER (WHERE a.day = b.day - 7), 0)
                       AS events_7_days_back,
                   coalesce(sum(a.{counted}) FILTER (WHERE a.day = b.day), 0)
                       AS sessions_today,
                   coalesce(sum(a.{counted}) FILTER (WHERE a.day = b.day - 7), 0)
                       AS sessions_7_days_back,
                   coalesce(sum(a.{counted}) FILTER (
                       WHERE a.day = b.day - 7 - 7 * CAST(:baseline_weeks AS integer)), 0)
                       AS sessions_leaving_baseline
            FROM {s}.activity_daily AS a, bounds AS b
            WHERE a.day = ANY(ARRAY[b.day, b.day - 7, b.day - 28,
                                    b.day - 7 - 7 * CAST(:baseline_weeks AS integer)])
            GROUP BY a.user_id
        ),
        subscription AS (
            {subscription_sql(names)}
        )
        {insert_snapshot(s)}
        SELECT b.day, u.user_id, u.email, u.name, u.timezone, u.signed_up_at,
               b.day - (u.signed_up_at AT TIME ZONE :tz)::date,
               greatest(p.last_activity_at, e.last_activity_today), p.last_activity_at,
               coalesce(e.active_today, false),
               {kept_actions},
               p.events_7d + coalesce(e.events_today - e.events_7_days_back, 0),
               p.sessions_7d + coalesce(e.sessions_today - e.sessions_7_days_back, 0),
               p.baseline_sessions
                   + coalesce(e.sessions_7_days_back - e.sessions_leaving_baseline, 0),
               round((p.baseline_sessions
                      + coalesce(e.sessions_7_days_back - e.sessions_leaving_baseline, 0))::numeric
                     / CAST(:baseline_weeks AS integer), 2),
               p.active_days_28d + coalesce(e.active_today::integer
                                            - e.active_28_days_back::integer, 0),
               sub.status, sub.plan, sub.monthly_amount_cents, sub.currency
        FROM app_users AS u
        JOIN previous AS p USING (user_id)
        CROSS JOIN bounds AS b
        LEFT JOIN window_edges AS e USING (user_id)
        LEFT JOIN todays_actions AS t USING (user_id)
        LEFT JOIN subscription AS sub USING (user_id)"""


def users_new_to_the_day_before_sql(
    connection: Connection,
    config: RetentionConfig,
    tables: dict[str, ResolvedTable] | None = None,
) -> str:
    names = AppNames(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    return f"""
        WITH {BOUNDS},
        app_users AS (
            {app_users_sql(names)}
        )
        SELECT u.user_id FROM app_users AS u
        WHERE NOT EXISTS (SELECT FROM {s}.user_activity_snapshot AS p
                          WHERE p.partition_date = CAST(:day AS date) - 1
                            AND p.user_id = u.user_id)"""


def full_build_reason(connection: Connection, config: RetentionConfig, day: date) -> str | None:
    """Why the snapshot of `day` cannot be rolled forward from the day before's, or None."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    before = day - timedelta(days=1)
    built = connection.execute(
        text(f"""
            SELECT built_at, timezone, baseline_weeks, last_actions, counted
            FROM {s}.snapshot_builds WHERE partition_date = :before"""),
        {"before": before},
    ).first()
    if built is None:
        return f"no snapshot of {before} to roll forward"
    settings = (config.timezone, config.activity.baseline_weeks, config.activity.last_actions)
    if (built.timezone, built.baseline_weeks, built.last_actions) != settings:
        return (
            f"the snapshot of {before} was built with another timezone, "
            "activity.baseline_weeks or activity.last_actions"
        )
    if built.counted != config.counted_use:
        return (
            f"the snapshot of {before} counted {built.counted}, and activity.baseline now "
            f"counts {config.counted_use}"
        )
    late = connection.execute(
        text(f"""
            SELECT min(day) FROM {s}.late_activity
            WHERE day <= :before AND noticed_at > :built_at"""),
        {"before": before, "built_at": built.built_at},
    ).scalar()
    if late is not None:
        return f"activity of {late} arrived after the snapshot of {before} was built"
    return None
