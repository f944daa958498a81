"""The app's users and subscriptions read from a read replica (`database.read_url`).

The snapshot joins the app's users and subscriptions with the pipeline's own tables in one
statement, on the primary, where the rollup is. With a replica configured, the mapped columns
of the users, and the subscriptions' read itself (one row per user, however many tables it
joins: owners' members, prices, items), are streamed from the replica (COPY) into temporary
tables of the primary's build transaction, and the snapshot reads those: the primary serves no
scan of the app's tables.
A standby is first waited for until it has replayed everything the primary had written when the
build began, so the copy is never older than the rollup it is joined with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from sqlalchemy import Connection, Engine, text

from retention_pipeline.config.models import AppTables
from retention_pipeline.database.app_tables import (
    MappingError,
    RelatedTable,
    ResolvedTable,
    resolve_app_tables,
)
from retention_pipeline.segments.snapshot.billing import (
    COPIED_SUBSCRIPTIONS,
    SUBSCRIPTION_ROW,
    billing_parameters,
    billing_problem,
    subscription_sql,
)
from retention_pipeline.segments.snapshot.names import AppNames

COPIED_TABLES = ("users",)
REPLAY_TIMEOUT_SECONDS = 300.0
REPLAY_POLL_SECONDS = 0.5


class ReplicaError(RuntimeError):
    """The replica cannot serve the snapshot's reads; the message names `database.read_url`."""


class ReplicaDataError(ValueError):
    """The replica's tables do not match the mapping, or its subscriptions hold a value the
    snapshot cannot read (one line): nothing a second try would change."""


@dataclass(frozen=True)
class ReplicaReads:
    tables: dict[str, ResolvedTable]
    """The mapping, with users pointing at their copy, and the subscriptions' rows copied."""
    rows: dict[str, int]
    standby: bool
    """Whether the replica is a standby in recovery (waited for), or a server read as it is."""
    waited_seconds: float

    @property
    def metadata(self) -> dict[str, object]:
        """What the snapshot's materialization reports of where it read the app."""
        kind = "a standby, caught up" if self.standby else "not a standby: read as it is"
        return {
            "app_read_from": f"the replica ({kind})",
            "replica_wait_seconds": round(self.waited_seconds, 3),
            **{f"replica_rows/{name}": rows for name, rows in self.rows.items()},
        }


def replica_tables(replica: Connection, tables: AppTables) -> dict[str, ResolvedTable]:
    """The mapping resolved on the replica; ReplicaDataError names the first problem."""
    try:
        return resolve_app_tables(replica, tables)
    except MappingError as error:
        raise ReplicaDataError(f"database.read_url: {error}") from None


def subscriptions_source_sql(replica: Connection, tables: dict[str, ResolvedTable]) -> str:
    """The subscriptions' read whose rows are copied, with its values bound in (COPY takes
    no parameters: psycopg merges them client-side)."""
    return subscription_sql(AppNames(replica, tables))


def copy_source_sql(replica: Connection, table: ResolvedTable) -> str:
    """The SELECT whose rows are copied: the columns of the table the snapshot reads."""
    preparer = replica.dialect.identifier_preparer
    return f"SELECT {_columns(replica, table)} FROM {table.sql_name(preparer)}"


def wait_for_replay(connection: Connection, replica: Connection) -> tuple[bool, float]:
    """When the replica is a standby, wait until it has replayed the primary's WAL up to where
    it was now; return whether it is one and how long it took."""
    if not replica.execute(text("SELECT pg_is_in_recovery()")).scalar_one():
        return False, 0.0
    target = connection.execute(text("SELECT pg_current_wal_lsn()::text")).scalar_one()
    started = time.monotonic()
    while not replica.execute(
        text("SELECT coalesce(pg_last_wal_replay_lsn() >= CAST(:target AS pg_lsn), false)"),
        {"target": target},
    ).scalar_one():
        if time.monotonic() - started > REPLAY_TIMEOUT_SECONDS:
            raise ReplicaError(
                f"database.read_url: the replica has not replayed the primary's writes up to "
                f"{target} after {REPLAY_TIMEOUT_SECONDS:.0f} s"
            )
        time.sleep(REPLAY_POLL_SECONDS)
    return True, time.monotonic() - started


def copy_app_reads(connection: Connection, read_engine: Engine, tables: AppTables) -> ReplicaReads:
    """Copy the app's users and subscriptions from the replica into temporary tables of the
    caller's transaction on the primary (dropped when it ends); return the mapping pointed at
    them."""
    with read_engine.connect() as replica:
        replica = replica.execution_options(isolation_level="AUTOCOMMIT")
        on_replica = replica_tables(replica, tables)
        standby, waited = wait_for_replay(connection, replica)
    # Both reads from one snapshot of the replica, taken once it has caught up.
    with read_engine.connect() as replica:
        replica = replica.execution_options(isolation_level="REPEATABLE READ")
        with replica.begin():
            copied = {name: _copy(connection, replica, on_replica[name]) for name in COPIED_TABLES}
            if tables.subscriptions is not None:
                copied["subscriptions"] = _copy_subscriptions(
                    connection, replica, on_replica, billing_parameters(tables.subscriptions)
                )
    copies = {table.name: table for table, _ in copied.values()}
    rows = {name: count for name, (_, count) in copied.items()}
    return ReplicaReads(copies, rows, standby, waited)


def _copy_subscriptions(
    connection: Connection,
    replica: Connection,
    on_replica: dict[str, ResolvedTable],
    parameters: dict[str, object],
) -> tuple[ResolvedTable, int]:
    """Stream the subscriptions' read (one row per user) from the replica into a temporary
    table on the primary; return it as the snapshot's subscriptions, and its rows."""
    problem = billing_problem(replica, AppNames(replica, on_replica))
    if problem:
        raise ReplicaDataError(problem)
    preparer = connection.dialect.identifier_preparer
    name = f"retention_read_{COPIED_SUBSCRIPTIONS}"
    connection.execute(
        text(f"""
            CREATE TEMP TABLE {preparer.quote(name)}
            ({", ".join(f"{column} {kind}" for column, kind in SUBSCRIPTION_ROW.items())})
            ON COMMIT DROP""")
    )
    compiled = text(subscriptions_source_sql(replica, on_replica)).compile(dialect=replica.dialect)
    source = replica.connection.driver_connection
    target = connection.connection.driver_connection
    with source.cursor() as out_cursor, target.cursor() as in_cursor:
        with (
            out_cursor.copy(
                f"COPY ({compiled}) TO STDOUT", compiled.construct_params(parameters)
            ) as out,
            in_cursor.copy(f"COPY pg_temp.{preparer.quote(name)} FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
        rows = in_cursor.rowcount
    connection.execute(text(f"ANALYZE pg_temp.{preparer.quote(name)}"))
    copy = RelatedTable(name, "pg_temp", {column: column for column in SUBSCRIPTION_ROW})
    return ResolvedTable(COPIED_SUBSCRIPTIONS, copy, {}), rows


def _copy(
    connection: Connection, replica: Connection, table: ResolvedTable
) -> tuple[ResolvedTable, int]:
    """Stream the table's mapped columns from the replica into a temporary table of the same
    columns on the primary; return the table pointed at the copy, and its rows."""
    preparer = connection.dialect.identifier_preparer
    name = f"retention_read_{table.name}"
    columns = _columns(connection, table)
    # Same columns, same types as the app's table on the primary; no rows read there.
    connection.execute(
        text(f"""
            CREATE TEMP TABLE {preparer.quote(name)} ON COMMIT DROP AS
            SELECT {columns} FROM {table.sql_name(preparer)} WITH NO DATA""")
    )
    source = replica.connection.driver_connection
    target = connection.connection.driver_connection
    with source.cursor() as out_cursor, target.cursor() as in_cursor:
        with (
            out_cursor.copy(f"COPY ({copy_source_sql(replica, table)}) TO STDOUT") as out,
            in_cursor.copy(f"COPY pg_temp.{preparer.quote(name)} ({columns}) FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
        rows = in_cursor.rowcount
    # Temporary tables are never analyzed by autovacuum: the snapshot's plans need counts.
    connection.execute(text(f"ANALYZE pg_temp.{preparer.quote(name)}"))
    copy = table.mapping.model_copy(update={"schema_": "pg_temp", "table": name})
    return replace(table, mapping=copy), rows


def _columns(connection: Connection, table: ResolvedTable) -> str:
    """Every column the snapshot reads: the mapped ones (a JSON path's column, a built name's
    parts) and those the users' exclusions test."""
    preparer = connection.dialect.identifier_preparer
    return ", ".join(preparer.quote(column) for column in table.mapping.read_columns())
