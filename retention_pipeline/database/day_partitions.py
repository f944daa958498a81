"""The pipeline's daily tables (snapshots, segments) are partitioned by day in PostgreSQL: a day
is rebuilt by emptying its own partition (no dead rows left behind), read with statistics of its
own, and dropped whole once it leaves the retention window (`database.keep_days`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, text

from retention_pipeline.database.batch import tune_for_batch
from retention_pipeline.database.temp_files import temp_bytes_so_far

SUFFIX_FORMAT = "%Y%m%d"


def _quoted(connection: Connection, schema: str, name: str) -> str:
    preparer = connection.dialect.identifier_preparer
    return f"{preparer.quote_schema(schema)}.{preparer.quote(name)}"


def _date_literal(connection: Connection, day: date) -> str:
    # Partition bounds are DDL, which takes no bind parameters: render the date as SQLAlchemy
    # renders literals, never by pasting text.
    return sa.literal(day, sa.Date).compile(
        dialect=connection.dialect, compile_kwargs={"literal_binds": True}
    )


def ensure_day_partition(connection: Connection, schema: str, table: str, day: date) -> str:
    """Create the table's partition of `day` unless it exists; return its quoted name. Creating
    one locks the whole table until the transaction ends: do it in a short one of its own."""
    partition = _quoted(connection, schema, f"{table}_{day.strftime(SUFFIX_FORMAT)}")
    exists = connection.execute(
        text("SELECT to_regclass(:partition) IS NOT NULL"), {"partition": partition}
    ).scalar_one()
    if not exists:
        connection.execute(
            text(f"""
                CREATE TABLE {partition} PARTITION OF {_quoted(connection, schema, table)}
                FOR VALUES FROM ({_date_literal(connection, day)})
                TO ({_date_literal(connection, day + timedelta(days=1))})""")
        )
    return partition


def empty_day_partition(connection: Connection, schema: str, table: str, day: date) -> str:
    """The table's partition of `day`, created if missing and emptied, in the caller's
    transaction: readers of that day wait for the rebuild; other days stay readable."""
    partition = ensure_day_partition(connection, schema, table, day)
    connection.execute(text(f"TRUNCATE {partition}"))
    return partition


def analyze_day_partition(
    connection: Connection, schema: str, table: str, day: date, columns: tuple[str, ...] = ()
) -> None:
    """Statistics of the day just written, so the next step's plans see its real size even
    where autovacuum has not run (or is off): of `columns`, or of every column if none."""
    partition = _quoted(connection, schema, f"{table}_{day.strftime(SUFFIX_FORMAT)}")
    preparer = connection.dialect.identifier_preparer
    listed = f" ({', '.join(preparer.quote(column) for column in columns)})" if columns else ""
    connection.execute(text(f"ANALYZE {partition}{listed}"))


def drop_days_before(connection: Connection, schema: str, table: str, first_kept: date) -> int:
    """Drop the table's partitions of days before `first_kept`; return how many."""
    names = connection.execute(
        text("""
            SELECT child.relname FROM pg_catalog.pg_inherits AS link
            JOIN pg_catalog.pg_class AS child ON child.oid = link.inhrelid
            WHERE link.inhparent = to_regclass(:parent)"""),
        {"parent": _quoted(connection, schema, table)},
    ).scalars()
    dropped = 0
    for name in names:
        day = datetime.strptime(name.removeprefix(f"{table}_"), SUFFIX_FORMAT).date()
        if day < first_kept:
            connection.execute(text(f"DROP TABLE {_quoted(connection, schema, name)}"))
            dropped += 1
    return dropped


@contextmanager
def rebuilding_day(
    engine: Engine, schema: str, table: str, day: date, keep_days: int
) -> Iterator[tuple[Connection, dict[str, int]]]:
    """The transaction that rebuilds one day of a daily table, and a dict of what happened
    around it, filled once it commits: the day's partition is created beforehand in a
    transaction of its own (creating one briefly locks the whole table), the rebuild's has the
    batch settings (`tune_for_batch`), `temp_bytes` counts
    what the rebuild spilled to disk, and `partitions_dropped` the days older than `keep_days`
    before `day` that were dropped afterwards."""
    with engine.begin() as connection:
        ensure_day_partition(connection, schema, table, day)
    spilled_before = temp_bytes_so_far(engine)
    around: dict[str, int] = {}
    with engine.begin() as connection:
        tune_for_batch(connection)
        yield connection, around
    around["temp_bytes"] = temp_bytes_so_far(engine) - spilled_before
    with engine.begin() as connection:
        around["partitions_dropped"] = drop_days_before(
            connection, schema, table, day - timedelta(days=keep_days)
        )
