"""The activity sources checked against the live database, and each one's SQL.

A source is one app table (or view) whose rows are activity. Its definition (who, when, what,
which rows) compiles into SQL fragments over the alias `src`: the capture triggers, the rebuild
and the poll all select through the same fragments, so they agree row for row. Every function,
operator and type is named in pg_catalog: a trigger function runs with the caller's search_path.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.engine.interfaces import Dialect

from retention_pipeline.config.models import ActionColumn, DatabaseSettings, SourceSpec
from retention_pipeline.database.app_tables import (
    MappingError,
    ResolvedTable,
    catalog_columns,
    id_family_problem,
)
from retention_pipeline.database.predicates import (
    all_of_sql,
    column_ref_problem,
    column_ref_sql,
    predicate_problem,
    sql_literal,
)
from retention_pipeline.database.timestamps import TIMESTAMP_TYPES, timestamp_column_sql

MAX_EVENT_NAME_LENGTH = 200
# pg_class.relkind of relations a trigger can be created on (a table, a partitioned table).
TRIGGER_RELKINDS = ("r", "p")
RELKIND_NAMES = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}


@dataclass(frozen=True)
class ResolvedSource:
    """A source whose table and columns exist and hold what the pipeline reads."""

    spec: SourceSpec
    relkind: str
    # pg_type.typname of each column of the relation
    column_types: dict[str, str]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def capture(self) -> str:
        return self.spec.capture

    @property
    def kind(self) -> str:
        """'s' for a login (an auth session), 'e' for a product action."""
        return "s" if self.spec.source.login else "e"

    def relation_sql(self, dialect: Dialect) -> str:
        preparer = dialect.identifier_preparer
        source = self.spec.source
        return f"{preparer.quote_schema(source.schema_)}.{preparer.quote(source.table)}"

    def user_sql(self, dialect: Dialect, alias: str = "src") -> str:
        return f"{alias}.{dialect.identifier_preparer.quote(self.spec.source.user)}"

    def at_sql(self, dialect: Dialect, alias: str = "src") -> str:
        column = f"{alias}.{dialect.identifier_preparer.quote(self.spec.source.at)}"
        return timestamp_column_sql(column, self.column_types[self.spec.source.at])

    def event_name_sql(self, dialect: Dialect, alias: str = "src") -> str:
        """The action, cut to a length worth showing; '(unnamed)' for an empty one."""
        action = self.spec.source.action
        if action is None:
            return "NULL::pg_catalog.text"
        if not isinstance(action, ActionColumn):
            return f"{sql_literal(action[:MAX_EVENT_NAME_LENGTH])}::pg_catalog.text"
        name = f"({column_ref_sql(action.column, alias, dialect)})::pg_catalog.text"
        named = name
        if action.prefix:
            named = f"({sql_literal(action.prefix)} OPERATOR(pg_catalog.||) {name})"
        return (
            f"pg_catalog.left(CASE WHEN {name} IS NULL OR {name} OPERATOR(pg_catalog.=) '' "
            f"THEN '(unnamed)' ELSE {named} END, {MAX_EVENT_NAME_LENGTH})"
        )

    def filter_sql(self, dialect: Dialect, alias: str = "src") -> str:
        return all_of_sql(self.spec.source.where, alias, dialect, self.column_types)


@dataclass(frozen=True)
class SourcesReport:
    resolved: list[ResolvedSource]
    problems: list[str]


def _relkind(connection: Connection, schema: str, table: str) -> str | None:
    return connection.execute(
        text("""
            SELECT c.relkind FROM pg_catalog.pg_class AS c
            JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
            WHERE n.nspname = :schema AND c.relname = :table
              AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"""),
        {"schema": schema, "table": table},
    ).scalar()


def inspect_sources(
    connection: Connection, database: DatabaseSettings, users: ResolvedTable | None = None
) -> SourcesReport:
    """Check every activity source against the catalog; one line per problem, naming its key.
    `users`, when resolved, is what user columns must be comparable with."""
    resolved: list[ResolvedSource] = []
    problems: list[str] = []
    users_id = None
    if users is not None:
        users_id = catalog_columns(connection, users.mapping.schema_, users.mapping.table)[
            users.mapping.columns["id"]
        ]
    for spec in database.activity_sources():
        source = spec.source
        relkind = _relkind(connection, source.schema_, source.table)
        if relkind is None:
            problems.append(
                f"{spec.key}.table: app table {source.qualified_name} does not exist in the app "
                "database"
            )
            continue
        available = catalog_columns(connection, source.schema_, source.table)
        found = _source_problems(spec, available, users_id, users)
        if relkind not in TRIGGER_RELKINDS and spec.capture != "polling":
            found.append(
                f"{spec.key}.capture: {source.qualified_name} is {RELKIND_NAMES[relkind]}: "
                f"triggers cannot capture it; use `capture: polling`"
            )
        problems.extend(found)
        if not found:
            types = {name: column.type_name for name, column in available.items()}
            resolved.append(ResolvedSource(spec, relkind, types))
    return SourcesReport(resolved, problems)


def _source_problems(spec: SourceSpec, available: dict, users_id, users) -> list[str]:
    source = spec.source
    table = source.qualified_name
    problems: list[str] = []
    for role, reference in (("user", source.user), ("at", source.at)):
        where = spec.column_keys[role]
        missing = column_ref_problem(where, reference, table, available)
        if missing:
            problems.append(missing)
            continue
        column = available[reference]
        if role == "at" and column.type_name not in TIMESTAMP_TYPES:
            problems.append(
                f"{where}: column {table}.{reference} is {column.display}, expected a timestamp"
            )
        if role == "user":
            problem = id_family_problem(
                where, f"{table}.{reference}", column, users_id, users and users.mapping
            )
            if problem:
                problems.append(problem)
    if isinstance(source.action, ActionColumn):
        where = spec.column_keys["action.column"]
        problem = column_ref_problem(where, source.action.column, table, available)
        if problem:
            problems.append(problem)
        elif "." not in source.action.column:
            column = available[source.action.column]
            if column.category not in ("S", "E"):
                problems.append(
                    f"{where}: column {table}.{source.action.column} is {column.display}, "
                    "expected a text or enum type"
                )
    for number, predicate in enumerate(source.where):
        problem = predicate_problem(f"{spec.key}.where.{number}", predicate, table, available)
        if problem:
            problems.append(problem)
    return problems


def resolve_sources(
    connection: Connection, database: DatabaseSettings, users: ResolvedTable
) -> list[ResolvedSource]:
    """The activity sources, checked; raise MappingError naming the first problem."""
    report = inspect_sources(connection, database, users)
    if report.problems:
        raise MappingError(report.problems[0])
    return report.resolved
