"""The contract with the app's tables: check the configured mapping against the live database.

Everything here reads the catalog only; the pipeline never writes the app's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, text
from sqlalchemy.sql.compiler import IdentifierPreparer

from retention_pipeline.config.models import AppTables, TableMapping, parse_column_reference
from retention_pipeline.database.predicates import (
    column_ref_problem,
    column_ref_sql,
    predicate_problem,
)

TIMESTAMP_TYPES = ("timestamp", "timestamptz", "date")
# What each mapped column must hold for the pipeline's SQL to mean something; a key not named
# here (an id, checked against users.id, or jsonb properties) is not checked by kind.
EXPECTED_KINDS: dict[tuple[str, str], str] = {
    ("users", "email"): "text",
    ("users", "name"): "text",
    ("users", "timezone"): "text",
    ("users", "created_at"): "timestamp",
    ("events", "name"): "label",
    ("events", "created_at"): "timestamp",
    ("sessions", "created_at"): "timestamp",
    ("subscriptions", "status"): "label",
    ("subscriptions", "plan"): "label",
    ("subscriptions", "currency"): "label",
    ("subscriptions", "billing_interval"): "label",
    ("subscriptions", "amount_cents"): "number",
    ("subscriptions", "updated_at"): "timestamp",
}
KIND_DESCRIPTIONS = {
    "text": "a text type",
    "label": "a text or enum type",
    "number": "a numeric type",
    "timestamp": "a timestamp",
}
# Users are joined across tables on their ids as text: a number and a uuid never match.
USER_ID_KEYS = {
    "users": "id",
    "events": "user_id",
    "sessions": "user_id",
    "subscriptions": "user_id",
}


class MappingError(ValueError):
    """The configured mapping does not match the live database; one line naming the culprit."""


@dataclass(frozen=True)
class ResolvedTable:
    """A mapped table with the SQL type of each mapped column, as the database reports it."""

    name: str
    mapping: TableMapping
    column_types: dict[str, str]
    typnames: dict[str, str] = field(default_factory=dict)
    """pg_type.typname of each column the mapping reads, by column name (what a predicate
    compiles with)."""

    def sql_name(self, preparer: IdentifierPreparer) -> str:
        return table_sql(self.mapping, preparer)

    def maps(self, key: str) -> bool:
        """Whether the app has this (optional) column."""
        return key in self.mapping.columns

    def column_sql(self, key: str, alias: str, preparer: IdentifierPreparer) -> str:
        """`alias."column"` for a mapped key, the text at a JSON path (`column.key`), or columns
        joined by a space with blanks skipped (NULL when all are blank); NULL for an optional
        key left unmapped."""
        if key not in self.mapping.columns:
            return "NULL"
        reference = self.mapping.columns[key]
        if isinstance(reference, list):
            parts = ", ".join(
                f"nullif(btrim({column_ref_sql(part, alias, preparer.dialect)}::text), '')"
                for part in reference
            )
            return f"nullif(concat_ws(' ', {parts}), '')"
        return column_ref_sql(reference, alias, preparer.dialect)

    def timestamp_sql(self, key: str, alias: str, preparer: IdentifierPreparer) -> str:
        """The column as timestamptz; naive timestamps are taken as UTC, as ORMs store them."""
        column = self.column_sql(key, alias, preparer)
        if self.column_types.get(key) in ("TIMESTAMP", "DATE"):
            return f"({column}::timestamp AT TIME ZONE 'UTC')"
        return column


@dataclass(frozen=True)
class _Column:
    type_name: str  # pg_type.typname of the column's (base) type
    category: str  # pg_type.typcategory: S string, N numeric, E enum, D date/time, ...
    display: str  # format_type(), as a person writes the type

    @property
    def id_family(self) -> str | None:
        if self.type_name == "uuid":
            return "uuid"
        return {"N": "number", "S": "text"}.get(self.category)


@dataclass(frozen=True)
class MappingReport:
    """Every table whose mapped columns all exist, and every problem found, one line each."""

    resolved: dict[str, ResolvedTable]
    problems: list[str]


def table_sql(mapping: TableMapping, preparer: IdentifierPreparer) -> str:
    """The mapped table's schema-qualified, quoted name."""
    return f"{preparer.quote_schema(mapping.schema_)}.{preparer.quote(mapping.table)}"


def _columns(connection: Connection, mapping: TableMapping) -> dict[str, _Column] | None:
    """The table's (or view's) columns, with domains read as their base type; None when the
    relation does not exist."""
    rows = connection.execute(
        text("""
            SELECT a.attname, coalesce(base.typname, t.typname), coalesce(base.typcategory,
                   t.typcategory), pg_catalog.format_type(a.atttypid, a.atttypmod)
            FROM pg_catalog.pg_class AS c
            JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
            LEFT JOIN pg_catalog.pg_attribute AS a
                ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            LEFT JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
            LEFT JOIN pg_catalog.pg_type AS base ON t.typtype = 'd' AND base.oid = t.typbasetype
            WHERE n.nspname = :schema AND c.relname = :table
              AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            ORDER BY a.attnum"""),
        {"schema": mapping.schema_, "table": mapping.table},
    ).all()
    if not rows:
        return None
    return {
        name: _Column(type_name, category, display)
        for name, type_name, category, display in rows
        if name is not None
    }


def _canonical_type(column: _Column) -> str:
    return {"timestamp": "TIMESTAMP", "timestamptz": "TIMESTAMPTZ", "date": "DATE"}.get(
        column.type_name, column.type_name.upper()
    )


def _has_kind(column: _Column, kind: str) -> bool:
    if kind == "timestamp":
        return column.type_name in TIMESTAMP_TYPES
    if kind == "label":
        return column.category in ("S", "E")
    return column.category == {"text": "S", "number": "N"}[kind]


def inspect_app_tables(connection: Connection, tables: AppTables) -> MappingReport:
    """Check every mapped table and column exists and holds what the pipeline reads from it."""
    resolved: dict[str, ResolvedTable] = {}
    problems: list[str] = []
    found: dict[str, dict[str, _Column]] = {}
    for name, mapping in tables.items():
        available = _columns(connection, mapping)
        if available is None:
            problems.append(
                f"database.tables.{name}.table: app table {mapping.qualified_name} "
                "does not exist in the app database"
            )
            continue
        found[name] = {}
        column_types: dict[str, str] = {}
        # A wrong kind still lets the SQL run; a missing column or a bad path does not.
        unreadable = False
        for key, reference in mapping.columns.items():
            where = f"database.tables.{name}.columns.{key}"
            # A built name's parts, each checked on its own.
            parts = (
                [(f"{where}.{index}", part) for index, part in enumerate(reference)]
                if isinstance(reference, list)
                else [(where, reference)]
            )
            for part_where, part in parts:
                problem = column_ref_problem(part_where, part, mapping.qualified_name, available)
                if problem:
                    problems.append(problem)
                    unreadable = True
                    continue
                column, path = parse_column_reference(part)
                kind = EXPECTED_KINDS.get((name, key))
                if not path and kind and not _has_kind(available[column], kind):
                    problems.append(
                        f"{part_where}: column {mapping.qualified_name}.{column} is "
                        f"{available[column].display}, expected {KIND_DESCRIPTIONS[kind]}"
                    )
            if isinstance(reference, str) and reference in available:
                found[name][key] = available[reference]
                column_types[key] = _canonical_type(available[reference])
            else:  # a JSON value or a built name: text
                column_types[key] = "TEXT"
        for index, predicate in enumerate(getattr(mapping, "exclude", [])):
            problem = predicate_problem(
                f"database.tables.{name}.exclude.{index}",
                predicate,
                mapping.qualified_name,
                available,
            )
            if problem:
                problems.append(problem)
                unreadable = True
        if not unreadable:
            resolved[name] = ResolvedTable(
                name=name,
                mapping=mapping,
                column_types=column_types,
                typnames={
                    column: available[column].type_name
                    for column in mapping.read_columns()
                    if column in available
                },
            )
    problems.extend(_user_id_problems(tables, found))
    return MappingReport(resolved=resolved, problems=problems)


def _user_id_problems(tables: AppTables, found: dict[str, dict[str, _Column]]) -> list[str]:
    problems: list[str] = []
    users_id = found.get("users", {}).get("id")
    for name, key in USER_ID_KEYS.items():
        column = found.get(name, {}).get(key)
        if column is None:
            continue
        mapping: TableMapping = getattr(tables, name)
        where = f"database.tables.{name}.columns.{key}"
        qualified = f"{mapping.qualified_name}.{mapping.columns[key]}"
        if column.id_family is None:
            problems.append(
                f"{where}: column {qualified} is {column.display}, expected a user id "
                "(an integer, text or uuid type)"
            )
        elif (
            name != "users"
            and users_id is not None
            and users_id.id_family is not None
            and "text" not in (column.id_family, users_id.id_family)
            and column.id_family != users_id.id_family
        ):
            problems.append(
                f"{where}: column {qualified} is {column.display} but "
                f"{tables.users.qualified_name}.{tables.users.columns['id']} is "
                f"{users_id.display}: their values never match"
            )
    return problems


def resolve_app_tables(connection: Connection, tables: AppTables) -> dict[str, ResolvedTable]:
    """The mapped tables, checked; raise MappingError naming the first problem."""
    report = inspect_app_tables(connection, tables)
    if report.problems:
        raise MappingError(report.problems[0])
    return report.resolved
