"""Who came back after each assignment, within each of the loop's windows, in SQL over the
activity rollup.

An assignment is an audience row (loop, day D, user), in every arm (treatment, holdout, and
withheld from a later step): intention to treat, so a treated user whose email bounced, failed
or was suppressed stays in the treatment. A simulated assignment (its day was built where no
email could go out, as in a backfill; see `audience.build`) is no experiment and gets no
outcome. The revenue still billed at the end of a window is kept with its currency: amounts of
different currencies are never added.
The user returned within a window of w days when the loop's success happened on one of the days
A .. A+w-1 (the rollup's days, in the loops' timezone) from the window's first day A: the day of
the due time the build gave the assignment (`first_due_at`), when its loop has due times (it
sends at each reader's local time, or has quiet hours: see `sending.due`), in every arm alike,
so the windows count from when the email went out (within the hour after it) or would have;
else D+1 (the email of day D goes out the morning after). Evaluated as of day P, a window with
A+w-1 > P is `pending`.

The evaluation of day P rewrites every assignment whose windows were still open the day before
(D >= P - longest window), so late rows reach them; an assignment evaluated as of a later day is
left alone, so re-running an old day never undoes what a newer one knew.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import psycopg
from sqlalchemy import Connection, Engine, text

from retention_pipeline.config.models import (
    EventSuccess,
    Loop,
    QuerySuccess,
    RetentionConfig,
)
from retention_pipeline.segments.calendar import DUE_LAG_DAYS
from retention_pipeline.segments.conditions import (
    ConditionError,
    read_only_cursor,
    single_select,
)

# Subscription statuses Stripe still bills: the revenue "still active" after a window.
BILLED_STATUSES = ("active", "past_due")
SUCCESS_QUERY_COLUMNS = ("user_id", "at")


@dataclass(frozen=True)
class OutcomeSummary:
    """What one evaluation wrote: assignments evaluated, and per window the count per status."""

    assignments: int
    by_window: dict[int, Counter]


def success_days(
    engine: Engine,
    schema: str,
    loop: Loop,
    success: QuerySuccess,
    day: date,
    timezone: str,
    lag_days: int = 0,
) -> list[tuple[str, date]]:
    """(user id, day) pairs on which the loop's success query says a user succeeded, among the
    days an evaluation of `day` looks at (`lag_days` more for a loop with due times:
    `evaluation_lag_days`); read-only, under the query's timeout."""
    where, subquery = _success_subquery(loop, success)
    zone = ZoneInfo(timezone)
    since = datetime.combine(
        day - timedelta(days=max(loop.window_days) - 1 + lag_days), time(), zone
    )
    until = datetime.combine(day + timedelta(days=1), time(), zone)
    with (
        engine.connect() as connection,
        read_only_cursor(connection, schema, loop, day, success.timeout, where) as cursor,
    ):
        _require_success_columns(cursor, subquery, where)
        # The bounds travel as settings: the user's SQL goes to the driver without parameters.
        cursor.execute(
            "SELECT set_config('retention.success_since', %s, true),"
            " set_config('retention.success_until', %s, true),"
            " set_config('retention.timezone', %s, true)",
            (since.isoformat(), until.isoformat(), timezone),
        )
        cursor.execute(f"""
            SELECT DISTINCT success.user_id::text, (success.at::timestamptz
                   AT TIME ZONE current_setting('retention.timezone'))::date
            FROM {subquery}
            WHERE success.user_id IS NOT NULL
              AND success.at >= current_setting('retention.success_since')::timestamptz
              AND success.at < current_setting('retention.success_until')::timestamptz""")
        return [(user, success_day) for user, success_day in cursor.fetchall()]


def check_success_query(
    engine: Engine, schema: str, loop: Loop, success: QuerySuccess, day: date
) -> None:
    """Run the loop's success query as an evaluation of `day` would, reading no row: a
    ConditionError naming the loop's `success.query` when it is not one SELECT, fails, or
    lacks a column the evaluation reads."""
    where, subquery = _success_subquery(loop, success)
    with (
        engine.connect() as connection,
        read_only_cursor(connection, schema, loop, day, success.timeout, where) as cursor,
    ):
        _require_success_columns(cursor, subquery, where)


def _success_subquery(loop: Loop, success: QuerySuccess) -> tuple[str, str]:
    """The configuration key of the loop's success query, and the query as a subquery."""
    where = f"loops.{loop.name}.success.query"
    return where, f"(\n{single_select(success.query, where)}\n) AS success"


def _require_success_columns(cursor: psycopg.Cursor, subquery: str, where: str) -> None:
    cursor.execute(f"SELECT * FROM {subquery} LIMIT 0")
    columns = [column.name for column in cursor.description]
    missing = [name for name in SUCCESS_QUERY_COLUMNS if name not in columns]
    if missing:
        raise ConditionError(
            f"{where}: returns no {missing[0]} column (it must return user_id and at, "
            f"when the user succeeded; got {', '.join(columns) or 'none'})"
        )


def evaluation_lag_days(config: RetentionConfig, loop: Loop) -> int:
    """How many days further back than its longest window an evaluation of the loop re-reads
    assignments: `DUE_LAG_DAYS` for a loop with due times, none for one sending after its run."""
    return DUE_LAG_DAYS if config.sends_on_due_times(loop) else 0


def evaluate_outcomes(
    connection: Connection,
    *,
    config: RetentionConfig,
    loop: Loop,
    day: date,
    successes: list[tuple[str, date]] | None = None,
) -> OutcomeSummary:
    """Rewrite the outcomes of the loop's assignments still open as of `day`, in the caller's
    transaction. `successes` are the (user id, day) pairs of a success query (`success_days`),
    read beforehand in a read-only transaction of their own."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    success = loop.success
    params = {
        "loop": loop.name,
        "day": day,
        "longest": max(loop.window_days),
        "lag": evaluation_lag_days(config, loop),
        "tz": config.timezone,
        "windows": loop.window_days,
        "billed": list(BILLED_STATUSES),
    }
    if isinstance(success, QuerySuccess):
        connection.execute(
            text(
                "CREATE TEMP TABLE success_days (user_id text NOT NULL, day date NOT NULL) "
                "ON COMMIT DROP"
            )
        )
        connection.execute(
            text(
                "INSERT INTO success_days SELECT * FROM unnest(CAST(:users AS text[]), "
                "CAST(:days AS date[]))"
            ),
            {
                "users": [user for user, _ in successes or []],
                "days": [success_day for _, success_day in successes or []],
            },
        )
        returns = "success_days"
    elif isinstance(success, EventSuccess):
        returns = (
            f"(SELECT user_id, day FROM {s}.action_daily "
            "WHERE event_name = ANY(CAST(:events AS text[])))"
        )
        params["events"] = success.events
    else:
        returns = f"{s}.activity_daily"
    connection.execute(
        text(f"""
            DELETE FROM {s}.reengagement_outcomes
            WHERE loop_name = :loop AND partition_date BETWEEN :day - :longest - :lag AND :day
              AND evaluated_through <= :day"""),
        params,
    )
    written = connection.execute(
        text(f"""
        WITH anchored AS (
            SELECT a.*,
                   coalesce(CAST(a.first_due_at AT TIME ZONE :tz AS date), a.partition_date + 1)
                       AS first_day
            FROM {s}.reengagement_audience AS a
            WHERE a.loop_name = :loop
              AND a.partition_date BETWEEN :day - :longest - :lag AND :day
        ),
        assigned AS (
            SELECT a.partition_date, a.user_id, a.episode_start, a.step, a.arm, a.variant,
                   a.first_day,
                   least(CAST(:day AS date), a.first_day - 1 + :longest) AS through
            FROM anchored AS a
            WHERE NOT a.simulated
              AND NOT EXISTS (
                  SELECT FROM {s}.reengagement_outcomes AS newer
                  WHERE newer.loop_name = :loop AND newer.partition_date = a.partition_date
                    AND newer.user_id = a.user_id)
        ),
        first_return AS (
            SELECT a.partition_date, a.user_id, min(r.day) AS returned_on
            FROM assigned AS a
            JOIN {returns} AS r
              ON r.user_id = a.user_id AND r.day >= a.first_day AND r.day <= a.through
            GROUP BY a.partition_date, a.user_id
        )
        INSERT INTO {s}.reengagement_outcomes (loop_name, partition_date, user_id, window_days,
            episode_start, step, arm, variant, emailed, status, returned_on,
            active_revenue_cents, revenue_currency, evaluated_through, window_ends_on)
        SELECT :loop, a.partition_date, a.user_id, w.days, a.episode_start, a.step, a.arm,
               a.variant,
               EXISTS (SELECT FROM {s}.email_send_log AS sent
                       WHERE sent.loop_name = :loop AND sent.user_id = a.user_id
                         AND sent.episode_start = a.episode_start AND sent.step = a.step
                         AND sent.status = 'sent'),
               CASE WHEN f.returned_on <= a.first_day - 1 + w.days THEN 'returned'
                    WHEN a.first_day - 1 + w.days <= :day THEN 'not_returned'
                    ELSE 'pending' END,
               CASE WHEN f.returned_on <= a.first_day - 1 + w.days THEN f.returned_on END,
               CASE WHEN snap.user_id IS NULL THEN NULL
                    WHEN snap.subscription_status = ANY(CAST(:billed AS text[]))
                        THEN snap.monthly_amount_cents
                    ELSE 0 END,
               CASE WHEN snap.subscription_status = ANY(CAST(:billed AS text[]))
                    THEN snap.subscription_currency END,
               a.through, a.first_day - 1 + w.days
        FROM assigned AS a
        CROSS JOIN unnest(CAST(:windows AS int[])) AS w(days)
        LEFT JOIN first_return AS f
            ON f.partition_date = a.partition_date AND f.user_id = a.user_id
        -- Looked up row by row (LIMIT 1 keeps PostgreSQL from making it a join): once
        -- `reengagement_audience` had statistics, it estimated hundreds of millions of rows
        -- and merged every kept day's snapshot, sorted on disk (55 s at 1M users, not 11 s).
        LEFT JOIN LATERAL (
            SELECT snap.user_id, snap.subscription_status, snap.monthly_amount_cents,
                   snap.subscription_currency
            FROM {s}.user_activity_snapshot AS snap
            WHERE a.first_day - 1 + w.days <= :day
              AND snap.partition_date = a.first_day - 1 + w.days AND snap.user_id = a.user_id
            LIMIT 1
        ) AS snap ON true
        RETURNING window_days, status, user_id, partition_date"""),
        params,
    ).all()
    by_window: dict[int, Counter] = {days: Counter() for days in loop.window_days}
    for window_days, status, _user, _day in written:
        by_window[window_days][status] += 1
    return OutcomeSummary(
        assignments=len({(user, assigned) for _, _, user, assigned in written}),
        by_window=by_window,
    )
