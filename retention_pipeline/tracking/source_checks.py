"""What `check` reads of each activity source's recent rows: whether its columns mean what the
mapping says (a user id that reaches users, an action that is a kind and not free text), and how
many rows of the last day it reads, reaching how many users.

These are the only checks that read the app's rows; each reads at most `SAMPLE_ROWS` rows of the
last `SAMPLE_DAYS` days, and as many of the last day, through the source's own definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from retention_pipeline.config.models import ActionColumn
from retention_pipeline.database.activity_sources import ResolvedSource
from retention_pipeline.database.app_tables import ResolvedTable
from retention_pipeline.database.excluded_users import known_user_sql
from retention_pipeline.database.privileges import lacking_right
from retention_pipeline.tracking.sql import TrackingSql

SAMPLE_DAYS = 7
SAMPLE_ROWS = 200_000
# Fewer rows than this say nothing about a column's meaning.
MIN_ROWS_TO_JUDGE = 20
# A user column whose rows reach users less often than this is not a user id.
MIN_USER_REACH = 0.5
# An action column with more distinct values than this, over more than a fifth of its rows
# (most rows named their own way), holds text people wrote, not kinds of action.
FREE_TEXT_MIN_DISTINCT = 50
FREE_TEXT_MIN_DISTINCT_SHARE = 0.2


@dataclass
class SourceReading:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_sources(
    connection: Connection, sql: TrackingSql, users: ResolvedTable, timezone: str
) -> SourceReading:
    reading = SourceReading()
    # A sample of each source's rows: a few users, each looked up by the key. Whether the mapped
    # column holds user ids is asked of every user: an app whose rows are mostly of accounts
    # it excludes (guests, say) maps them right.
    known = known_user_sql(users, "r.user_id", connection.dialect, probe_key=True)
    a_user = known_user_sql(
        users, "r.user_id", connection.dialect, probe_key=True, excluded_too=True
    )
    for source in sql.sources:
        try:
            with connection.begin_nested():
                _read_source(connection, sql, source, known, a_user, timezone, reading)
        except DBAPIError as error:
            statement = " ".join((error.statement or "").split())
            lacking = lacking_right(error, connection.engine.url.username, statement)
            first_line = (str(error.orig).strip().splitlines() or [""])[0]
            reading.problems.append(
                f"{source.spec.key}: reading its last days would fail: {lacking or first_line}"
            )
    return reading


def _read_source(
    connection: Connection,
    sql: TrackingSql,
    source: ResolvedSource,
    known: str,
    a_user: str,
    timezone: str,
    reading: SourceReading,
) -> None:
    relation = source.relation_sql(sql.dialect)
    rows = sql.source_rows(
        source, relation, "{at} >= (now() - CAST(:days AS integer) * interval '1 day')"
    )
    row = connection.execute(
        text(f"""
            WITH r AS (SELECT * FROM ({rows}) AS app_rows LIMIT :limit)
            SELECT count(*) AS rows,
                   count(*) FILTER (WHERE {a_user}) AS reaching,
                   count(DISTINCT event_name) AS names,
                   count(DISTINCT (user_id, event_name)) AS user_names,
                   count(DISTINCT user_id) AS users
            FROM r"""),
        {"days": SAMPLE_DAYS, "limit": SAMPLE_ROWS},
    ).one()
    # The last day read apart, so that a busy week does not cut its count short.
    day_rows = sql.source_rows(
        source,
        relation,
        "{at} >= ((now() AT TIME ZONE :tz)::date - 1)::timestamp AT TIME ZONE :tz"
        " AND {at} < (now() AT TIME ZONE :tz)::date::timestamp AT TIME ZONE :tz",
    )
    day = connection.execute(
        text(f"""
            WITH r AS (SELECT * FROM ({day_rows}) AS app_rows LIMIT :limit)
            SELECT count(*) AS rows, count(DISTINCT user_id) FILTER (WHERE {known}) AS users
            FROM r"""),
        {"limit": SAMPLE_ROWS, "tz": timezone},
    ).one()
    at_least = "at least " if day.rows >= SAMPLE_ROWS else ""
    spec = source.spec
    reading.lines.append(
        f"source `{source.name}` ({spec.source.qualified_name}, {source.capture}): "
        f"{at_least}{day.rows:,} row(s) of the last day"
        f"{' (read no further)' if at_least else ''}, reaching {at_least}{day.users:,} user(s)"
    )
    if row.rows < MIN_ROWS_TO_JUDGE:
        return
    if row.reaching < row.rows * MIN_USER_REACH:
        reading.problems.append(
            f"{spec.column_keys['user']}: {row.reaching:,} of {row.rows:,} rows of "
            f"`{spec.source.qualified_name}` of the last {SAMPLE_DAYS} days reach a user: is "
            f"`{spec.source.user}` a user id?"
        )
    action = spec.source.action
    if (
        isinstance(action, ActionColumn)
        and row.names > FREE_TEXT_MIN_DISTINCT
        and row.names > row.rows * FREE_TEXT_MIN_DISTINCT_SHARE
    ):
        reading.problems.append(
            f"{spec.column_keys['action.column']}: `{action.column}` looks like free text "
            f"({row.names:,} distinct values in {row.rows:,} rows of the last {SAMPLE_DAYS} "
            f"days, {row.user_names / max(row.users, 1):.1f} per user), which emails would show "
            "as actions: name a column of kinds, or give a constant (`action: todo.created`)"
        )
