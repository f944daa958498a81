"""Column references and predicates of the configuration, as SQL over one app table.

The same text serves every place that reads the table: the capture triggers' function bodies,
the rebuilds, the polls, the snapshot, so all of them agree row for row. A trigger's body is
DDL and takes no bind parameters, so configured values are rendered as SQL literals by
SQLAlchemy's own literal rendering (`sql_literal`), identifiers quoted by its preparer. Every
function, operator and type is named in pg_catalog: a trigger function runs with the caller's
search_path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from sqlalchemy import String, literal
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.engine.interfaces import Dialect

from retention_pipeline.config.models import Predicate, Scalar, parse_column_reference
from retention_pipeline.database.timestamps import TIMESTAMP_TYPES, timestamp_column_sql

JSON_TYPES = ("json", "jsonb")
LITERAL_DIALECT = PGDialect(paramstyle="named")
# How JSON spells a flag, read as text: compared, never cast, so a value like "maybe" in one
# row cannot fail the statement (a capture trigger's failure would fail the app's own write).
JSON_FLAG_WORDS = {"true": ("true", "t", "1", "yes"), "false": ("false", "f", "0", "no")}


class ColumnType(Protocol):
    type_name: str  # pg_type.typname
    display: str  # format_type(), as a person writes the type


def sql_literal(value: Scalar) -> str:
    """A configured value as a SQL text literal, escaped by SQLAlchemy. Rendered for a dialect
    whose parameters are named: the driver's dialect would double each `%` for its `%s`
    parameters, and `text()` doubles it again, so `50%` would reach the server as `50%%`."""
    text_value = str(value).lower() if isinstance(value, bool) else str(value)
    return str(
        literal(text_value, String).compile(
            dialect=LITERAL_DIALECT, compile_kwargs={"literal_binds": True}
        )
    )


def column_ref_sql(reference: str, alias: str, dialect: Dialect) -> str:
    """`alias."column"`, or for `column.key.key` the JSON value at that path as text."""
    column, path = parse_column_reference(reference)
    quoted = f"{alias}.{dialect.identifier_preparer.quote(column)}"
    if not path:
        return quoted
    keys = ", ".join(sql_literal(key) for key in path)
    return f"({quoted} OPERATOR(pg_catalog.#>>) ARRAY[{keys}]::pg_catalog.text[])"


def predicate_sql(
    predicate: Predicate, alias: str, dialect: Dialect, column_type: str | None = None
) -> str:
    """The predicate as a boolean SQL expression over `alias`; `column_type` (pg_type.typname of
    the referenced column) says whether a naive timestamp must be read as UTC."""
    value = column_ref_sql(predicate.column, alias, dialect)
    _column, path = parse_column_reference(predicate.column)
    if predicate.is_ is not None:
        state = predicate.is_
        if state in ("set", "unset"):
            return f"({value} IS {'NOT ' if state == 'set' else ''}NULL)"
        if state in ("true", "false") and path:
            words = ", ".join(sql_literal(word) for word in JSON_FLAG_WORDS[state])
            return (
                f"(pg_catalog.lower({value}) OPERATOR(pg_catalog.=) "
                f"ANY (ARRAY[{words}]::pg_catalog.text[]))"
            )
        if state in ("true", "false"):
            return f"({value} IS {state.upper()})"
        moment = timestamp_column_sql(value, column_type or "")
        operator = "OPERATOR(pg_catalog.>)" if state == "future" else "OPERATOR(pg_catalog.<=)"
        return f"({moment} {operator} pg_catalog.now())"
    as_text = f"({value})::pg_catalog.text"
    if predicate.equals is not None:
        return f"({as_text} OPERATOR(pg_catalog.=) {sql_literal(predicate.equals)})"
    values = ", ".join(sql_literal(item) for item in predicate.in_ or ())
    return f"({as_text} OPERATOR(pg_catalog.=) ANY (ARRAY[{values}]::pg_catalog.text[]))"


def all_of_sql(
    predicates: list[Predicate],
    alias: str,
    dialect: Dialect,
    column_types: Mapping[str, str] | None = None,
) -> str:
    """Every predicate holds (TRUE for none)."""
    return _joined(predicates, alias, dialect, column_types, " AND ", "TRUE")


def any_of_sql(
    predicates: list[Predicate],
    alias: str,
    dialect: Dialect,
    column_types: Mapping[str, str] | None = None,
) -> str:
    """At least one predicate holds (FALSE for none)."""
    return _joined(predicates, alias, dialect, column_types, " OR ", "FALSE")


def _joined(
    predicates: list[Predicate],
    alias: str,
    dialect: Dialect,
    column_types: Mapping[str, str] | None,
    operator: str,
    empty: str,
) -> str:
    if not predicates:
        return empty
    types = column_types or {}
    return (
        "("
        + operator.join(
            predicate_sql(
                predicate, alias, dialect, types.get(parse_column_reference(predicate.column)[0])
            )
            for predicate in predicates
        )
        + ")"
    )


def column_ref_problem(
    where: str, reference: str, table: str, available: Mapping[str, ColumnType]
) -> str | None:
    """Why `reference` cannot be read from `table` (its columns `available`), as one line
    starting with the key path `where`; None when it can."""
    column, path = parse_column_reference(reference)
    if column not in available:
        return (
            f"{where}: column {column!r} does not exist in {table} "
            f"(it has: {', '.join(sorted(available))})"
        )
    if path and available[column].type_name not in JSON_TYPES:
        return (
            f"{where}: {reference!r} is a path into {table}.{column}, which is "
            f"{available[column].display}, not json or jsonb"
        )
    return None


def predicate_problem(
    where: str, predicate: Predicate, table: str, available: Mapping[str, ColumnType]
) -> str | None:
    """Why `predicate` cannot test rows of `table`, as one line naming `where`; None if it can."""
    problem = column_ref_problem(f"{where}.column", predicate.column, table, available)
    if problem:
        return problem
    if parse_column_reference(predicate.column)[1]:
        if predicate.is_ in ("future", "past"):
            # A cast of JSON text to a time fails on the first malformed value.
            return (
                f"{where}.is: {predicate.column!r} is a value in JSON, which holds no time: "
                "test a timestamp column"
            )
        return None
    column = available[predicate.column]
    if predicate.is_ in ("true", "false") and column.type_name != "bool":
        return (
            f"{where}.is: {table}.{predicate.column} is {column.display}, not a boolean: "
            f"compare it with `equals` or `in`"
        )
    if predicate.is_ in ("future", "past") and column.type_name not in TIMESTAMP_TYPES:
        return f"{where}.is: {table}.{predicate.column} is {column.display}, not a timestamp"
    if column.type_name == "bool":
        # A boolean reads as the text true or false: any other value would match no row.
        given = [predicate.equals] if predicate.equals is not None else []
        for key, values in (("equals", given), ("in", predicate.in_ or [])):
            for value in values:
                # Text as the column reads it: `True` would match no row either.
                if not (isinstance(value, bool) or value in ("true", "false")):
                    return (
                        f"{where}.{key}: {table}.{predicate.column} is a boolean, and "
                        f"{value!r} is neither true nor false: use `is: true` or `is: false`"
                    )
    return None
