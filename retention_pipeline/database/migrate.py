"""Apply the pipeline's versioned migrations (Alembic) to its own schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

MIGRATIONS = Path(__file__).parent / "migrations"
# What to do when the configured schema is new but another holds the pipeline's install.
MOVE_HINT = "set `database.schema` to it (README: Moving the pipeline's schema)"


def _alembic_config(connection: Connection, schema: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["schema"] = schema
    return config


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def current_revision(connection: Connection, schema: str) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
    return context.get_current_revision()


def other_install(connection: Connection, schema: str) -> str | None:
    """Another schema of this database holding the pipeline's suppression list or send log: an
    install (its version table beside them), or what `db uninstall` kept of one. Said as the
    schema and, where this role may read them, how many addresses it suppresses; or None. Found
    in the catalogs, which need no privilege on the other schema."""
    other = connection.execute(
        text("""
            SELECT n.nspname
            FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
            WHERE n.nspname <> :schema AND c.relkind IN ('r', 'p')
              AND (c.relname IN ('email_suppressions_kept', 'email_send_log_kept')
                   -- An app may have an `email_suppressions` and Alembic of its own.
                   OR (c.relname = 'email_suppressions'
                       AND (SELECT count(*) FROM pg_class AS ours
                            WHERE ours.relnamespace = n.oid
                              AND ours.relname IN ('alembic_version', 'email_send_log',
                                                   'tracking_state')) = 3))
            ORDER BY n.nspname LIMIT 1"""),
        {"schema": schema},
    ).scalar_one_or_none()
    if other is None:
        return None
    readable = connection.execute(
        text("""
            SELECT c.relname
            FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
            WHERE n.nspname = :other
              AND c.relname IN ('email_suppressions', 'email_suppressions_kept')
              AND has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT')"""),
        {"other": other},
    ).scalars()
    preparer = connection.dialect.identifier_preparer
    counts = [
        connection.execute(
            text(f"SELECT count(*) FROM {preparer.quote_schema(other)}.{preparer.quote(table)}")
        ).scalar_one()
        for table in readable.all()
    ]
    suppressed = f" ({sum(counts)} suppressed address(es))" if counts else ""
    return f"schema {other!r}{suppressed}"


def installation_problem(connection: Connection, schema: str) -> str | None:
    """Why the pipeline cannot run against this database yet, or None when it can."""
    current = current_revision(connection, schema)
    head = head_revision()
    if current == head:
        return None
    problem = (
        f"schema {schema!r} is at revision {current or 'none'}, expected {head}: run "
        "`retention-pipeline db upgrade`"
    )
    other = other_install(connection, schema) if current is None else None
    if other:
        problem += f"; the pipeline's install in this database is in {other}: {MOVE_HINT}"
    return problem


def upgrade(connection: Connection, schema: str) -> None:
    """Create the schema if needed and bring it to the newest revision, inside the caller's
    transaction, so a failure leaves nothing half-applied."""
    quoted = connection.dialect.identifier_preparer.quote_schema(schema)
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
    command.upgrade(_alembic_config(connection, schema), "head")
