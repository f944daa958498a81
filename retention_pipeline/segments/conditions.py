"""A loop's condition: who it selects on a day, as a set of user ids.

A built-in segment reads the segments table. A custom query (as in the seed:
`SELECT * FROM users WHERE last_activity_at < NOW() - INTERVAL '7 days' AND re_engagement_sent =
false`) runs in a read-only transaction with the loop's timeout, with the search path set to the
pipeline's schema so `users` is the as-of view of the snapshot (`retention.as_of()` is the end of
the partition day, for queries that must backfill exactly).
"""

from __future__ import annotations

from datetime import date

import psycopg
from sqlalchemy import Connection, Engine, text

from retention_pipeline.config.models import Loop, QueryCondition, parse_duration

USER_ID_COLUMNS = ("user_id", "id")


class ConditionError(ValueError):
    """A custom condition query failed; one line naming the loop."""


def condition_user_ids(engine: Engine, schema: str, loop: Loop, day: date) -> set[str]:
    """The users the loop's condition selects on `day`, read in a transaction of its own."""
    condition = loop.condition
    with engine.connect() as connection:
        if isinstance(condition, QueryCondition):
            return _run_query(connection, schema, loop, condition, day)
        s = connection.dialect.identifier_preparer.quote_schema(schema)
        rows = connection.execute(
            text(f"""SELECT user_id FROM {s}.engagement_segments
                     WHERE partition_date = :day AND loop_name = :loop AND segment = :segment"""),
            {"day": day, "loop": loop.name, "segment": condition.segment},
        ).scalars()
        return set(rows)


def _run_query(
    connection: Connection, schema: str, loop: Loop, condition: QueryCondition, day: date
) -> set[str]:
    where = f"loops.{loop.name}.condition.query"
    query = condition.query.strip().rstrip(";").strip()
    if ";" in query:
        raise ConditionError(f"{where}: must be a single SELECT statement")
    timeout_ms = int(parse_duration(condition.timeout).total_seconds() * 1000)
    preparer = connection.dialect.identifier_preparer
    # The user's SQL goes to the driver untouched (no bind-parameter parsing), inside a
    # read-only transaction whose settings end with it.
    cursor = connection.connection.driver_connection.cursor()
    try:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute(
            "SELECT set_config('statement_timeout', %s, true),"
            " set_config('search_path', %s, true),"
            " set_config('retention.partition_date', %s, true),"
            " set_config('retention.loop', %s, true)",
            (
                str(timeout_ms),
                f"{preparer.quote_schema(schema)}, pg_catalog",
                day.isoformat(),
                loop.name,
            ),
        )
        cursor.execute(f"SELECT * FROM ({query}) AS condition LIMIT 0")
        columns = [column.name for column in cursor.description]
        id_column = next((name for name in USER_ID_COLUMNS if name in columns), None)
        if id_column is None:
            raise ConditionError(
                f"{where}: returns no user id column (expected one of "
                f"{', '.join(USER_ID_COLUMNS)}; got {', '.join(columns) or 'none'})"
            )
        column = preparer.quote(id_column)
        cursor.execute(
            f"SELECT DISTINCT condition.{column}::text FROM ({query}) AS condition "
            f"WHERE condition.{column} IS NOT NULL"
        )
        return {row[0] for row in cursor.fetchall()}
    except psycopg.Error as error:
        raise ConditionError(f"{where}: {_first_line(error)}") from None
    finally:
        cursor.connection.rollback()


def _first_line(error: BaseException) -> str:
    if isinstance(error, psycopg.errors.QueryCanceled):
        return "timed out (the condition's timeout)"
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__
