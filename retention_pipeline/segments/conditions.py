"""A loop's condition: who it selects on a day, as a set of user ids.

A built-in segment reads the segments table. A custom query (as in the seed:
`SELECT * FROM users WHERE last_activity_at < NOW() - INTERVAL '7 days' AND re_engagement_sent =
false`) runs in a read-only transaction with the loop's timeout, with the search path set to the
pipeline's schema so `users` is the as-of view of the snapshot. The query reads the clock as of
the end of the partition day: `NOW()`, `current_date` and the like are rewritten in its parse tree
into a bound parameter holding that instant (`retention.as_of()`), so a backfilled day selects
whom the day's own run would have selected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime

import pglast
import psycopg
from pglast import ast
from pglast.enums import A_Expr_Kind, SQLValueFunctionOp
from pglast.stream import RawStream
from pglast.visitors import Visitor
from sqlalchemy import Connection, Engine, text

from retention_pipeline.config.models import Loop, QueryCondition, parse_duration
from retention_pipeline.database.batch import BATCH_WORK_MEM

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
        # One JSON array, not a row per user: rows cost 0.3 s in Python for a segment of
        # 140,000 users.
        users = connection.execute(
            text(f"""SELECT coalesce(jsonb_agg(user_id), '[]') FROM {s}.engagement_segments
                     WHERE partition_date = :day AND loop_name = :loop AND segment = :segment"""),
            {"day": day, "loop": loop.name, "segment": condition.segment},
        ).scalar_one()
        return set(users)


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
            f"{where}: the query must be a single SELECT (got {len(statements)} statements)"
        )
    (raw,) = statements
    refusal = _not_a_read_only_select(raw.stmt)
    if refusal:
        raise ConditionError(f"{where}: the query must be a single SELECT (got {refusal})")
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


# What each read of the clock becomes: the day's end (bound as $1, a timestamptz) cast to the
# type the read returns, in the loops' timezone (the query's session time zone).
CLOCK_VALUE_FUNCTIONS = {
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP: "timestamptz",
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N: "timestamptz",
    SQLValueFunctionOp.SVFOP_CURRENT_DATE: "date",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME: "timetz",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME_N: "timetz",
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP: "timestamp",
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N: "timestamp",
    SQLValueFunctionOp.SVFOP_LOCALTIME: "time",
    SQLValueFunctionOp.SVFOP_LOCALTIME_N: "time",
}
CLOCK_FUNCTIONS = {
    "now": "timestamptz",
    "transaction_timestamp": "timestamptz",
    "statement_timestamp": "timestamptz",
    "clock_timestamp": "timestamptz",
    "timeofday": "text",
}
# Date/time input strings that read the clock, as in `'now'::timestamptz` or `date 'tomorrow'`,
# with the days they lie from the date at the day's end ('today' is that date's midnight, which
# is the day's end itself).
CLOCK_STRINGS = {"now": 0, "today": 0, "yesterday": -1, "tomorrow": 1}
DATE_TIME_TYPES = {"timestamptz", "timestamp", "date", "time", "timetz"}
# The types in which 'yesterday' and 'tomorrow' differ from 'today' (as a time they are all
# midnight).
DATED_TYPES = {"timestamptz", "timestamp", "date"}


def _cast(argument: ast.Node, type_name: str) -> ast.TypeCast:
    return ast.TypeCast(
        arg=argument,
        typeName=ast.TypeName(names=(ast.String(sval="pg_catalog"), ast.String(sval=type_name))),
    )


def _day_end_as(type_name: str) -> ast.TypeCast:
    return _cast(ast.ParamRef(number=1), type_name)


def _days_from_day_end(days: int, type_name: str) -> ast.TypeCast:
    """Midnight `days` days from the date at the day's end, as `type_name` (a cast even to date,
    so the arithmetic stays one operand wherever it stands)."""
    date = ast.A_Expr(
        kind=A_Expr_Kind.AEXPR_OP,
        name=(ast.String(sval="+" if days > 0 else "-"),),
        lexpr=_day_end_as("date"),
        rexpr=ast.A_Const(val=ast.Integer(ival=abs(days))),
    )
    return _cast(date, type_name)


class _ClockReads(Visitor):
    """Replaces every read of the clock with the day's end, $1, and counts them."""

    def __init__(self) -> None:
        self.replaced = 0

    def visit_SQLValueFunction(self, ancestors, node: ast.SQLValueFunction):
        type_name = CLOCK_VALUE_FUNCTIONS.get(node.op)
        return self._replace(type_name) if type_name else None

    def visit_FuncCall(self, ancestors, node: ast.FuncCall):
        *schema, name = (part.sval.lower() for part in node.funcname)
        if schema not in ([], ["pg_catalog"]):
            return None
        type_name = CLOCK_FUNCTIONS.get(name)
        if type_name and not node.args:
            return self._replace(type_name)
        if name == "age" and node.args and len(node.args) == 1:
            # PostgreSQL's age(x) is age(current_date at midnight, x); its argument is visited
            # next, so a clock read inside it is replaced too.
            self.replaced += 1
            node.args = (_cast(_day_end_as("date"), "timestamp"), *node.args)
        return None

    def visit_TypeCast(self, ancestors, node: ast.TypeCast):
        value = node.arg.val if isinstance(node.arg, ast.A_Const) else None
        type_name = node.typeName.names[-1].sval.lower()
        if not isinstance(value, ast.String) or type_name not in DATE_TIME_TYPES:
            return None
        days = CLOCK_STRINGS.get(value.sval.strip().lower())
        if days is None:
            return None
        if days and type_name in DATED_TYPES:
            self.replaced += 1
            return _days_from_day_end(days, type_name)
        return self._replace(type_name)

    def _replace(self, type_name: str) -> ast.TypeCast:
        self.replaced += 1
        return _day_end_as(type_name)


class _Parameters(Visitor):
    """Counts the parameters ($1, $2, ...) a query has."""

    def __init__(self) -> None:
        self.count = 0

    def visit_ParamRef(self, ancestors, node: ast.ParamRef) -> None:
        self.count += 1


def as_of_day_end(statement: str, where: str) -> str | None:
    """The SELECT with every read of the clock (`now()`, `current_timestamp`, `current_date`,
    `localtime`, `'now'::timestamptz`, `date 'yesterday'`, one-argument `age(x)`, ...) replaced
    in its parse tree by the bound parameter $1, the end of the partition day, then deparsed;
    None when it reads no clock (it then runs as written). ConditionError naming `where` for a
    query with parameters of its own."""
    (raw,) = pglast.parse_sql(statement)
    parameters = _Parameters()
    parameters(raw.stmt)
    if parameters.count:
        raise ConditionError(f"{where}: a condition takes no parameters ($1, $2, ...)")
    clock_reads = _ClockReads()
    tree = clock_reads(raw.stmt)
    return RawStream()(tree) if clock_reads.replaced else None


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
    statement = condition_statement(loop, condition)
    rewritten = as_of_day_end(statement, where)
    # Wrapped on lines of its own, so a trailing `-- comment` ends before the wrapper goes on.
    subquery = f"(\n{rewritten or statement}\n) AS condition"
    preparer = connection.dialect.identifier_preparer
    with read_only_cursor(connection, schema, loop, day, condition.timeout, where) as cursor:
        # PostgreSQL's own placeholders: the query goes to the server as deparsed, with the
        # day's end bound as $1 when it reads the clock.
        raw = psycopg.RawCursor(cursor.connection)
        parameters = [_day_end_in_loops_timezone(cursor)] if rewritten else None
        # LIMIT 0 plans the query and names its columns without reading a row.
        raw.execute(f"SELECT * FROM {subquery} LIMIT 0", parameters)
        columns = [column.name for column in raw.description]
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
            raw.execute(f"EXPLAIN {select_ids}", parameters)
            return set()
        raw.execute(select_ids, parameters)
        return {row[0] for row in raw.fetchall()}


def _day_end_in_loops_timezone(cursor: psycopg.Cursor) -> datetime:
    """The end of the partition day (`as_of()`, as the views read it), with the session's time
    zone set to the loops' for the rest of the transaction: `current_date` is then the date,
    and `localtimestamp` the wall-clock time, at that instant where the loops run."""
    cursor.execute("SELECT set_config('TimeZone', timezone, true), as_of() FROM tracking_state")
    _, day_end = cursor.fetchone()
    return day_end


@contextmanager
def read_only_cursor(
    connection: Connection, schema: str, loop: Loop, day: date, timeout: str | int, where: str
) -> Iterator[psycopg.Cursor]:
    """A driver cursor for a user's SQL: it goes to the driver untouched (no bind-parameter
    parsing), inside a read-only transaction whose settings (the timeout, the search path on
    the pipeline's schema, the partition day and the loop, and the batch statements' memory
    and no JIT: at a million users JIT compiled the shipped condition for 0.3 s of its 2.3 s)
    end with it. A failure of the query is a ConditionError naming `where`."""
    timeout_ms = int(parse_duration(timeout).total_seconds() * 1000)
    preparer = connection.dialect.identifier_preparer
    cursor = connection.connection.driver_connection.cursor()
    try:
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute(
            "SELECT set_config('statement_timeout', %s, true),"
            " set_config('search_path', %s, true),"
            " set_config('retention.partition_date', %s, true),"
            " set_config('retention.loop', %s, true),"
            " set_config('work_mem', %s, true),"
            " set_config('jit', 'off', true)",
            (
                str(timeout_ms),
                f"{preparer.quote_schema(schema)}, pg_catalog",
                day.isoformat(),
                loop.name,
                BATCH_WORK_MEM,
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
