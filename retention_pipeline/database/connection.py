"""Which database the pipeline talks to, and the engine it talks through."""

from __future__ import annotations

import os

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from retention_pipeline.config.loader import DATABASE_URL_ENV_VAR, ConfigError
from retention_pipeline.config.models import RetentionConfig, parse_duration


def normalize_url(url: str, key: str = "database.url") -> str:
    """Our own code speaks psycopg 3: accept plain `postgresql://` URLs and say so explicitly.
    Errors name the configuration `key` the URL came from."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not one (`:r@h`)
        raise ValueError(
            f"{key}: not a database URL (postgresql://user:password@host/db; write an '@' or "
            "':' in the password as %40 or %3A)"
        ) from None
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"{key}: expected a PostgreSQL URL, got {parsed.drivername!r}")
    # The rest of such a password would be taken for the host, and shown in every error.
    if "@" in (parsed.host or ""):
        raise ValueError(f"{key}: the password holds an '@': write it as %40 in the URL")
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


def create_app_engine(
    url: str, statement_timeout: str | int = "10m", key: str = "database.url"
) -> Engine:
    """An engine whose every connection carries the statement timeout; the URL's errors name
    the configuration `key` it came from."""
    timeout_ms = int(parse_duration(statement_timeout).total_seconds() * 1000)
    # hide_parameters: a failed statement's message, logged by Dagster, never holds an address.
    engine = create_engine(normalize_url(url, key), pool_pre_ping=True, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _set_timeout(dbapi_connection, _record) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT set_config('statement_timeout', %s, false)", (str(timeout_ms),))
        dbapi_connection.commit()

    return engine


# libpq's parameters that hold a secret, which a URL may carry in its query.
SECRET_PARAMETERS = ("password", "sslpassword")


def redact(url: str) -> str:
    """The URL with its password hidden, in its user part or its query, for logs and
    metadata."""
    parsed = make_url(url)
    hidden = {name: "redacted" for name in SECRET_PARAMETERS if name in parsed.query}
    return parsed.update_query_dict(hidden).render_as_string(hide_password=True)
