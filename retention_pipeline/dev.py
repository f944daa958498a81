"""What `retention-pipeline dev` does around Dagster: bring the app database to a usable state
(the embedded demo, or a configured server), and keep to one running `dev` per RETENTION_HOME.

A second `dev` would fail to bind the port, start a second daemon on the same instance, and on
its way out stop the embedded PostgreSQL the first one uses."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import table_sql
from retention_pipeline.database.connection import (
    create_app_engine,
    resolve_database_url,
    uses_embedded_database,
)
from retention_pipeline.tracking.install import InstallReport, install

DEMO_USERS = 2000
DEMO_DAYS = 120
DEMO_SEED = 42


@dataclass(frozen=True)
class PreparedDatabase:
    url: str
    engine: Engine
    seeded: bool
    install: InstallReport


def _has_users(engine: Engine, config: RetentionConfig) -> bool:
    users = config.database.tables.users
    with engine.connect() as connection:
        table = table_sql(users, connection.dialect.identifier_preparer)
        if connection.execute(text("SELECT to_regclass(:name)"), {"name": table}).scalar() is None:
            return False
        return connection.execute(text(f"SELECT EXISTS (SELECT FROM {table})")).scalar()


def prepare_database(config: RetentionConfig) -> PreparedDatabase:
    """Resolve the database, seed demo data into an empty embedded one, then install.

    A configured database is the user's own: it is never seeded."""
    url = resolve_database_url(config)
    engine = create_app_engine(url, config.database.statement_timeout)
    seeded = False
    if uses_embedded_database(config) and not _has_users(engine, config):
        from retention_pipeline.demo import EmailEffect, seed_demo

        with engine.begin() as connection:
            seed_demo(
                connection,
                users=DEMO_USERS,
                days=DEMO_DAYS,
                seed=DEMO_SEED,
                end=datetime.now(UTC).replace(microsecond=0),
                email_effect=EmailEffect.for_loop(config.loops[0]),
            )
        seeded = True
    report = install(engine, config, progress=lambda line: print(line, flush=True))
    return PreparedDatabase(url=url, engine=engine, seeded=seeded, install=report)


LOCK_FILE_NAME = "dev.lock"


class DevAlreadyRunning(ValueError):
    """Another `retention-pipeline dev` runs on the same RETENTION_HOME."""


def _holder_description(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text())
        return f"(pid {holder['pid']}) at {holder['url']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment from now
        return f"(it holds {lock_path})"


def running_dev(home: Path) -> str | None:
    """Describe the `dev` running on `home` (its pid and URL), or None when none runs.

    The lock is an flock the operating system releases when its holder dies, so a lock file a
    killed `dev` left behind counts as free."""
    lock_path = home / LOCK_FILE_NAME
    try:
        lock_file = lock_path.open()
    except FileNotFoundError:
        return None
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_description(lock_path)
    return None


@contextlib.contextmanager
def single_dev(home: Path, url: str) -> Iterator[None]:
    """Hold the `dev` lock of `home` (with this process's pid and `url` in it) while the block
    runs; raise DevAlreadyRunning, naming the holder, when another `dev` holds it."""
    home.mkdir(parents=True, exist_ok=True)
    lock_path = home / LOCK_FILE_NAME
    with lock_path.open("a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DevAlreadyRunning(
                f"retention-pipeline dev already runs {_holder_description(lock_path)}: "
                "use that one, or stop it first"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps({"pid": os.getpid(), "url": url}))
        lock_file.flush()
        try:
            yield
        finally:
            lock_file.seek(0)
            lock_file.truncate()
