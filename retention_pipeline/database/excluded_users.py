"""Accounts that must never be emailed: `database.tables.users.exclude`, as SQL over the app's
users table.

Every read of the users table keeps only the rows `kept_sql` holds, so an excluded account never
enters a snapshot, a segment, an audience or the send; one that becomes excluded is erased like a
deleted one (`tracking.erasure.record_users_gone`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.engine.interfaces import Dialect

from retention_pipeline.config.models import Predicate, UsersMapping
from retention_pipeline.database.app_tables import ResolvedTable
from retention_pipeline.database.predicates import any_of_sql


def excluded_sql(users: ResolvedTable, alias: str, dialect: Dialect) -> str:
    """Whether the users row `alias` matches any exclusion (TRUE; FALSE or NULL otherwise)."""
    if not isinstance(users.mapping, UsersMapping):
        raise TypeError(f"{users.name} is not the users table's mapping")
    return any_of_sql(users.mapping.exclude, alias, dialect, users.base_types)


def kept_sql(users: ResolvedTable, alias: str, dialect: Dialect) -> str:
    """Whether the users row `alias` may be read: no exclusion holds. A test over a NULL value
    (`status in [LOCKED]` with no status) excludes nobody."""
    return f"(({excluded_sql(users, alias, dialect)}) IS NOT TRUE)"


def known_user_sql(
    users: ResolvedTable,
    user_id: str,
    dialect: Dialect,
    *,
    probe_key: bool,
    excluded_too: bool = False,
) -> str:
    """Whether the text `user_id` is a user of the app the pipeline may read (not excluded, or
    any user at all with `excluded_too`); `probe_key` for a few users
    (`ResolvedTable.id_equals_sql`)."""
    preparer = dialect.identifier_preparer
    kept = "" if excluded_too else f" AND {kept_sql(users, 'u', dialect)}"
    return (
        f"EXISTS (SELECT FROM {users.sql_name(preparer)} AS u "
        f"WHERE {users.id_equals_sql('u', user_id, preparer, probe_key=probe_key)}{kept})"
    )


@dataclass(frozen=True)
class ExclusionCount:
    users: int
    """Rows of the app's users table."""
    excluded: int
    """Of those, matching any exclusion."""
    per_exclusion: tuple[int, ...]
    """Matching each exclusion, in configuration order (a user may match several)."""

    def __str__(self) -> str:
        return f"the exclusions keep out {self.excluded:,} of {self.users:,} users"


def describe(predicate: Predicate) -> str:
    """The predicate as the configuration says it: `deletedAt is set`, `status in [LOCKED]`."""
    if predicate.is_ is not None:
        return f"{predicate.column} is {predicate.is_}"
    if predicate.equals is not None:
        return f"{predicate.column} equals {predicate.equals}"
    return f"{predicate.column} in [{', '.join(str(value) for value in predicate.in_ or ())}]"


def count_excluded(connection: Connection, users: ResolvedTable) -> ExclusionCount:
    """How many of the app's users the exclusions keep out, in all and one by one."""
    dialect = connection.dialect
    each = [
        f"count(*) FILTER (WHERE {any_of_sql([predicate], 'u', dialect, users.base_types)})"
        for predicate in users.mapping.exclude
    ]
    row = connection.execute(
        text(f"""
            SELECT count(*), count(*) FILTER (WHERE NOT {kept_sql(users, "u", dialect)})
                   {"".join(f", {count}" for count in each)}
            FROM {users.sql_name(dialect.identifier_preparer)} AS u""")
    ).one()
    return ExclusionCount(users=row[0], excluded=row[1], per_exclusion=tuple(row[2:]))
