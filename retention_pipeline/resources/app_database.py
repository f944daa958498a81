"""The app database as a Dagster resource."""

from __future__ import annotations

from functools import cached_property

import dagster as dg
from pydantic import Field, PrivateAttr
from sqlalchemy import Engine

from retention_pipeline.config import ConfigError, RetentionConfig, load_config
from retention_pipeline.database import migrate
from retention_pipeline.database.app_tables import MappingError
from retention_pipeline.database.connection import (
    create_app_engine,
    redact,
    resolve_database_url,
)
from retention_pipeline.tracking.sources import sources_problem
from retention_pipeline.tracking.state import rollup_problem, tracking_sql


class AppDatabase(dg.ConfigurableResource):
    """The app's PostgreSQL: the URL comes from the loop configuration (which may reference
    $RETENTION_DATABASE_URL), or from the demo's commands; with none, one line naming
    `database.url`."""

    config_path: str | None = Field(
        default=None, description="loop configuration; default $RETENTION_CONFIG or retention.yaml"
    )

    _loaded: RetentionConfig | None = PrivateAttr(default=None)

    @classmethod
    def of(cls, config: RetentionConfig) -> AppDatabase:
        """The resource of a configuration already loaded (the definitions'): not read again."""
        database = cls()
        database._loaded = config
        return database

    @cached_property
    def config(self) -> RetentionConfig:
        return self._loaded or load_config(self.config_path)

    @cached_property
    def url(self) -> str:
        try:
            return resolve_database_url(self.config)
        except (ConfigError, ValueError) as wrong:  # one line, and no retry can mend it
            raise dg.Failure(description=str(wrong), allow_retries=False) from None

    @cached_property
    def engine(self) -> Engine:
        return create_app_engine(self.url, self.config.database.statement_timeout)

    @cached_property
    def read_engine(self) -> Engine | None:
        """The read replica's (`database.read_url`); None when the app is read on the primary."""
        read_url = self.config.database.read_url
        if read_url is None:
            return None
        try:
            return create_app_engine(
                read_url, self.config.database.statement_timeout, "database.read_url"
            )
        except ValueError as wrong:
            raise dg.Failure(description=str(wrong), allow_retries=False) from None

    @property
    def schema(self) -> str:
        return self.config.database.schema_

    @property
    def display_url(self) -> str:
        return redact(self.url)

    def ensure_installed(self) -> None:
        """Fail with one line when the pipeline's schema is missing, behind, installed for
        another timezone than the loops now use, its rollup not yet rebuilt, or its activity
        sources not those configured (or the mapping no longer matches the database)."""
        with self.engine.connect() as connection:
            problem = migrate.installation_problem(connection, self.schema)
            if problem is None:
                problem = rollup_problem(connection, self.schema, self.config.timezone)
            if problem is None:
                try:
                    problem = sources_problem(connection, tracking_sql(connection, self.config))
                except MappingError as mismatch:
                    problem = str(mismatch)
        if problem:
            raise dg.Failure(
                description=f"{self.display_url}: {problem}",
                allow_retries=False,
            )
