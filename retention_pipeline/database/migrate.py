"""Apply the pipeline's versioned migrations (Alembic) to its own schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

MIGRATIONS = Path(__file__).parent / "migrations"


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


def installation_problem(connection: Connection, schema: str) -> str | None:
    """Why the pipeline cannot run against this database yet, or None when it can."""
    current = current_revision(connection, schema)
    head = head_revision()
    if current == head:
        return None
    return (
        f"schema {schema!r} is at revision {current or 'none'}, expected {head}: run "
        "`retention-pipeline db upgrade`"
    )


def upgrade(connection: Connection, schema: str) -> None:
    """Create the schema if needed and bring it to the newest revision, inside the caller's
    transaction, so a failure leaves nothing half-applied."""
    quoted = connection.dialect.identifier_preparer.quote_schema(schema)
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
    command.upgrade(_alembic_config(connection, schema), "head")
