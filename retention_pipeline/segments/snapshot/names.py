"""Quoted names of the mapped app tables and columns, for the snapshot's SQL."""

from __future__ import annotations

from sqlalchemy import Connection

from retention_pipeline.database.app_tables import ResolvedTable


class AppNames:
    """Quoted names of the mapped app tables and columns."""

    def __init__(self, connection: Connection, tables: dict[str, ResolvedTable]):
        self.preparer = connection.dialect.identifier_preparer
        self.tables = tables

    def table(self, name: str) -> str:
        return self.tables[name].sql_name(self.preparer)

    def column(self, name: str, key: str, alias: str) -> str:
        return self.tables[name].column_sql(key, alias, self.preparer)

    def timestamp(self, name: str, key: str, alias: str) -> str:
        return self.tables[name].timestamp_sql(key, alias, self.preparer)
