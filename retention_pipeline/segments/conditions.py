"""A loop's condition: who it selects on a day, as a set of user ids.

A built-in segment reads the segments table. A custom query (as in the seed:
`SELECT * FROM users WHERE last_activity_at < NOW() - INTERVAL '7 days' AND re_engagement_sent =
false`) runs in a read-only transaction with the loop's timeout, with the search path set to the
pipeline's schema so `users` is the as-of view of the snapshot (`retention.as_of()` is the end of
the partition day, for queries that must backfill exactly).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

import pglast
import psycopg
from pglast import ast
from pglast.visitors import Visitor
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


def condition_statement(loop: Loop, condition: QueryCondition) -> str:
    """The condition's one SELECT as written (comments kept, a final `;` dropped), decided by
    PostgreSQL's own parser; ConditionError naming the loop for anything else."""
    return single_select(condition.query, f"loops.{loop.name}.condition.query")


def single_select(query: str, where: str) -> str:
    """The query's one read-only SELECT as written (comments kept, a final `;` dropped), decided
    by PostgreSQL's own parser; ConditionError naming `where` for anything else."""
    try:
        statements = pglast.parse_sql(query)
    except pglast.parser.ParseError as error:
        message, position = error.args
        at = f" (at character {position + 1})" if position is not None else ""
        raise ConditionError(f"{where}: {message}{at}") from None
    if len(statements) != 1:
        raise ConditionError(
            f"{where}: a condition must be a single SELECT (got {len(statements)} statements)"
        )
    (raw,) = statements
    refusal = _not_a_read_only_select(raw.stmt)
    if refusal:
        raise ConditionError(f"{where}: a condition must be a single SELECT (got {refusal})")
    end = raw.stmt_location + raw.stmt_len if raw.stmt_len else len(query)
    return query[raw.stmt_location : end]


WRITING_STATEMENTS = {
    ast.InsertStmt: "INSERT",
    ast.UpdateStmt: "UPDATE",
    ast.DeleteStmt: "DELETE",
    ast.MergeStmt: "MERGE",
}


class _Writes(Visitor):
    """Finds what would make a SELECT write or lock: a data-modifying WITH, SELECT INTO,
    FOR UPDATE/SHARE."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def visit(self, ancestors, node) -> None:
        if type(node) in WRITING_STATEMENTS:
            self.found.append(f"{WRITING_STATEMENTS[type(node)]} inside a WITH")
        elif isinstance(node, ast.SelectStmt):
            if node.intoClause is not None:
                self.found.append("SELECT INTO")
            if node.lockingClause:
                self.found.append("a row-locking SELECT (FOR UPDATE/SHARE)")


def _not_a_read_only_select(statement: ast.Node) -> str | None:
    """What the statement is instead of a read-only SELECT, or None when it is one."""
    if not isinstance(statement, ast.SelectStmt):
        kind = type(statement).__name__
        return WRITING_STATEMENTS.get(type(statement), kind.removesuffix("Stmt").upper())
    writes = _Writes()
    writes(statement)
    return writes.found[0] if writes.found else None


def _run_query(
    connection: Connection,
    schema: str,
    loop: Loop,
    condition: QueryCondition,
    day: date,
    *,
    explain_only: bool = False,
) -> set[str]:
    where = f"loops.{loop.name}.condition.query"
    # Wrapped on lines of its own, so a trailing `-- comment` ends before the wrapper goes on.
    subquery = f"(\n{condition_statement(loop, condition)}\n) AS condition"
    preparer = connection.dialect.identifier_preparer
    with read_only_cursor(connection, schema, loop, day, condition.timeout, where) as cursor:
        # LIMIT 0 plans the query and names its columns without reading a row.
        cursor.execute(f"SELECT * FROM {subquery} LIMIT 0")
        columns = [column.name for column in cursor.description]
        id_column = next((name for name in USER_ID_COLUMNS if name in columns), None)
        if id_column is None:
            raise ConditionError(
                f"{where}: returns no user id column (expected one of "
                f"{', '.join(USER_ID_COLUMNS)}; got {', '.join(columns) or 'none'})"
            )
        column = preparer.quote(id_column)
        select_ids = (
            f"SELECT DISTINCT condition.{column}::text FROM {subquery} "
            f"WHERE condition.{column} IS NOT NULL"
        )
        if explain_only:
            cursor.execute(f"EXPLAIN {select_ids}")
            return set()
        cursor.execute(select_ids)
        return {row[0] for row in cursor.fetchall()}


@contextmanager
def read_only_cursor(
    connection: Connection, schema: str, loop: Loop, day: date, timeout: str | int, where: str
) -> Iterator[psycopg.Cursor]:
    """A driver cursor for a user's SQL: it goes to the driver untouched (no bind-parameter
    parsing), inside a read-only transaction whose settings (the timeout, the search path on
    the pipeline's schema, the partition day and the loop) end with it. A failure of the
    query is a ConditionError naming `where`."""
    timeout_ms = int(parse_duration(timeout).total_seconds() * 1000)
    preparer = connection.dialect.identifier_preparer
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
        yield cursor
    except psycopg.Error as error:
        raise ConditionError(f"{where}: {_first_line(error)}") from None
    finally:
        cursor.connection.rollback()


def explain_condition(engine: Engine, schema: str, loop: Loop, day: date) -> bool:
    """Plan the statements the loop's condition query runs on `day`, as the run would (read-only,
    with its timeout), reading no rows; ConditionError naming the loop when one would fail.
    False when the condition is a built-in segment (nothing to plan)."""
    condition = loop.condition
    if not isinstance(condition, QueryCondition):
        return False
    with engine.connect() as connection:
        _run_query(connection, schema, loop, condition, day, explain_only=True)
    return True


def _first_line(error: BaseException) -> str:
    if isinstance(error, psycopg.errors.QueryCanceled):
        return "timed out (the condition's timeout)"
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__
