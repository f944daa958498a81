"""What the full and the rolled-forward builds share: the bounds of the day, the app's users
and subscriptions as of its end, the snapshot's columns and the values bound."""

from __future__ import annotations

from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import ResolvedTable

# Distinct actions older than this are not worth naming in an email; the bound keeps the
# snapshot from re-reading a user's whole history every day.
LAST_ACTIONS_LOOKBACK_DAYS = 90
# A billing interval's monthly amount: the amount times the factor. Any other interval is an
# error naming the value (`unknown_billing_interval`), never taken as monthly.
INTERVAL_MONTHLY_FACTORS: dict[str, float] = {
    "day": 365 / 12,
    "daily": 365 / 12,
    "week": 52 / 12,
    "weekly": 52 / 12,
    "month": 1,
    "monthly": 1,
    "quarter": 1 / 3,
    "quarterly": 1 / 3,
    "year": 1 / 12,
    "yearly": 1 / 12,
    "annual": 1 / 12,
    "annually": 1 / 12,
}


class SnapshotError(ValueError):
    """App data the snapshot cannot read right: one line naming the table, column and value."""


class AppNames:
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


def counted_column(config: RetentionConfig) -> str:
    """The rollup's column the snapshot's session figures (`sessions_7d`, `baseline_sessions`)
    sum: visits or logins, as `activity.baseline` says."""
    return {"visits": "visit_count", "logins": "session_count"}[config.counted_use]


def insert_snapshot(s: str) -> str:
    return f"""INSERT INTO {s}.user_activity_snapshot (
            partition_date, user_id, email, name, timezone, signed_up_at, account_age_days,
            last_activity_at, previous_activity_at, active_today, last_actions, events_7d,
            sessions_7d, baseline_sessions, baseline_sessions_per_week, active_days_28d,
            subscription_status, subscription_plan, monthly_amount_cents,
            subscription_currency)"""


BOUNDS = """bounds AS (
            SELECT CAST(:day AS date) AS day,
                   (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz AS day_end
        )"""


def app_users_sql(names: AppNames, only: str = "") -> str:
    user_id = f"{names.column('users', 'id', 'u')}::text"
    created_at = names.timestamp("users", "created_at", "u")
    listed = f" AND {only.format(user_id)}" if only else ""
    return f"""SELECT {user_id} AS user_id,
                   {names.column("users", "email", "u")}::text AS email,
                   {names.column("users", "name", "u")}::text AS name,
                   {names.column("users", "timezone", "u")}::text AS timezone,
                   {created_at} AS signed_up_at
            FROM {names.table("users")} AS u, bounds
            WHERE {created_at} < bounds.day_end{listed}"""


def subscription_sql(names: AppNames, only: str = "") -> str:
    subscriptions = names.tables["subscriptions"]
    amount = names.column("subscriptions", "amount_cents", "sub")
    status = names.column("subscriptions", "status", "sub")
    if subscriptions.maps("billing_interval"):
        interval = names.column("subscriptions", "billing_interval", "sub")
        # Unknown intervals stop the build beforehand (`unknown_billing_interval`).
        monthly_amount = f"""round({amount} * (
                       SELECT factor FROM unnest(CAST(:intervals AS text[]),
                                                 CAST(:monthly_factors AS float8[]))
                           AS known(name, factor)
                       WHERE known.name = lower(btrim({interval}::text))))"""
    else:  # no interval column: amounts are taken as monthly
        monthly_amount = amount
    # No currency column: every amount is in the app's one currency, left unnamed.
    currency = (
        f"upper(btrim({names.column('subscriptions', 'currency', 'sub')}::text))"
        if subscriptions.maps("currency")
        else "NULL::text"
    )
    # A live subscription describes the user better than an old canceled one, and among those
    # the latest change (when the app records one) wins.
    order = [f"({status}::text IN ('active', 'trialing', 'past_due')) DESC"]
    if subscriptions.maps("updated_at"):
        order.append(f"{names.timestamp('subscriptions', 'updated_at', 'sub')} DESC NULLS LAST")
    user_id = f"{names.column('subscriptions', 'user_id', 'sub')}::text"
    # `only` restricts to the listed users (ONLY_THESE_USERS), as their full build needs.
    listed = f"\n            WHERE {only.format(user_id)}" if only else ""
    return f"""SELECT DISTINCT ON (1)
                   {user_id} AS user_id,
                   {status}::text AS status,
                   {names.column("subscriptions", "plan", "sub")}::text AS plan,
                   ({monthly_amount})::integer AS monthly_amount_cents,
                   {currency} AS currency
            FROM {names.table("subscriptions")} AS sub{listed}
            ORDER BY 1, {", ".join(order)}"""


def unknown_billing_interval(connection: Connection, names: AppNames) -> str | None:
    """The first billing interval of the app's subscriptions the snapshot cannot turn into a
    monthly amount, as one line naming it; None when every one is known (or none is mapped)."""
    if not names.tables["subscriptions"].maps("billing_interval"):
        return None
    interval = names.column("subscriptions", "billing_interval", "sub")
    unknown = connection.execute(
        text(f"""
            SELECT {interval}::text FROM {names.table("subscriptions")} AS sub
            WHERE {interval} IS NULL
               OR NOT lower(btrim({interval}::text)) = ANY(CAST(:intervals AS text[]))
            LIMIT 1"""),
        {"intervals": list(INTERVAL_MONTHLY_FACTORS)},
    ).first()
    if unknown is None:
        return None
    value = "no value (NULL)" if unknown[0] is None else repr(unknown[0])
    return (
        f"subscriptions.billing_interval: unknown billing interval {value} (known: "
        f"{', '.join(INTERVAL_MONTHLY_FACTORS)})"
    )


def snapshot_parameters(config: RetentionConfig, day: date) -> dict[str, object]:
    """The values bound into the snapshot statement (and its standalone app reads)."""
    return {
        "day": day,
        "tz": config.timezone,
        "baseline_weeks": config.activity.baseline_weeks,
        "last_actions": config.activity.last_actions,
        "intervals": list(INTERVAL_MONTHLY_FACTORS),
        "monthly_factors": [float(factor) for factor in INTERVAL_MONTHLY_FACTORS.values()],
    }
