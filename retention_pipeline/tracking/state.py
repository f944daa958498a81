"""The tracking state every install, rebuild and drain shares, and the lock they take turns on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.activity_sources import resolve_sources
from retention_pipeline.database.app_tables import resolve_app_tables
from retention_pipeline.tracking.sources import sources_problem
from retention_pipeline.tracking.sql import TrackingSql


class TrackingError(RuntimeError):
    """Activity tracking cannot proceed; one line saying why and what to run."""


class RebuildPending(TrackingError):
    """The rollup is being rebuilt from the app tables and is incomplete until that finishes."""


def tracking_sql(connection: Connection, config: RetentionConfig) -> TrackingSql:
    users = resolve_app_tables(connection, config.database.tables)["users"]
    return TrackingSql(
        dialect=connection.dialect,
        schema=config.database.schema_,
        users=users,
        sources=tuple(resolve_sources(connection, config.database, users)),
    )


def _lock_key(schema: str) -> dict[str, str]:
    return {"key": f"retention-pipeline:{schema}"}


def lock(connection: Connection, schema: str) -> None:
    """Take turns with every other install, rebuild and drain of this schema."""
    connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), _lock_key(schema))


def lock_shared(connection: Connection, schema: str) -> None:
    """Wait for an install, rebuild or drain of this schema under way, and keep the next one
    waiting until this transaction ends; other holders of this shared lock go on alongside.
    Taken before its transaction locks anything a drain needs, so that it waits holding none."""
    connection.execute(
        text("SELECT pg_advisory_xact_lock_shared(hashtext(:key))"), _lock_key(schema)
    )


@contextmanager
def locking_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction for work that takes the schema's lock (`lock`), in READ COMMITTED whatever
    the database's default: its statements after the lock see every write of the install,
    rebuild or drain it waited for, which an older snapshot (REPEATABLE READ) would not."""
    with engine.connect() as connection:
        connection.execution_options(isolation_level="READ COMMITTED")
        with connection.begin():
            yield connection


@contextmanager
def holding_lock(connection: Connection, schema: str) -> Iterator[None]:
    """Hold the lock `lock` takes, across every transaction this connection makes inside: no
    install, rebuild or other drain runs between them."""
    key = _lock_key(schema)
    with connection.begin():
        connection.execute(text("SELECT pg_advisory_lock(hashtext(:key))"), key)
    try:
        yield
    finally:
        try:
            with connection.begin():
                connection.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), key)
        except DBAPIError:  # the connection is gone, and its lock with it
            connection.invalidate()


def first_data_day(connection: Connection, schema: str) -> date | None:
    """The first day with activity when the pipeline was installed; None before an install."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    has_state = connection.execute(
        text("SELECT to_regclass(:table)"), {"table": f"{s}.tracking_state"}
    ).scalar()
    if has_state is None:
        return None
    return connection.execute(text(f"SELECT first_data_day FROM {s}.tracking_state")).scalar()


def read_state(connection: Connection, sql: TrackingSql) -> dict | None:
    row = (
        connection.execute(
            text(f"""
                SELECT timezone, mode, refreshed_through, capture_slot, rebuild_pending,
                       last_drained_at, rebuild_into_empty, visit_gap_minutes
                FROM {sql.q_schema}.tracking_state""")
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


def tracked_timezone(connection: Connection, schema: str) -> str | None:
    """The timezone the rollup buckets days in."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return connection.execute(text(f"SELECT timezone FROM {s}.tracking_state")).scalar()


def rollup_problem(connection: Connection, schema: str, timezone: str) -> str | None:
    """Why the installed rollup cannot serve loops in `timezone`, in one line: its days are
    bucketed in another, or its rebuild is not finished; None when it can."""
    tracked = tracked_timezone(connection, schema)
    if tracked != timezone:
        return (
            f"schema {schema!r} buckets days in {tracked}, the loops use {timezone}: "
            "run `retention-pipeline db upgrade`"
        )
    return rebuild_problem(connection, schema)


def rebuild_problem(connection: Connection, schema: str) -> str | None:
    """Why the rollup is incomplete (a rebuild not finished), or None."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    if not connection.execute(text(f"SELECT rebuild_pending FROM {s}.tracking_state")).scalar():
        return None
    done, planned = connection.execute(
        text(f"SELECT count(done_at), count(*) FROM {s}.rebuild_chunks")
    ).one()
    return (
        f"the activity rollup is being rebuilt ({done} of {planned or '?'} day ranges done): "
        "wait for the running `retention-pipeline db upgrade`, or run it again if it stopped"
    )


def require_complete(connection: Connection, sql: TrackingSql) -> dict:
    """The tracking state of an installation whose rollup is complete and whose sources are
    those of `sql`; raise TrackingError saying what to run otherwise."""
    state = read_state(connection, sql)
    if state is None:
        raise TrackingError("the pipeline is not installed: run `retention-pipeline db upgrade`")
    problem = rebuild_problem(connection, sql.schema)
    if problem:
        raise RebuildPending(problem)
    problem = sources_problem(connection, sql)
    if problem:
        raise TrackingError(problem)
    return state
