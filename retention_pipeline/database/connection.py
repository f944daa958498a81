"""Which database the pipeline talks to, and the engine it talks through."""

from __future__ import annotations

import os

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from retention_pipeline.config.loader import DATABASE_URL_ENV_VAR
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


def uses_embedded_database(config: RetentionConfig) -> bool:
    """Whether the app database is the embedded demo server: no URL configured, or the URL of
    that server, which `retention-pipeline dev` hands the Dagster processes it starts."""
    url = config.database.url or os.environ.get(DATABASE_URL_ENV_VAR)
    if not url:
        return True
    from retention_pipeline.database import embedded

    return embedded.is_embedded_url(url)


def resolve_database_url(config: RetentionConfig) -> str:
    """The configured URL, else $RETENTION_DATABASE_URL, else the embedded server (started now)."""
    url = config.database.url or os.environ.get(DATABASE_URL_ENV_VAR)
    if url:
        return normalize_url(url)
    from retention_pipeline.database import embedded

    return embedded.start()


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
