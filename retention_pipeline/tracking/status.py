"""What the rollup holds, and whether it agrees with the app's tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.excluded_users import known_user_sql
from retention_pipeline.tracking.sql import CAPTURE_TABLES
from retention_pipeline.tracking.state import tracking_sql


@dataclass(frozen=True)
class RollupStatus:
    mode: str
    timezone: str
    rows: int
    first_day: date | None
    last_day: date | None
    users_on_last_day: int
    """Users active on the last day (a row of the rollup is one user's day): counted through the
    day's index, where a distinct count of every user would read the whole history on every
    drain, the morning's included."""


def rollup_status(connection: Connection, schema: str) -> RollupStatus:
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    row = connection.execute(
        text(f"""
        SELECT state.mode, state.timezone,
               (SELECT count(*) FROM {s}.activity_daily),
               (SELECT min(day) FROM {s}.activity_daily),
               last.day,
               (SELECT count(*) FROM {s}.activity_daily AS a WHERE a.day = last.day)
        FROM {s}.tracking_state AS state,
             (SELECT max(day) AS day FROM {s}.activity_daily) AS last""")
    ).one()
    return RollupStatus(*row)


@dataclass(frozen=True)
class DayReconciliation:
    day: date
    app_events: int
    tracked_events: int
    app_sessions: int
    tracked_sessions: int
    # Each source's rows of the day in the app (a polled source's up to its watermark).
    app_rows_by_source: dict[str, int] = field(default_factory=dict)
    # Sources whose counted history is more than the app still holds: a time updated in place
    # (each earlier value was counted), or a polled source (a row moved in place keeps its old
    # time counted). Their kind's tracked count may exceed the app's, never fall short.
    inexact_sources: tuple[str, ...] = ()
    inexact_kinds: tuple[str, ...] = ()
    # Each source's rows of the day the folds counted (plus the capture's), for the sources
    # counted since before the day; and the sources whose count falls short of the app's rows,
    # every user's (rows the app deleted since leave a count above the app's, never below).
    counted_rows_by_source: dict[str, int] = field(default_factory=dict)
    short_sources: tuple[str, ...] = ()
    # A polled source's rows stamped yesterday but committed since its last poll are not lost:
    # the next poll counts them.
    polled_sources: tuple[str, ...] = ()

    @property
    def matches(self) -> bool:
        return not self.short_sources and all(
            tracked >= app if kind in self.inexact_kinds else tracked == app
            for kind, app, tracked in (
                ("e", self.app_events, self.tracked_events),
                ("s", self.app_sessions, self.tracked_sessions),
            )
        )

    @property
    def compared(self) -> str:
        """What was compared, in a sentence."""
        short = (
            "; " + ", ".join(f"`{name}`" for name in self.short_sources) + " counted fewer rows "
            "than the app holds: rows were lost"
            if self.short_sources
            else ""
        )
        if set(self.short_sources) & set(self.polled_sources):
            short += ", or (a polled source) committed since its last poll, which the next counts"
        # Sources counted since before the day; the others have no count of it to compare.
        each = (
            "; each source counted since before the day counted at least its rows in the app"
            if self.counted_rows_by_source
            else ""
        )
        if not self.inexact_sources:
            return "each source's rows of the day equal the rollup's plus the capture's" + short
        names = ", ".join(f"`{name}`" for name in self.inexact_sources)
        return (
            f"rows of sources captured by inserts equal the rollup's; {names} keep earlier values "
            "of rows the app updated in place, so there the rollup may hold more, never less"
            + each
            + short
        )


def reconcile_last_day(connection: Connection, config: RetentionConfig) -> DayReconciliation:
    """Every source's rows of the last complete day, against the rollup plus the capture not
    yet folded, in one snapshot. Counted for known users only: rows of unknown or erased users
    are not the rollup's concern. A row deleted in the app after it was counted shows here as a
    difference. Sources whose history outgrows the app's rows (`updates`, `polling`) are
    compared as a lower bound. And each source on its own, where a kind's total cannot tell
    one source's loss from another's surplus: what the folds counted of it that day
    (`source_day_rows`, every user's) must be at least its rows in the app, for the sources
    counted since before the day (`tracking_sources.rows_counted_from`)."""
    sql = tracking_sql(connection, config)
    s = sql.q_schema
    known = known_user_sql(sql.users, "r.user_id", connection.dialect, probe_key=False)
    in_day = "{at} >= (SELECT lower FROM bounds) AND {at} < (SELECT upper FROM bounds)"
    parameters: dict[str, object] = {"tz": config.timezone}
    app_parts = []
    for index, source in enumerate(sql.sources):
        time_range = in_day
        if source.capture == "polling":
            time_range += f" AND {{at}} <= CAST(:watermark_{index} AS timestamptz)"
            parameters[f"watermark_{index}"] = connection.execute(
                text(f"SELECT watermark FROM {s}.tracking_sources WHERE name = :name"),
                {"name": source.name},
            ).scalar()
        parameters[f"source_{index}"] = source.name
        app_parts.append(
            f"SELECT CAST(:source_{index} AS text) AS source, kind, user_id FROM "
            f"({sql.source_rows(source, source.relation_sql(sql.dialect), time_range)}) AS rows"
        )
    app_rows = " UNION ALL ".join(app_parts)
    captured = " UNION ALL ".join(
        f"SELECT source, kind, user_id FROM {s}.{table} "
        "WHERE at >= (SELECT lower FROM bounds) AND at < (SELECT upper FROM bounds)"
        for table in CAPTURE_TABLES
    )
    rows = connection.execute(
        text(f"""
            WITH bounds AS (
                SELECT day, day::timestamp AT TIME ZONE :tz AS lower,
                       (day + 1)::timestamp AT TIME ZONE :tz AS upper
                FROM (SELECT (now() AT TIME ZONE :tz)::date - 1 AS day) AS yesterday
            ),
            app AS (
                SELECT source, kind, count(*) AS n
                FROM ({app_rows}) AS r WHERE {known} GROUP BY 1, 2
            ),
            -- Every user's rows, read again: the known users' test inside an aggregate's
            -- filter is a scan of the users table per row, where in WHERE it is one hash join.
            app_every AS (
                SELECT source, count(*) AS n
                FROM ({app_rows}) AS r GROUP BY 1
            ),
            captured AS (
                SELECT kind, count(*) AS n FROM ({captured}) AS r WHERE {known} GROUP BY kind
            ),
            -- Each source's count: the folds' plus the capture's, for the sources counted
            -- since before the day.
            pending AS (
                SELECT source, count(*) AS n FROM ({captured}) AS r GROUP BY source
            ),
            counted AS (
                SELECT state.name AS source,
                       coalesce(day_rows.rows, 0) + coalesce(pending.n, 0) AS n
                FROM {s}.tracking_sources AS state
                LEFT JOIN {s}.source_day_rows AS day_rows
                    ON day_rows.source = state.name AND day_rows.day = (SELECT day FROM bounds)
                LEFT JOIN pending ON pending.source = state.name
                WHERE coalesce(state.rows_counted_from <= (SELECT day FROM bounds), TRUE)
            ),
            rolled AS (
                SELECT coalesce(sum(event_count), 0) AS events,
                       coalesce(sum(session_count), 0) AS sessions
                FROM {s}.activity_daily AS r
                WHERE day = (SELECT day FROM bounds) AND {known}
            )
            SELECT (SELECT day FROM bounds) AS day,
                   (SELECT events FROM rolled)
                       + coalesce((SELECT n FROM captured WHERE kind = 'e'), 0) AS events,
                   (SELECT sessions FROM rolled)
                       + coalesce((SELECT n FROM captured WHERE kind = 's'), 0) AS sessions,
                   (SELECT coalesce(json_agg(json_build_array(source, kind, n)), '[]')
                    FROM app) AS by_source,
                   (SELECT coalesce(json_object_agg(source, n), '{{}}') FROM app_every)
                       AS every_by_source,
                   (SELECT coalesce(json_object_agg(source, n), '{{}}') FROM counted)
                       AS counted_by_source"""),
        parameters,
    ).one()
    by_source = {source.name: 0 for source in sql.sources}
    app = {"e": 0, "s": 0}
    for name, kind, n in rows.by_source:
        by_source[name] += n
        app[kind] += n
    every_by_source = {name: int(n) for name, n in rows.every_by_source.items()}
    counted = {name: int(n) for name, n in rows.counted_by_source.items()}
    inexact = [source for source in sql.sources if source.capture != "inserts"]
    return DayReconciliation(
        day=rows.day,
        app_events=app["e"],
        tracked_events=int(rows.events),
        app_sessions=app["s"],
        tracked_sessions=int(rows.sessions),
        app_rows_by_source=by_source,
        inexact_sources=tuple(source.name for source in inexact),
        inexact_kinds=tuple(sorted({source.kind for source in inexact})),
        counted_rows_by_source=counted,
        polled_sources=tuple(source.name for source in sql.sources if source.capture == "polling"),
        short_sources=tuple(
            source.name
            for source in sql.sources
            if source.name in counted and counted[source.name] < every_by_source.get(source.name, 0)
        ),
    )
