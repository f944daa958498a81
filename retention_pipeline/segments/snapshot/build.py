"""Build a day's snapshot: rolled forward from the day before's when it can be, else in full."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import ResolvedTable, resolve_app_tables
from retention_pipeline.database.day_partitions import analyze_day_partition, empty_day_partition
from retention_pipeline.segments.snapshot.billing import billing_problem
from retention_pipeline.segments.snapshot.checks import (
    snapshot_user_count,
    vanished_since_yesterday,
)
from retention_pipeline.segments.snapshot.full import snapshot_sql
from retention_pipeline.segments.snapshot.rolled import (
    full_build_reason,
    rolled_forward_sql,
    users_new_to_the_day_before_sql,
)
from retention_pipeline.segments.snapshot.statement import (
    ANALYZED_COLUMNS,
    AppNames,
    SnapshotError,
    snapshot_parameters,
)
from retention_pipeline.tracking.state import lock_shared


@dataclass(frozen=True)
class SnapshotSummary:
    users: int
    active_today: int
    never_active: int
    leaked_rows: int
    path: str  # "full" or "incremental"
    path_reason: str
    vanished: int | None
    """Users of the day before's snapshot missing from this one (deleted from the app, or a
    mapping that lost them); None when there is no snapshot of the day before."""


def build_snapshot(
    connection: Connection,
    config: RetentionConfig,
    day: date,
    tables: dict[str, ResolvedTable] | None = None,
) -> SnapshotSummary:
    """Replace the snapshot of `day`, in the caller's transaction: rolled forward from the day
    before's when it can be (users it lacks are built in full), else built in full. `tables`
    (default: the mapping resolved here) says where the app's users and subscriptions are read.
    A subscription value it cannot read (an unmapped status, a billing interval it cannot turn
    into a monthly amount) stops it (`SnapshotError`, one line naming the value and its key)
    before anything is written."""
    schema = config.database.schema_
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    # No drain between reading the rollup and committing: one folding rows of a day already
    # built would find the old snapshot, note the day late at a time before this build's, and
    # the next day would roll forward from a snapshot without them.
    lock_shared(connection, schema)
    tables = tables or resolve_app_tables(connection, config.database.tables)
    problem = billing_problem(connection, AppNames(connection, tables))
    if problem:
        raise SnapshotError(problem)
    empty_day_partition(connection, schema, "user_activity_snapshot", day)
    parameters = snapshot_parameters(config, day)
    reason = full_build_reason(connection, config, day)
    if reason:
        connection.execute(text(snapshot_sql(connection, config, tables)), parameters)
        vanished = vanished_since_yesterday(connection, s, day)
        path = "full"
    else:
        new_users = list(
            connection.execute(
                text(users_new_to_the_day_before_sql(connection, config, tables)), parameters
            ).scalars()
        )
        if new_users:
            connection.execute(
                text(snapshot_sql(connection, config, tables, only_listed_users=True)),
                {**parameters, "only": new_users},
            )
        rolled = connection.execute(
            text(rolled_forward_sql(connection, config, tables)), parameters
        )
        # Rolled forward are the day before's users still among the app's: the rest vanished.
        before = snapshot_user_count(connection, schema, day - timedelta(days=1))
        vanished = before - rolled.rowcount
        path = "incremental"
        reason = f"rolled forward from {day - timedelta(days=1)}; {len(new_users)} users new to it"
    analyze_day_partition(connection, schema, "user_activity_snapshot", day, ANALYZED_COLUMNS)
    connection.execute(
        text(f"""
            INSERT INTO {s}.snapshot_builds AS b
                (partition_date, built_at, path, timezone, baseline_weeks, last_actions, counted)
            VALUES (:day, now(), :path, :tz, :baseline_weeks, :last_actions, :counted)
            ON CONFLICT (partition_date) DO UPDATE SET
                built_at = excluded.built_at, path = excluded.path, timezone = excluded.timezone,
                baseline_weeks = excluded.baseline_weeks, last_actions = excluded.last_actions,
                counted = excluded.counted"""),
        parameters | {"path": path, "counted": config.counted_use},
    )
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
    return SnapshotSummary(*row, path=path, path_reason=reason, vanished=vanished)
