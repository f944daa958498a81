"""What the snapshot's checks compare: the day's users with the app's, and with the day
before's snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import ResolvedTable, resolve_app_tables
from retention_pipeline.database.excluded_users import kept_sql
from retention_pipeline.segments.snapshot.statement import AppNames


@dataclass(frozen=True)
class Reconciliation:
    app_users: int
    snapshot_users: int
    missing: int


def reconcile_with_users(
    connection: Connection,
    config: RetentionConfig,
    day: date,
    snapshot_users: int,
    tables: dict[str, ResolvedTable] | None = None,
) -> Reconciliation:
    """Compare the snapshot of `day` (`snapshot_users` rows, one per user by its key) with the
    users the app had by the end of that day, less the accounts never emailed. Its rows come
    from those users, so equal counts mean none is missing; the users are matched one by one
    only when the counts differ."""
    names = AppNames(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    created = names.timestamp("users", "created_at", "u")
    kept = kept_sql(names.tables["users"], "u", connection.dialect)
    app = f"""SELECT {names.column("users", "id", "u")}::text AS user_id
              FROM {names.table("users")} AS u
              WHERE {created} < (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz AND {kept}"""
    parameters = {"day": day, "tz": config.timezone}
    app_users = connection.execute(
        text(f"SELECT count(*) FROM ({app}) AS app"), parameters
    ).scalar_one()
    if app_users == snapshot_users:
        return Reconciliation(app_users, snapshot_users, 0)
    missing = connection.execute(
        text(f"""
            SELECT count(*) FROM ({app}) AS app
            WHERE NOT EXISTS (SELECT FROM {s}.user_activity_snapshot AS snap
                              WHERE snap.partition_date = :day AND snap.user_id = app.user_id)"""),
        parameters,
    ).scalar_one()
    return Reconciliation(app_users, snapshot_users, missing)


def vanished_since_yesterday(connection: Connection, s: str, day: date) -> int | None:
    """`SnapshotSummary.vanished`, by matching the two days' users one by one."""
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
