"""The contract with the app's tables: check the configured mapping against the live database.

Everything here reads the catalog only; the pipeline never writes the app's tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, inspect
from sqlalchemy.sql.compiler import IdentifierPreparer
from sqlalchemy.sql.elements import quoted_name

from retention_pipeline.config.models import AppTables, TableMapping

TIMESTAMP_COLUMNS = {"created_at", "updated_at"}


class MappingError(ValueError):
    """The configured mapping does not match the live database; one line naming the culprit."""


@dataclass(frozen=True)
class ResolvedTable:
    """A mapped table with the SQL type of each mapped column, as the database reports it."""

    name: str
    mapping: TableMapping
    column_types: dict[str, str]

    def sql_name(self, preparer: IdentifierPreparer) -> str:
        return table_sql(self.mapping, preparer)

    def column_sql(self, key: str, alias: str, preparer: IdentifierPreparer) -> str:
        """`alias."column"` for a mapped key; NULL for an optional key left unmapped."""
        if key not in self.mapping.columns:
            return "NULL"
        return f"{alias}.{preparer.quote(self.mapping.columns[key])}"

    def timestamp_sql(self, key: str, alias: str, preparer: IdentifierPreparer) -> str:
        """The column as timestamptz; naive timestamps are taken as UTC, as ORMs store them."""
        column = self.column_sql(key, alias, preparer)
        if self.column_types.get(key) in ("TIMESTAMP", "DATE"):
            return f"({column}::timestamp AT TIME ZONE 'UTC')"
        return column


def table_sql(mapping: TableMapping, preparer: IdentifierPreparer) -> str:
    """The mapped table's schema-qualified, quoted name."""
    return f"{preparer.quote_schema(mapping.schema_)}.{preparer.quote(mapping.table)}"


def _column_types(connection: Connection, mapping: TableMapping) -> dict[str, str] | None:
    inspector = inspect(connection)
    # quoted_name(..., True) keeps camelCase names as written instead of folding them.
    table = quoted_name(mapping.table, True)
    schema = quoted_name(mapping.schema_, True)
    if not inspector.has_table(table, schema=schema):
        return None
    columns = inspector.get_columns(table, schema=schema)
    return {column["name"]: _type_name(column["type"]) for column in columns}


def _type_name(column_type) -> str:
    name = type(column_type).__name__.upper()
    if name == "TIMESTAMP" and getattr(column_type, "timezone", False):
        return "TIMESTAMPTZ"
    return name


def resolve_app_tables(connection: Connection, tables: AppTables) -> dict[str, ResolvedTable]:
    """Check every mapped table and column exists; raise MappingError naming the first missing."""
    resolved: dict[str, ResolvedTable] = {}
    for name, mapping in tables.items():
        available = _column_types(connection, mapping)
        if available is None:
            raise MappingError(
                f"database.tables.{name}.table: app table {mapping.qualified_name} "
                "does not exist in the app database"
            )
        types: dict[str, str] = {}
        for key, column in mapping.columns.items():
            if column not in available:
                raise MappingError(
                    f"database.tables.{name}.columns.{key}: column {column!r} does not exist in "
                    f"{mapping.qualified_name} (it has: {', '.join(sorted(available))})"
                )
            types[key] = available[column]
            if key in TIMESTAMP_COLUMNS and types[key] not in ("TIMESTAMP", "TIMESTAMPTZ", "DATE"):
                raise MappingError(
                    f"database.tables.{name}.columns.{key}: column {mapping.qualified_name}."
                    f"{column} is {types[key]}, expected a timestamp"
                )
        resolved[name] = ResolvedTable(name=name, mapping=mapping, column_types=types)
    return resolved
