"""Which database the pipeline talks to, and the engine it talks through."""

from __future__ import annotations

import os

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from retention_pipeline.config.loader import DATABASE_URL_ENV_VAR, ConfigError
from retention_pipeline.config.models import RetentionConfig, parse_duration


def normalize_url(url: str) -> str:
    """Our own code speaks psycopg 3: accept plain `postgresql://` URLs and say so explicitly."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("database.url: not a database URL (postgresql://user@host/db)") from None
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"database.url: expected a PostgreSQL URL, got {parsed.drivername!r}")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


MISSING_DATABASE_URL = (
    f"database.url: not set: give your app database's URL (the shipped retention.yaml reads "
    f"${DATABASE_URL_ENV_VAR}); the demo on an embedded PostgreSQL is `retention-pipeline dev`, "
    "or --demo for any other command"
)


def configured_database_url(config: RetentionConfig) -> str | None:
    """`database.url`, else $RETENTION_DATABASE_URL, else None."""
    return config.database.url or os.environ.get(DATABASE_URL_ENV_VAR) or None


def uses_embedded_database(config: RetentionConfig) -> bool:
    """Whether this configuration runs the demo: its database is the embedded server, whose URL
    only the demo's commands hand out (`dev`, `demo`, `--demo`, through $RETENTION_DATABASE_URL
    to the Dagster processes they start). No URL at all is not the demo: it is an error."""
    url = configured_database_url(config)
    if url is None:
        return False
    from retention_pipeline.database import embedded

    return embedded.is_embedded_url(url)


def resolve_database_url(config: RetentionConfig) -> str:
    """The configured URL, else $RETENTION_DATABASE_URL; neither is one line naming
    `database.url`. Never starts a server: only the demo's commands start the embedded one."""
    url = configured_database_url(config)
    if url is None:
        raise ConfigError(MISSING_DATABASE_URL)
    return normalize_url(url)


def create_app_engine(url: str, statement_timeout: str | int = "10m") -> Engine:
    """An engine whose every connection carries the statement timeout."""
    timeout_ms = int(parse_duration(statement_timeout).total_seconds() * 1000)
    # hide_parameters: a failed statement's message, logged by Dagster, never holds an address.
    engine = create_engine(normalize_url(url), pool_pre_ping=True, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _set_timeout(dbapi_connection, _record) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT set_config('statement_timeout', %s, false)", (str(timeout_ms),))
        dbapi_connection.commit()

    return engine


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and metadata."""
    return make_url(url).render_as_string(hide_password=True)
