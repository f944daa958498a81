"""Every user's activity as of the end of one day, computed in PostgreSQL from the rollup.

The rollup buckets days in the loop timezone, so "day <= D" is exactly "before the end of D":
nothing after the partition leaks in, and a backfill gives the rows the schedule would have.
Subscriptions are the app's current state (it keeps no history), so a backfill sees today's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import ResolvedTable, resolve_app_tables

# Distinct actions older than this are not worth naming in an email; the bound keeps the
# snapshot from re-reading a user's whole history every day.
LAST_ACTIONS_LOOKBACK_DAYS = 90
YEARLY_INTERVALS = ("year", "yearly", "annual", "annually")
WEEKLY_INTERVALS = ("week", "weekly")


@dataclass(frozen=True)
class SnapshotSummary:
    users: int
    active_today: int
    never_active: int
    leaked_rows: int


class _Names:
    """Quoted names of the mapped app tables and columns."""

    def __init__(self, connection: Connection, tables: dict[str, ResolvedTable]):
        self.preparer = connection.dialect.identifier_preparer
        self.tables = tables

    def table(self, name: str) -> str:
        return self.tables[name].sql_name(self.preparer)

    def column(self, name: str, key: str, alias: str) -> str:
        return self.tables[name].column_sql(key, alias, self.preparer)

    def timestamp(self, name: str, key: str, alias: str) -> str:
        return self.tables[name].timestamp_sql(key, alias, self.preparer)


BOUNDS = """bounds AS (
            SELECT CAST(:day AS date) AS day,
                   (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz AS day_end
        )"""


def _app_users_sql(names: _Names) -> str:
    return f"""SELECT {names.column("users", "id", "u")}::text AS user_id,
                   {names.column("users", "email", "u")}::text AS email,
                   {names.column("users", "name", "u")}::text AS name,
                   {names.column("users", "timezone", "u")}::text AS timezone,
                   {names.timestamp("users", "created_at", "u")} AS signed_up_at
            FROM {names.table("users")} AS u, bounds
            WHERE {names.timestamp("users", "created_at", "u")} < bounds.day_end"""


def _subscription_sql(names: _Names) -> str:
    subscriptions = names.tables["subscriptions"]
    amount = names.column("subscriptions", "amount_cents", "sub")
    status = names.column("subscriptions", "status", "sub")
    if subscriptions.maps("billing_interval"):
        interval = names.column("subscriptions", "billing_interval", "sub")
        monthly_amount = f"""CASE
                       WHEN lower({interval}::text) = ANY(CAST(:yearly AS text[]))
                           THEN round({amount} / 12.0)
                       WHEN lower({interval}::text) = ANY(CAST(:weekly AS text[]))
                           THEN round({amount} * 52 / 12.0)
                       ELSE {amount}
                   END"""
    else:  # no interval column: amounts are taken as monthly
        monthly_amount = amount
    # A live subscription describes the user better than an old canceled one, and among those
    # the latest change (when the app records one) wins.
    order = [f"({status}::text IN ('active', 'trialing', 'past_due')) DESC"]
    if subscriptions.maps("updated_at"):
        order.append(f"{names.timestamp('subscriptions', 'updated_at', 'sub')} DESC NULLS LAST")
    return f"""SELECT DISTINCT ON (1)
                   {names.column("subscriptions", "user_id", "sub")}::text AS user_id,
                   {status}::text AS status,
                   {names.column("subscriptions", "plan", "sub")}::text AS plan,
                   ({monthly_amount})::integer AS monthly_amount_cents
            FROM {names.table("subscriptions")} AS sub
            ORDER BY 1, {", ".join(order)}"""


def app_reads_sql(connection: Connection, tables: dict[str, ResolvedTable]) -> dict[str, str]:
    """The snapshot's reads of the app tables as standalone SELECTs (same binds as the
    snapshot), for checking a mapping before the pipeline's schema exists."""
    names = _Names(connection, tables)
    return {
        "users": f"WITH {BOUNDS} {_app_users_sql(names)}",
        "subscriptions": _subscription_sql(names),
    }


def snapshot_sql(
    connection: Connection, config: RetentionConfig, tables: dict[str, ResolvedTable] | None = None
) -> str:
    """The statement that inserts the day's snapshot; `tables` resolves the mapping when None."""
    names = _Names(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    return f"""
        WITH {BOUNDS},
        app_users AS (
            {_app_users_sql(names)}
        ),
        activity AS (
            SELECT a.user_id,
                   max(greatest(a.last_event_at, a.last_session_at)) AS last_activity_at,
                   max(greatest(a.last_event_at, a.last_session_at))
                       FILTER (WHERE a.day < b.day) AS previous_activity_at,
                   bool_or(a.day = b.day) AS active_today,
                   coalesce(sum(a.event_count) FILTER (WHERE a.day > b.day - 7), 0) AS events_7d,
                   coalesce(sum(a.session_count) FILTER (WHERE a.day > b.day - 7), 0)
                       AS sessions_7d,
                   coalesce(sum(a.session_count) FILTER (
                       WHERE a.day > b.day - 7 - 7 * CAST(:baseline_weeks AS integer)
                         AND a.day <= b.day - 7), 0) AS baseline_sessions,
                   count(*) FILTER (WHERE a.day > b.day - 28) AS active_days_28d
            FROM {s}.activity_daily AS a, bounds AS b
            WHERE a.day <= b.day
            GROUP BY a.user_id
        ),
        recent_actions AS (
            SELECT ranked.user_id,
                   jsonb_agg(jsonb_build_object('name', ranked.event_name, 'at', ranked.last_at)
                             ORDER BY ranked.last_at DESC, ranked.event_name) AS last_actions
            FROM (
                SELECT per_name.*, row_number() OVER (
                           PARTITION BY per_name.user_id
                           ORDER BY per_name.last_at DESC, per_name.event_name) AS rank
                FROM (
                    SELECT x.user_id, x.event_name, max(x.last_at) AS last_at
                    FROM {s}.action_daily AS x, bounds AS b
                    WHERE x.day <= b.day AND x.day > b.day - {LAST_ACTIONS_LOOKBACK_DAYS}
                    GROUP BY x.user_id, x.event_name
                ) AS per_name
            ) AS ranked
            WHERE ranked.rank <= CAST(:last_actions AS integer)
            GROUP BY ranked.user_id
        ),
        subscription AS (
            {_subscription_sql(names)}
        )
        INSERT INTO {s}.user_activity_snapshot (
            partition_date, user_id, email, name, timezone, signed_up_at, account_age_days,
            last_activity_at, previous_activity_at, active_today, last_actions, events_7d,
            sessions_7d, baseline_sessions_per_week, active_days_28d, subscription_status,
            subscription_plan, monthly_amount_cents)
        SELECT b.day, u.user_id, u.email, u.name, u.timezone, u.signed_up_at,
               b.day - (u.signed_up_at AT TIME ZONE :tz)::date,
               act.last_activity_at, act.previous_activity_at, coalesce(act.active_today, false),
               coalesce(ra.last_actions, '[]'::jsonb),
               coalesce(act.events_7d, 0), coalesce(act.sessions_7d, 0),
               round(coalesce(act.baseline_sessions, 0)::numeric
                     / CAST(:baseline_weeks AS integer), 2),
               coalesce(act.active_days_28d, 0),
               sub.status, sub.plan, sub.monthly_amount_cents
        FROM app_users AS u
        CROSS JOIN bounds AS b
        LEFT JOIN activity AS act USING (user_id)
        LEFT JOIN recent_actions AS ra USING (user_id)
        LEFT JOIN subscription AS sub USING (user_id)"""


def snapshot_parameters(config: RetentionConfig, day: date) -> dict[str, object]:
    """The values bound into the snapshot statement (and its standalone app reads)."""
    return {
        "day": day,
        "tz": config.timezone,
        "baseline_weeks": config.activity.baseline_weeks,
        "last_actions": config.activity.last_actions,
        "yearly": list(YEARLY_INTERVALS),
        "weekly": list(WEEKLY_INTERVALS),
    }


def build_snapshot(connection: Connection, config: RetentionConfig, day: date) -> SnapshotSummary:
    """Replace the snapshot of `day`, in the caller's transaction."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    connection.execute(
        text(f"DELETE FROM {s}.user_activity_snapshot WHERE partition_date = :day"), {"day": day}
    )
    connection.execute(text(snapshot_sql(connection, config)), snapshot_parameters(config, day))
    row = connection.execute(
        text(f"""
            SELECT count(*),
                   count(*) FILTER (WHERE active_today),
                   count(*) FILTER (WHERE last_activity_at IS NULL),
                   count(*) FILTER (WHERE last_activity_at >= ((CAST(:day AS date) + 1)::timestamp
                                                               AT TIME ZONE :tz))
            FROM {s}.user_activity_snapshot WHERE partition_date = :day"""),
        {"day": day, "tz": config.timezone},
    ).one()
    return SnapshotSummary(*row)


@dataclass(frozen=True)
class Reconciliation:
    app_users: int
    snapshot_users: int
    missing: int


def reconcile_with_users(
    connection: Connection, config: RetentionConfig, day: date
) -> Reconciliation:
    """Compare the snapshot of `day` with the users the app had by the end of that day."""
    names = _Names(connection, resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    created = names.timestamp("users", "created_at", "u")
    row = connection.execute(
        text(f"""
            WITH app AS (
                SELECT {names.column("users", "id", "u")}::text AS user_id
                FROM {names.table("users")} AS u
                WHERE {created} < (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz
            )
            SELECT (SELECT count(*) FROM app),
                   (SELECT count(*) FROM {s}.user_activity_snapshot WHERE partition_date = :day),
                   (SELECT count(*) FROM app WHERE NOT EXISTS (
                        SELECT FROM {s}.user_activity_snapshot AS snap
                        WHERE snap.partition_date = :day AND snap.user_id = app.user_id))"""),
        {"day": day, "tz": config.timezone},
    ).one()
    return Reconciliation(*row)


def vanished_since_yesterday(connection: Connection, schema: str, day: date) -> int | None:
    """Users in the day before's snapshot who are not in this one (deleted from the app, or a
    mapping that lost them); None when there is no snapshot of the day before."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return connection.execute(
        text(f"""
            SELECT CASE WHEN count(*) = 0 THEN NULL
                        ELSE count(*) FILTER (WHERE NOT EXISTS (
                            SELECT FROM {s}.user_activity_snapshot AS today
                            WHERE today.partition_date = :day
                              AND today.user_id = yesterday.user_id)) END
            FROM {s}.user_activity_snapshot AS yesterday
            WHERE yesterday.partition_date = CAST(:day AS date) - 1"""),
        {"day": day},
    ).scalar()


def snapshot_user_count(connection: Connection, schema: str, day: date) -> int:
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return connection.execute(
        text(f"SELECT count(*) FROM {s}.user_activity_snapshot WHERE partition_date = :day"),
        {"day": day},
    ).scalar_one()
