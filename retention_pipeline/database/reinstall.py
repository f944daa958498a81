"""What outlives `db uninstall`: tables of record set aside, alone in the pipeline's schema, for
the next `db upgrade` to put back after its migrations.

A kept table is a plain copy named `<table>_kept`, without the constraints and indexes whose names
the next install reuses. Rows come back with the columns the kept and the new table share, their
identity values included, so that rows referring to them by id still find them.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, text


def kept_name(table: str) -> str:
    return f"{table}_kept"


def keep_for_reinstall(
    connection: Connection, schema: str, tables: Sequence[str]
) -> dict[str, int]:
    """Drop the schema but the rows of `tables`, each copied into `<table>_kept` in a schema that
    then takes the dropped one's name; return how many rows each kept table holds (tables
    without rows are not kept). A schema uninstalled before keeps what it kept of `tables` and
    loses the rest. Without anything to keep, the schema is dropped whole. The caller has locked
    `tables` against writes (`lock_against_writes`)."""
    preparer = connection.dialect.identifier_preparer
    s = preparer.quote_schema(schema)
    holder = preparer.quote_schema(f"{schema}_uninstalling")
    connection.execute(text(f"CREATE SCHEMA {holder}"))
    kept: dict[str, int] = {}
    for table in tables:
        live, copy = f"{s}.{preparer.quote(table)}", preparer.quote(kept_name(table))
        if _exists(connection, live):
            rows = _count(connection, live)
            if rows:
                connection.execute(text(f"CREATE TABLE {holder}.{copy} AS SELECT * FROM {live}"))
        elif _exists(connection, f"{s}.{copy}"):  # uninstalled before: the copy moves as it is
            rows = _count(connection, f"{s}.{copy}")
            connection.execute(text(f"ALTER TABLE {s}.{copy} SET SCHEMA {holder}"))
        else:
            rows = 0
        if rows:
            kept[table] = rows
    connection.execute(text(f"DROP SCHEMA IF EXISTS {s} CASCADE"))
    if kept:
        connection.execute(text(f"ALTER SCHEMA {holder} RENAME TO {s}"))
    else:
        connection.execute(text(f"DROP SCHEMA {holder}"))
    return kept


def lock_against_writes(connection: Connection, schema: str, tables: Sequence[str]) -> None:
    """Lock the schema's `tables` against writes until the transaction ends (reads go on), before
    `keep_for_reinstall` copies the first: an unsubscribe, a webhook's event or a send's outcome
    committed between a copy and the drop would be lost, and the copies would disagree (an event
    naming an email the kept log lacks). A writer waits, then fails on the dropped table, which
    tells it its write did not land."""
    preparer = connection.dialect.identifier_preparer
    s = preparer.quote_schema(schema)
    live = [
        f"{s}.{preparer.quote(table)}"
        for table in tables
        if _exists(connection, f"{s}.{preparer.quote(table)}")
    ]
    if live:
        connection.execute(text(f"LOCK TABLE {', '.join(live)} IN EXCLUSIVE MODE"))


def restore_kept(connection: Connection, schema: str, tables: Sequence[str]) -> dict[str, int]:
    """After the migrations: put back what a `db uninstall` kept of `tables`, in their order
    (a table before those that refer to it), and drop the copies; return how many rows came
    back per table."""
    preparer = connection.dialect.identifier_preparer
    s = preparer.quote_schema(schema)
    restored: dict[str, int] = {}
    for table in tables:
        live, copy = f"{s}.{preparer.quote(table)}", f"{s}.{preparer.quote(kept_name(table))}"
        if not _exists(connection, copy):
            continue
        columns = connection.execute(
            text("""
                SELECT kept.column_name, live.is_identity = 'YES'
                FROM information_schema.columns AS kept
                JOIN information_schema.columns AS live
                  ON live.table_schema = kept.table_schema
                 AND live.column_name = kept.column_name AND live.table_name = :live
                WHERE kept.table_schema = :schema AND kept.table_name = :kept
                ORDER BY kept.ordinal_position"""),
            {"schema": schema, "live": table, "kept": kept_name(table)},
        ).all()
        names = ", ".join(preparer.quote(column) for column, _identity in columns)
        if not names:
            continue
        restored[table] = connection.execute(
            text(f"""
                INSERT INTO {live} ({names}) OVERRIDING SYSTEM VALUE
                SELECT {names} FROM {copy}
                ON CONFLICT DO NOTHING""")
        ).rowcount
        for column, identity in columns:
            if identity:  # new rows number on after the restored ones
                connection.execute(
                    text(f"""
                        SELECT setval(pg_get_serial_sequence(:table, :column), max(id))
                        FROM (SELECT {preparer.quote(column)} AS id FROM {live}) AS restored
                        HAVING max(id) IS NOT NULL"""),
                    {"table": live, "column": column},
                )
        connection.execute(text(f"DROP TABLE {copy}"))
    return restored


def _exists(connection: Connection, table: str) -> bool:
    return connection.execute(
        text("SELECT to_regclass(:table) IS NOT NULL"), {"table": table}
    ).scalar_one()


def _count(connection: Connection, table: str) -> int:
    return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
