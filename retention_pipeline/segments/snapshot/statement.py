"""What the full and the rolled-forward builds share: the bounds of the day, the app's users
and subscriptions as of its end, the snapshot's columns and the values bound."""

from __future__ import annotations

from datetime import date

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.excluded_users import kept_sql
from retention_pipeline.segments.snapshot.billing import billing_parameters
from retention_pipeline.segments.snapshot.names import AppNames

# Distinct actions older than this are not worth naming in an email; the bound keeps the
# snapshot from re-reading a user's whole history every day.
LAST_ACTIONS_LOOKBACK_DAYS = 90


class SnapshotError(ValueError):
    """App data the snapshot cannot read right: one line naming the table, column and value."""


def counted_column(config: RetentionConfig) -> str:
    """The rollup's column the snapshot's session figures (`sessions_7d`, `baseline_sessions`)
    sum: visits or logins, as `activity.baseline` says."""
    return {"visits": "visit_count", "logins": "session_count"}[config.counted_use]


SNAPSHOT_COLUMNS = (
    "partition_date",
    "user_id",
    "email",
    "name",
    "timezone",
    "signed_up_at",
    "account_age_days",
    "last_activity_at",
    "previous_activity_at",
    "active_today",
    "last_actions",
    "events_7d",
    "sessions_7d",
    "baseline_sessions",
    "baseline_sessions_per_week",
    "active_days_28d",
    "subscription_status",
    "subscription_plan",
    "monthly_amount_cents",
    "subscription_currency",
)
# Statistics of a built day are for the plans that read it (joins on user_id, conditions on the
# figures); a list of actions, different for nearly every user, is nothing a plan can use, and
# sampling it was about 40% of the day's ANALYZE.
ANALYZED_COLUMNS = tuple(column for column in SNAPSHOT_COLUMNS if column != "last_actions")


def insert_snapshot(s: str) -> str:
    return f"""INSERT INTO {s}.user_activity_snapshot ({", ".join(SNAPSHOT_COLUMNS)})"""


BOUNDS = """bounds AS (
            SELECT CAST(:day AS date) AS day,
                   (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz AS day_end
        )"""


def app_users_sql(names: AppNames, only: str = "") -> str:
    """The app's users signed up by the day's end, less the accounts never emailed."""
    user_id = f"{names.column('users', 'id', 'u')}::text"
    created_at = names.timestamp("users", "created_at", "u")
    kept = kept_sql(names.tables["users"], "u", names.preparer.dialect)
    listed = f" AND {only.format(user_id)}" if only else ""
    return f"""SELECT {user_id} AS user_id,
                   {names.column("users", "email", "u")}::text AS email,
                   {names.column("users", "name", "u")}::text AS name,
                   {names.column("users", "timezone", "u")}::text AS timezone,
                   {created_at} AS signed_up_at
            FROM {names.table("users")} AS u, bounds
            WHERE {created_at} < bounds.day_end AND {kept}{listed}"""


def snapshot_parameters(config: RetentionConfig, day: date) -> dict[str, object]:
    """The values bound into the snapshot statement (and its standalone app reads)."""
    return {
        "day": day,
        "tz": config.timezone,
        "baseline_weeks": config.activity.baseline_weeks,
        "last_actions": config.activity.last_actions,
        **billing_parameters(config.database.tables.subscriptions),
    }
