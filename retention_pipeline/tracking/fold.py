"""Folding rows into the rollup: what one fold added, and recomputing a range of days."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.database.activity_sources import ResolvedSource
from retention_pipeline.database.batch import tune_for_batch
from retention_pipeline.tracking.sql import POLL_LOOKBACK, TrackingSql


@dataclass(frozen=True)
class Added:
    """What one fold added to the rollup."""

    events: int
    sessions: int
    user_days: int
    days: tuple[date, ...]


def added_by(result_rows) -> Added:
    rows = list(result_rows)
    return Added(
        events=sum(row.events for row in rows),
        sessions=sum(row.sessions for row in rows),
        user_days=sum(row.user_days for row in rows),
        days=tuple(sorted(row.day for row in rows)),
    )


def recompute_days(
    connection: Connection,
    sql: TrackingSql,
    timezone: str,
    first_day: date | None,
    end_day: date | None,
    visit_gap_minutes: int,
    *,
    sources: tuple[ResolvedSource, ...],
    clear: bool = False,
    into_emptied_days: bool = True,
) -> Added:
    """Fold the rows of `sources` of days [first_day, end_day) (None: open) into the rollup,
    less what the capture still holds, after removing those days from the rollup when `clear`.
    A polled source counts up to its watermark less the lookback (the polls count the rest).
    `into_emptied_days`: the rollup holds nothing of these days (see `TrackingSql.fold`). Visits
    are counted with the installed gap, `visit_gap_minutes`."""
    s = sql.q_schema
    params = {
        "tz": timezone,
        "first_day": first_day,
        "end_day": end_day,
        "captured_sources": [source.name for source in sources if source.capture != "polling"],
    }
    for index, source in enumerate(sources):
        params[f"source_{index}"] = source.name
        if source.capture == "polling":
            params[f"poll_cut_{index}"] = connection.execute(
                text(f"""
                    SELECT watermark - CAST(:lookback AS interval)
                    FROM {s}.tracking_sources WHERE name = :name"""),
                {"lookback": POLL_LOOKBACK, "name": source.name},
            ).scalar_one()
    if clear:
        for table in ("activity_daily", "action_daily", "source_day_rows"):
            connection.execute(
                text(f"""
                    DELETE FROM {s}.{table}
                    WHERE day >= coalesce(CAST(:first_day AS date), '-infinity')
                      AND day < coalesce(CAST(:end_day AS date), 'infinity')"""),
                params,
            )
    tune_for_batch(connection)
    rows = sql.app_rows_less_capture(sources)
    fold = sql.fold(
        rows, "CAST(:tz AS text)", visit_gap_minutes, into_emptied_days=clear or into_emptied_days
    )
    added = added_by(connection.execute(text(fold), params))
    # Counted in a statement of its own (in the fold's, the rows would be kept for both readers:
    # over 100 MB of temporary files a chunk). The two agree but for a polled row committed in
    # between, more than the poll's lookback late: days before yesterday, which the
    # reconciliation does not compare. A row captured in between is in both sides of `rows`.
    connection.execute(text(sql.count_source_rows(rows, "CAST(:tz AS text)")), params)
    return added


def record_late_days(connection: Connection, sql: TrackingSql, days: set[date]) -> tuple[date, ...]:
    """The days among `days` on or before a day with a snapshot build, noted as changed now: a
    snapshot built before that, which sums every day before its own, cannot be rolled forward
    into the next day. A day with no snapshot of its own counts too (never built, dropped by
    `keep_days`, before `start_date`): a later day's snapshot summed it."""
    if not days:
        return ()
    rows = connection.execute(
        text(f"""
            INSERT INTO {sql.q_schema}.late_activity AS late (day, noticed_at)
            SELECT day, now() FROM unnest(CAST(:days AS date[])) AS day
            WHERE EXISTS (SELECT FROM {sql.q_schema}.snapshot_builds AS build
                          WHERE build.partition_date >= day)
            ON CONFLICT (day) DO UPDATE SET noticed_at = excluded.noticed_at
            RETURNING late.day"""),
        {"days": sorted(days)},
    )
    return tuple(sorted(row.day for row in rows))
