"""Times in the app's columns, as the pipeline reads them."""

TIMESTAMP_TYPES = ("timestamp", "timestamptz", "date")


def timestamp_column_sql(column: str, type_name: str) -> str:
    """A timestamp column (pg_type.typname `type_name`) as timestamptz; naive timestamps are
    taken as UTC, as ORMs store them."""
    if type_name in ("timestamp", "date"):
        return f"({column}::pg_catalog.timestamp AT TIME ZONE 'UTC')"
    return column
