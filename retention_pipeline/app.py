"""Bring the app database to a usable state: the embedded demo, or a configured server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

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
        from retention_pipeline.demo import seed_demo

        with engine.begin() as connection:
            seed_demo(
                connection,
                users=DEMO_USERS,
                days=DEMO_DAYS,
                seed=DEMO_SEED,
                end=datetime.now(UTC).replace(microsecond=0),
            )
        seeded = True
    report = install(engine, config, progress=lambda line: print(line, flush=True))
    return PreparedDatabase(url=url, engine=engine, seeded=seeded, install=report)
