"""Upkeep of the tables the daily audience rewrites and reads back the next morning."""

from sqlalchemy import Engine, text

# Every day's audience updates open episodes in place (their next step, their end) and adds
# assignments, then reads both back the next morning.
AUDIENCE_TABLES = ("episodes", "reengagement_audience")


def vacuum_audience_tables(engine: Engine, schema: str) -> list[str]:
    """VACUUM (ANALYZE) the audience's tables, so the next morning's audience reads no dead
    rows and plans with their real size. Autovacuum may be off, or far behind on a large table
    (by default it waits for a fifth of the rows to change): at a million users, ten days of
    audiences left `episodes` with three dead rows for each live one, read by every scan.
    Returns the tables left alone because the role does not own them (PostgreSQL would only
    warn, and vacuum nothing)."""
    s = engine.dialect.identifier_preparer.quote_schema(schema)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        not_owned = (
            connection.execute(
                text("""SELECT c.relname FROM pg_class AS c
                        JOIN pg_namespace AS n ON n.oid = c.relnamespace
                        WHERE n.nspname = :schema AND c.relname = ANY(:tables)
                          AND NOT pg_has_role(c.relowner, 'MEMBER')
                        ORDER BY c.relname"""),
                {"schema": schema, "tables": list(AUDIENCE_TABLES)},
            )
            .scalars()
            .all()
        )
        for table in AUDIENCE_TABLES:
            if table not in not_owned:
                connection.execute(text(f"VACUUM (ANALYZE) {s}.{table}"))
    return list(not_owned)
