"""Storage layouts of the rollup the drain could write instead of the shipped one, measured at
statement level before any is built: each layout's fold of the same captured rows, side by side
with the shipped fold, by the backend's CPU time, and what its readers pay (docs/drain.md).

Layouts (kept here only to be measured):

- shipped: `activity_daily` and `action_daily`, primary keys (user_id, day[, event_name]) and a
  day index each; and the same with the keys' text columns in the C collation.
- day-first keys: the same tables keyed (day, user_id[, event_name]), no day index, keys written
  in that order.
- actions inline: each user-day's actions inside its `activity_daily` row (parallel arrays of
  names, counts and latest times, sorted by name), no `action_daily`: about half the rows and
  index entries. With the captured rows hashed into their keys (as shipped) or sorted and
  aggregated adjacent; with or without the day index.
- actions inline, day-first key: the same, keyed (day, user_id), no other index.
- actions inline, rows sorted, day partitions: the table partitioned by day in place of a day
  index.
- shipped tables, day partitions written whole: both tables partitioned by day, no day index.
  A fold writes each day it touches into a new table without indexes (a day held: its rows
  merged with the fold's), builds the table's primary key by one sort, and swaps it in for the
  day's partition: a held day costs a read and a new write instead of an update per key.
- append-only deltas: each fold's user-days (actions inline, rows sorted) inserted as new rows
  of a table partitioned by day, held day or not; readers read views summing each key's rows.
  Without or with a (user_id, day) index, not unique.
- recent deltas unindexed, compacted days: each fold's user-days appended to a table with no
  index at all; a compaction off the drain moves them into a table keyed (user_id, day) with a
  day index; readers read views summing both. The compaction is measured too.

The captured rows are prepared once in a scratch database (schema `layouts`); each fold writes
into empty tables of a schema of its own created for it, after a CHECKPOINT (so no fold pays for
writing out another's pages), and is rolled back. A later drain's rollup is folded and committed
first. Every fold must leave the same user-days and the same (user, day, action) triples, which
are hashed after it. The readers run on each layout's rollup of the worst case folded twice.

    python -m benchmarks drain-layouts [--url URL] [--rows N] [--users N] [--active N]
        [--repeats R] [--held] [--layout LABEL ...]
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from sqlalchemy import create_engine

from benchmarks.bench_capture import BATCH_INSERT, Scratch, libpq
from benchmarks.bench_drain import (
    APP_DAY_EVENTS,
    APP_DAY_SESSIONS,
    backend_cpu_seconds,
    install_pipeline,
)
from retention_pipeline.database.batch import BATCH_WORK_MEM
from retention_pipeline.tracking.sql import TrackingSql, visit_count_sql
from retention_pipeline.tracking.state import tracking_sql
from retention_pipeline_tests.helpers import make_config

TZ = "CAST('UTC' AS text)"
GAP_MINUTES = 30
SCHEMA = "layout"
CAPTURED = ("worst", "app_first", "app_later")
DAILY_COLUMNS = """
    user_id text NOT NULL, day date NOT NULL,
    event_count integer NOT NULL DEFAULT 0, session_count integer NOT NULL DEFAULT 0,
    last_event_at timestamptz, last_session_at timestamptz,
    active_slots bit(300) NOT NULL DEFAULT CAST(B'0' AS bit(300)),
    visit_count integer NOT NULL DEFAULT 0"""
INLINE_COLUMNS = f"""{DAILY_COLUMNS},
    action_names text[], action_counts integer[], action_last_at timestamptz[]"""
# What a fold writes of a user-day with its actions inline, in this order.
INLINE_WRITTEN = """user_id, day, event_count, session_count, last_event_at, last_session_at,
                 active_slots, visit_count, action_names, action_counts, action_last_at"""
# Every fold leaves these the same: each user-day's figures, and each (user, day, action).
DAILY_HASH = f"""
SELECT count(*) || ':' || coalesce(sum(hashtextextended(row(user_id, day, event_count,
       session_count, last_event_at, last_session_at, active_slots, visit_count)::text, 0)
       ::numeric), 0) FROM {SCHEMA}.activity_daily"""
ACTIONS_HASH = """
SELECT count(*) || ':' || coalesce(sum(hashtextextended(row(user_id, day, event_name,
       event_count, last_at)::text, 0)::numeric), 0) FROM ({actions}) AS actions"""
SPLIT_ACTIONS = f"SELECT user_id, day, event_name, event_count, last_at FROM {SCHEMA}.action_daily"
INLINE_ACTIONS = f"""
SELECT user_id, day, x.event_name, x.event_count, x.last_at
FROM {SCHEMA}.activity_daily,
     unnest(action_names, action_counts, action_last_at) AS x(event_name, event_count, last_at)"""


@dataclass(frozen=True)
class Layout:
    label: str
    ddl: tuple[str, ...]
    # The fold of the rows of a relation (kind, user_id, at, event_name) into this layout.
    fold: Callable[[str], str]
    inline: bool
    # The tables the fold writes, where the readers read views over them instead.
    stored: tuple[str, ...] = ()
    # The statement that folds what the drains appended into the indexed days, off the drain.
    compact: str | None = None


def _shipped_fold(sql: TrackingSql) -> Callable[[str], str]:
    def fold(relation: str) -> str:
        source = f"SELECT kind, user_id, at, event_name, 1 AS n FROM {relation}"
        return dataclasses.replace(sql, schema=SCHEMA).fold(source, TZ, GAP_MINUTES)

    return fold


def _day_first(fold: Callable[[str], str]) -> Callable[[str], str]:
    """The shipped fold with its keys and writes sorted by day first."""

    def day_first(relation: str) -> str:
        text = fold(relation)
        for user_first, swapped in (
            ("ORDER BY user_id, day, kind, event_name", "ORDER BY day, user_id, kind, event_name"),
            ("ORDER BY user_id, day, event_name", "ORDER BY day, user_id, event_name"),
            ("ORDER BY user_id, day\n", "ORDER BY day, user_id\n"),
            ("PARTITION BY user_id, day", "PARTITION BY day, user_id"),
        ):
            assert user_first in text, "TrackingSql.fold changed: update _day_first"
            text = text.replace(user_first, swapped)
        return text

    return day_first


# The merge of a held user-day's actions with the fold's: per name, counts summed and the
# latest time kept, sorted by name as a first write sorts them.
MERGED_ACTIONS = """(action_names, action_counts, action_last_at) = (
    SELECT array_agg(m.name ORDER BY m.name), array_agg(m.n ORDER BY m.name),
           array_agg(m.last_at ORDER BY m.name)
    FROM (SELECT u.name COLLATE "C" AS name, sum(u.n)::integer AS n, max(u.last_at) AS last_at
          FROM (SELECT * FROM unnest(t.action_names, t.action_counts, t.action_last_at)
                UNION ALL
                SELECT * FROM unnest(EXCLUDED.action_names, EXCLUDED.action_counts,
                                     EXCLUDED.action_last_at)) AS u(name, n, last_at)
          GROUP BY 1) AS m)"""
# The upsert of a held user-day (`t`) with the fold's or the compaction's (`EXCLUDED`).
MERGED_DAY = f"""ON CONFLICT (user_id, day) DO UPDATE
    SET event_count = t.event_count + EXCLUDED.event_count,
        session_count = t.session_count + EXCLUDED.session_count,
        last_event_at = greatest(t.last_event_at, EXCLUDED.last_event_at),
        last_session_at = greatest(t.last_session_at, EXCLUDED.last_session_at),
        active_slots = t.active_slots | EXCLUDED.active_slots,
        visit_count = {visit_count_sql("(t.active_slots | EXCLUDED.active_slots)", GAP_MINUTES)},
        {MERGED_ACTIONS}"""


def _inline_fold(
    *,
    sort_rows: bool,
    day_first: bool,
    day_index: bool,
    append_only: bool = False,
    into: str = "activity_daily",
) -> Callable[[str], str]:
    """The fold into `activity_daily` with its actions inline: the keys as shipped (hashed, or
    with `sort_rows` the captured rows sorted and adjacent ones aggregated), then one row per
    user-day from the sorted keys, its actions' arrays in name order. Days held are probed
    through the day index, or the primary key's first column. Without either, the probe here reads
    the table (cheap only on the benchmark's small rollups): a layout without a day index would
    need the days held recorded elsewhere. `append_only`: every row a plain insert into `into`,
    held days or not (deltas the readers sum)."""
    keys = TrackingSql._keys(TZ)
    order = "day, user_id" if day_first else "user_id, day"
    if day_first:
        keys = keys.replace(
            "ORDER BY user_id, day, kind, event_name", "ORDER BY day, user_id, kind, event_name"
        )
    if sort_rows:
        dated = f"(at AT TIME ZONE {TZ})::date AS day FROM source)"
        assert dated in keys, "TrackingSql._keys changed: update _inline_fold"
        keys = keys.replace(
            dated,
            f"""(at AT TIME ZONE {TZ})::date AS day FROM source
                  ORDER BY user_id COLLATE "C", day, kind, event_name COLLATE "C")""",
        )
    held = (
        f"""coalesce((SELECT r.day FROM {SCHEMA}.activity_daily AS r WHERE r.day >= days.day
                      ORDER BY r.day LIMIT 1) = days.day, FALSE)"""
        if day_index or day_first
        else f"EXISTS (SELECT FROM {SCHEMA}.activity_daily AS r WHERE r.day = days.day)"
    )
    columns = INLINE_WRITTEN
    rows = f"""SELECT user_id, day, day_events, day_sessions, day_last_event_at,
                      day_last_session_at, day_slots, {visit_count_sql("day_slots", GAP_MINUTES)},
                      names, counts, lasts
               FROM per_day"""

    def fold(relation: str) -> str:
        if append_only:
            writes = f"""daily AS (INSERT INTO {SCHEMA}.{into} ({columns}) {rows})"""
        else:
            writes = f"""days AS (SELECT day, {held} AS held FROM day_totals AS days),
            daily_0 AS (
                INSERT INTO {SCHEMA}.{into} AS t ({columns})
                {rows} WHERE NOT (day = ANY (SELECT day FROM days WHERE held))
            ),
            daily_1 AS (
                INSERT INTO {SCHEMA}.{into} AS t ({columns})
                {rows} WHERE day = ANY (SELECT day FROM days WHERE held)
                {MERGED_DAY}
            )"""
        return f"""
            WITH source AS (SELECT kind, user_id, at, event_name, 1 AS n FROM {relation}),
            per_day AS (
                SELECT user_id, day,
                       coalesce(sum(n) FILTER (WHERE kind = 'e'), 0) AS day_events,
                       coalesce(sum(n) FILTER (WHERE kind = 's'), 0) AS day_sessions,
                       max(last_at) FILTER (WHERE kind = 'e') AS day_last_event_at,
                       max(last_at) FILTER (WHERE kind = 's') AS day_last_session_at,
                       bit_or(slots) AS day_slots,
                       array_agg(event_name) FILTER (WHERE kind = 'e') AS names,
                       array_agg(n) FILTER (WHERE kind = 'e') AS counts,
                       array_agg(last_at) FILTER (WHERE kind = 'e') AS lasts
                FROM ({keys}) AS keys
                GROUP BY {order}
            ),
            day_totals AS (
                SELECT day, count(*) AS user_days, sum(day_events) AS events,
                       sum(day_sessions) AS sessions
                FROM per_day GROUP BY day
            ),
            {writes}
            SELECT day, user_days, events, sessions FROM day_totals"""

    return fold


def _appending_fold(into: str) -> Callable[[str], str]:
    """Each fold's user-days (actions inline, rows sorted) appended to `into`, held or not."""
    return _inline_fold(
        sort_rows=True, day_first=False, day_index=False, append_only=True, into=into
    )


def _inline_layout(label: str, *, sort_rows: bool, day_first: bool, day_index: bool) -> Layout:
    """A layout with each user-day's actions inside its `activity_daily` row: its table and its
    fold from the same choices."""
    key = "day, user_id" if day_first else "user_id, day"
    table = (f"CREATE TABLE {SCHEMA}.activity_daily ({INLINE_COLUMNS}, PRIMARY KEY ({key}))",)
    if day_index:
        table += (f"CREATE INDEX ON {SCHEMA}.activity_daily (day)",)
    return Layout(
        label,
        table,
        _inline_fold(sort_rows=sort_rows, day_first=day_first, day_index=day_index),
        inline=True,
    )


def _day_partitioned_inline_layout(label: str) -> Layout:
    """Actions inline, rows sorted, the table partitioned by day (a partition per day of the
    captured rows' range, made beforehand, as a drain would make a day's before folding into
    it) in place of a day index: a day's read prunes to its partition."""
    return Layout(
        label,
        (
            f"""CREATE TABLE {SCHEMA}.activity_daily ({INLINE_COLUMNS},
                    PRIMARY KEY (user_id, day)) PARTITION BY RANGE (day)""",
            _day_partitions("activity_daily"),
        ),
        _inline_fold(sort_rows=True, day_first=False, day_index=False),
        inline=True,
    )


def _day_partitions(table: str) -> str:
    """A partition of `table` per day of the captured rows' range, made beforehand."""
    return f"""DO $$ BEGIN
                   FOR back IN -1..45 LOOP
                       EXECUTE format('CREATE TABLE {SCHEMA}.{table}_%s
                                       PARTITION OF {SCHEMA}.{table}
                                       FOR VALUES FROM (%L) TO (%L)',
                                      back + 1, current_date - back, current_date - back + 1);
                   END LOOP;
               END $$"""


ROW_COLUMNS = """user_id, day, event_count, session_count, last_event_at, last_session_at,
                 active_slots, action_names, action_counts, action_last_at"""


def _summing_views(rows: str) -> tuple[str, str]:
    """`activity_daily` and `action_daily` as views summing the rows of `rows` (a FROM item with
    `ROW_COLUMNS`) per user-day, and per user-day and action name."""
    s = SCHEMA
    grouped = f"""SELECT user_id, day, sum(event_count)::integer AS event_count,
                         sum(session_count)::integer AS session_count,
                         max(last_event_at) AS last_event_at,
                         max(last_session_at) AS last_session_at,
                         bit_or(active_slots) AS active_slots
                  FROM {rows} AS rows GROUP BY user_id, day"""
    return (
        f"""CREATE VIEW {s}.activity_daily AS
            SELECT grouped.*, {visit_count_sql("active_slots", GAP_MINUTES)} AS visit_count
            FROM ({grouped}) AS grouped""",
        f"""CREATE VIEW {s}.action_daily AS
            SELECT user_id, day, x.event_name, sum(x.event_count)::integer AS event_count,
                   max(x.last_at) AS last_at
            FROM {rows} AS rows,
                 unnest(action_names, action_counts, action_last_at)
                     AS x(event_name, event_count, last_at)
            GROUP BY 1, 2, 3""",
    )


def _deltas_layout(label: str, *, user_index: bool) -> Layout:
    """Append-only deltas: each fold's user-days (actions inline, rows sorted) inserted as new
    rows of `activity_delta`, partitioned by day, whether the day is held or not; no key, so a
    held day costs what a new one does. The readers read `activity_daily` and `action_daily`,
    views summing a user-day's deltas (and a name's, unnested); something must fold the deltas
    together later, off the drain. `user_index`: a (user_id, day) index, not unique, for the
    readers by user."""
    s = SCHEMA
    ddl = (
        f"CREATE TABLE {s}.activity_delta ({INLINE_COLUMNS}) PARTITION BY RANGE (day)",
        _day_partitions("activity_delta"),
        *([f"CREATE INDEX ON {s}.activity_delta (user_id, day)"] if user_index else []),
        *_summing_views(f"{s}.activity_delta"),
    )
    return Layout(
        label,
        ddl,
        _appending_fold("activity_delta"),
        inline=False,
        stored=("activity_delta",),
    )


def _recent_deltas_layout(label: str) -> Layout:
    """Recent deltas, compacted days: each drain appends its user-days (actions inline, rows
    sorted) to `activity_recent`, which has no index at all; a compaction off the drain moves
    them into `activity_days`, keyed (user_id, day) with a day index, one row per user-day. The
    readers read views summing both, so a reader by user finds the compacted days through the
    key and scans only what the drains appended since the last compaction."""
    s = SCHEMA
    columns = INLINE_WRITTEN
    compact = f"""
        WITH moved AS (DELETE FROM {s}.activity_recent RETURNING *),
        keys AS (
            SELECT user_id, day, sum(event_count)::integer AS event_count,
                   sum(session_count)::integer AS session_count,
                   max(last_event_at) AS last_event_at, max(last_session_at) AS last_session_at,
                   bit_or(active_slots) AS active_slots
            FROM moved GROUP BY user_id, day
        ),
        actions AS (
            SELECT user_id, day, array_agg(name ORDER BY name) AS names,
                   array_agg(n ORDER BY name) AS counts, array_agg(last_at ORDER BY name) AS lasts
            FROM (SELECT m.user_id, m.day, x.name COLLATE "C" AS name, sum(x.n)::integer AS n,
                         max(x.last_at) AS last_at
                  FROM moved AS m,
                       unnest(m.action_names, m.action_counts, m.action_last_at)
                           AS x(name, n, last_at)
                  GROUP BY 1, 2, 3) AS per_name
            GROUP BY user_id, day
        ),
        held AS (
            SELECT days.day
            FROM (SELECT DISTINCT day FROM keys) AS days
            WHERE EXISTS (SELECT FROM {s}.activity_days AS r WHERE r.day = days.day)
        ),
        rows AS (
            SELECT k.user_id, k.day, k.event_count, k.session_count, k.last_event_at,
                   k.last_session_at, k.active_slots,
                   {visit_count_sql("k.active_slots", GAP_MINUTES)} AS visit_count,
                   a.names, a.counts, a.lasts
            FROM keys AS k LEFT JOIN actions AS a USING (user_id, day)
        ),
        new_days AS (
            INSERT INTO {s}.activity_days ({columns})
            SELECT * FROM rows WHERE day <> ALL (SELECT day FROM held)
            ORDER BY user_id, day
        )
        INSERT INTO {s}.activity_days AS t ({columns})
        SELECT * FROM rows WHERE day = ANY (SELECT day FROM held)
        ORDER BY user_id, day
        {MERGED_DAY}"""
    both = f"""(SELECT {ROW_COLUMNS} FROM {s}.activity_days
                UNION ALL SELECT {ROW_COLUMNS} FROM {s}.activity_recent)"""
    return Layout(
        label,
        (
            f"CREATE TABLE {s}.activity_days ({INLINE_COLUMNS}, PRIMARY KEY (user_id, day))",
            f"CREATE INDEX ON {s}.activity_days (day)",
            f"CREATE TABLE {s}.activity_recent ({INLINE_COLUMNS})",
            *_summing_views(both),
        ),
        _appending_fold("activity_recent"),
        inline=False,
        stored=("activity_days", "activity_recent"),
        compact=compact,
    )


# Each day a fold touches, written whole into a new table of its own: the fold's keys (a day
# held: merged with the day's rows, as the upsert would) land in partitions of two staging
# tables without indexes, each then gets its primary key by one sort, leaves the staging table,
# and replaces the day's partition (DROP, then ATTACH, which scans it once for its bounds).
WHOLE_DAYS_FOLD = """
CREATE FUNCTION {s}.fold_whole(captured text)
RETURNS TABLE (day date, user_days bigint, events bigint, sessions bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    touched date[];
    held date[];
    d date;
    tbl text;
    part text;
    t_days date[];
    t_user_days bigint[];
    t_events bigint[];
    t_sessions bigint[];
BEGIN
    EXECUTE replace($q$SELECT array_agg(DISTINCT (at AT TIME ZONE {tz})::date) FROM {{captured}}$q$,
                    '{{captured}}', captured) INTO touched;
    SELECT coalesce(array_agg(x.d), '{{}}') INTO held FROM unnest(touched) AS x(d)
    WHERE to_regclass(format('{s}.activity_daily_%s', to_char(x.d, 'YYYYMMDD'))) IS NOT NULL;
    CREATE TABLE {s}.stage_activity_daily (LIKE {s}.activity_daily INCLUDING DEFAULTS)
        PARTITION BY RANGE (day);
    CREATE TABLE {s}.stage_action_daily (LIKE {s}.action_daily INCLUDING DEFAULTS)
        PARTITION BY RANGE (day);
    FOREACH d IN ARRAY touched LOOP
        FOREACH tbl IN ARRAY ARRAY['activity_daily', 'action_daily'] LOOP
            EXECUTE format('CREATE TABLE {s}.%I PARTITION OF {s}.%I FOR VALUES FROM (%L) TO (%L)',
                           tbl || '_' || to_char(d, 'YYYYMMDD') || '_new', 'stage_' || tbl,
                           d, d + 1);
        END LOOP;
    END LOOP;
    EXECUTE replace($q$
        WITH source AS (SELECT kind, user_id, at, event_name, 1 AS n FROM {{captured}}),
        {keyed_days},
        actions_new AS (
            INSERT INTO {s}.stage_action_daily (user_id, day, event_name, event_count, last_at)
            SELECT user_id, day, event_name, n, last_at FROM per_key
            WHERE kind = 'e' AND NOT (day = ANY ($1))
            ORDER BY user_id, day, event_name
        ),
        actions_held AS (
            INSERT INTO {s}.stage_action_daily (user_id, day, event_name, event_count, last_at)
            SELECT user_id, day, event_name, sum(n), max(last_at)
            FROM (SELECT user_id, day, event_name, n, last_at FROM per_key
                  WHERE kind = 'e' AND day = ANY ($1)
                  UNION ALL
                  SELECT user_id COLLATE "C", day, event_name COLLATE "C", event_count, last_at
                  FROM {s}.action_daily WHERE day = ANY ($1)) AS both_sides
            GROUP BY user_id, day, event_name
            ORDER BY user_id, day, event_name
        ),
        daily_new AS (
            INSERT INTO {s}.stage_activity_daily
                (user_id, day, event_count, session_count, last_event_at, last_session_at,
                 active_slots, visit_count)
            SELECT user_id, day, day_events, day_sessions, day_last_event_at,
                   day_last_session_at, day_slots, {visits}
            FROM per_key WHERE first_of_day AND NOT (day = ANY ($1))
            ORDER BY user_id, day
        ),
        daily_held AS (
            INSERT INTO {s}.stage_activity_daily
                (user_id, day, event_count, session_count, last_event_at, last_session_at,
                 active_slots, visit_count)
            SELECT user_id, day, events, sessions, last_event_at, last_session_at, slots,
                   {merged_visits}
            FROM (SELECT user_id, day, sum(events) AS events, sum(sessions) AS sessions,
                         max(last_event_at) AS last_event_at,
                         max(last_session_at) AS last_session_at, bit_or(slots) AS slots
                  FROM (SELECT user_id, day, day_events AS events, day_sessions AS sessions,
                               day_last_event_at AS last_event_at,
                               day_last_session_at AS last_session_at, day_slots AS slots
                        FROM per_key WHERE first_of_day AND day = ANY ($1)
                        UNION ALL
                        SELECT user_id COLLATE "C", day, event_count, session_count,
                               last_event_at, last_session_at, active_slots
                        FROM {s}.activity_daily WHERE day = ANY ($1)) AS both_sides
                  GROUP BY user_id, day) AS merged
            ORDER BY user_id, day
        )
        SELECT array_agg(day), array_agg(user_days), array_agg(events), array_agg(sessions)
        FROM day_totals$q$, '{{captured}}', captured)
    INTO t_days, t_user_days, t_events, t_sessions USING held;
    FOREACH d IN ARRAY touched LOOP
        FOREACH tbl IN ARRAY ARRAY['activity_daily', 'action_daily'] LOOP
            part := tbl || '_' || to_char(d, 'YYYYMMDD');
            EXECUTE format('ALTER TABLE {s}.%I DETACH PARTITION {s}.%I', 'stage_' || tbl,
                           part || '_new');
            EXECUTE format('ALTER TABLE {s}.%I ADD PRIMARY KEY (%s)', part || '_new',
                           CASE tbl WHEN 'activity_daily' THEN 'user_id, day'
                                    ELSE 'user_id, day, event_name' END);
            IF d = ANY (held) THEN
                EXECUTE format('DROP TABLE {s}.%I', part);
            END IF;
            EXECUTE format('ALTER TABLE {s}.%I RENAME TO %I', part || '_new', part);
            EXECUTE format('ALTER TABLE {s}.%I ATTACH PARTITION {s}.%I '
                           'FOR VALUES FROM (%L) TO (%L)', tbl, part, d, d + 1);
        END LOOP;
    END LOOP;
    DROP TABLE {s}.stage_activity_daily, {s}.stage_action_daily;
    RETURN QUERY SELECT * FROM unnest(t_days, t_user_days, t_events, t_sessions);
END
$fn$"""


def _whole_days_layout(label: str) -> Layout:
    """The shipped tables partitioned by day, each day a fold touches written whole
    (`WHOLE_DAYS_FOLD`)."""
    s = SCHEMA
    return Layout(
        label,
        (
            f"""CREATE TABLE {s}.activity_daily (LIKE retention.activity_daily
                INCLUDING DEFAULTS, PRIMARY KEY (user_id, day)) PARTITION BY RANGE (day)""",
            f"""CREATE TABLE {s}.action_daily (LIKE retention.action_daily
                INCLUDING DEFAULTS, PRIMARY KEY (user_id, day, event_name))
                PARTITION BY RANGE (day)""",
            WHOLE_DAYS_FOLD.format(
                s=s,
                tz=TZ,
                keyed_days=TrackingSql.keyed_days(TZ),
                visits=visit_count_sql("day_slots", GAP_MINUTES),
                merged_visits=visit_count_sql("slots", GAP_MINUTES),
            ),
        ),
        lambda relation: f"SELECT * FROM {s}.fold_whole('{relation}')",
        inline=False,
    )


def layouts(sql: TrackingSql) -> list[Layout]:
    s = SCHEMA
    shipped = _shipped_fold(sql)
    shipped_tables = (
        f"CREATE TABLE {s}.activity_daily (LIKE retention.activity_daily INCLUDING ALL)",
        f"CREATE TABLE {s}.action_daily (LIKE retention.action_daily INCLUDING ALL)",
    )
    return [
        Layout("shipped", shipped_tables, shipped, inline=False),
        Layout(
            # PostgreSQL 15 compares text in any collation but C (C.UTF-8 included) through
            # strcoll; the fold sorts its keys in C already.
            "shipped, keys in the C collation",
            (
                *shipped_tables,
                f'ALTER TABLE {s}.activity_daily ALTER COLUMN user_id TYPE text COLLATE "C"',
                f'ALTER TABLE {s}.action_daily ALTER COLUMN user_id TYPE text COLLATE "C", '
                'ALTER COLUMN event_name TYPE text COLLATE "C"',
            ),
            shipped,
            inline=False,
        ),
        Layout(
            "day-first keys, no day indexes",
            (
                f"""CREATE TABLE {s}.activity_daily (LIKE retention.activity_daily
                    INCLUDING DEFAULTS, PRIMARY KEY (day, user_id))""",
                f"""CREATE TABLE {s}.action_daily (LIKE retention.action_daily
                    INCLUDING DEFAULTS, PRIMARY KEY (day, user_id, event_name))""",
            ),
            _day_first(shipped),
            inline=False,
        ),
        _inline_layout("actions inline", sort_rows=False, day_first=False, day_index=True),
        _inline_layout(
            "actions inline, rows sorted", sort_rows=True, day_first=False, day_index=True
        ),
        _inline_layout(
            "actions inline, rows sorted, no day index",
            sort_rows=True,
            day_first=False,
            day_index=False,
        ),
        _inline_layout(
            "actions inline, day-first key", sort_rows=False, day_first=True, day_index=False
        ),
        _day_partitioned_inline_layout("actions inline, rows sorted, day partitions"),
        _whole_days_layout("shipped tables, day partitions written whole"),
        _deltas_layout("append-only deltas, day partitions", user_index=False),
        _deltas_layout("append-only deltas, day partitions, user index", user_index=True),
        _recent_deltas_layout("recent deltas unindexed, compacted days"),
    ]


@dataclass
class Case:
    label: str
    captured: str
    rows: int
    # The rows folded and committed first: the rollup this drain finds.
    before: str | None = None
    seconds: dict[str, list[float]] = field(default_factory=dict)
    contents: dict[str, set[str]] = field(default_factory=dict)


def _contents(connection: psycopg.Connection, layout: Layout) -> str:
    actions = INLINE_ACTIONS if layout.inline else SPLIT_ACTIONS
    daily = connection.execute(DAILY_HASH).fetchone()[0]
    return f"{daily} {connection.execute(ACTIONS_HASH.format(actions=actions)).fetchone()[0]}"


def _clock(pid: int) -> float:
    """The backend's CPU seconds where the server is on this machine, else the wall clock."""
    cpu = backend_cpu_seconds(pid)
    return time.perf_counter() if cpu is None else cpu


def _tables(layout: Layout) -> tuple[str, ...]:
    """The tables a layout stores its rollup in."""
    if layout.stored:
        return layout.stored
    return ("activity_daily",) if layout.inline else ("activity_daily", "action_daily")


def _fresh_schema(connection: psycopg.Connection, layout: Layout) -> None:
    connection.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    connection.execute(f"CREATE SCHEMA {SCHEMA}")
    for statement in layout.ddl:
        connection.execute(statement)


def _fold_once(connection: psycopg.Connection, layout: Layout, case: Case) -> None:
    """One fold of the case's rows into fresh tables of `layout`, rolled back."""
    pid = connection.info.backend_pid
    _fresh_schema(connection, layout)
    connection.execute(f"SET work_mem = '{BATCH_WORK_MEM}'")
    connection.execute("SET jit = off")
    if case.before is not None:
        connection.execute(layout.fold(f"layouts.{case.before}")).fetchall()
        if layout.compact is not None:
            connection.execute(layout.compact)
        for table in _tables(layout):
            connection.execute(f"VACUUM ANALYZE {SCHEMA}.{table}")
    connection.execute("CHECKPOINT")
    connection.execute("BEGIN")
    before = _clock(pid)
    connection.execute(layout.fold(f"layouts.{case.captured}")).fetchall()
    case.seconds.setdefault(layout.label, []).append(_clock(pid) - before)
    case.contents.setdefault(layout.label, set()).add(_contents(connection, layout))
    connection.execute("ROLLBACK")
    connection.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


def _prepare(url: str, rows: int, users: int, active: int) -> None:
    """Capture the worst case's rows and an app's day twice, each into a table of schema
    `layouts`, through the installed triggers."""
    install_pipeline(url)
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        slot = connection.execute("SELECT capture_slot FROM retention.tracking_state").fetchone()
        capture = f"retention.activity_capture_{slot[0]}"
        connection.execute("CREATE SCHEMA layouts")
        batches = {
            "worst": [(BATCH_INSERT, {"users": users, "rows": rows})],
            "app_first": [
                (APP_DAY_EVENTS, {"active": active, "seed": 7}),
                (APP_DAY_SESSIONS, {"active": active, "seed": 3}),
            ],
            "app_later": [
                (APP_DAY_EVENTS, {"active": active, "seed": 11}),
                (APP_DAY_SESSIONS, {"active": active, "seed": 5}),
            ],
        }
        for name in CAPTURED:
            for statement, parameters in batches[name]:
                connection.execute(statement, parameters)
            connection.execute(f"CREATE TABLE layouts.{name} AS SELECT * FROM {capture}")
            connection.execute(f"TRUNCATE {capture}")
        connection.execute("VACUUM ANALYZE")


# What the readers of the rollup read, on a layout's rollup of the worst case folded twice, as
# of the 10th of its 30 days back: the rolled-forward snapshot's actions of the day, the full
# snapshot's latest actions over its lookback (of everyone, and of users listed one by one), an
# event success's days, and an erasure.
DAY = "(current_date - 10)"
LISTED = "(SELECT (1 + g * 97)::text AS user_id FROM generate_series(0, 99) AS g) AS listed"
ERASED = "ARRAY(SELECT (7 + g * 991)::text FROM generate_series(0, 99) AS g)"


def _latest(per_name: str) -> str:
    return f"""
        SELECT count(*) FROM (
            SELECT ranked.user_id,
                   jsonb_agg(jsonb_build_object('name', ranked.event_name, 'at', ranked.last_at)
                             ORDER BY ranked.last_at DESC, ranked.event_name)
            FROM (SELECT per_name.*, row_number() OVER (
                         PARTITION BY per_name.user_id
                         ORDER BY per_name.last_at DESC, per_name.event_name) AS rank
                  FROM ({per_name}) AS per_name) AS ranked
            WHERE ranked.rank <= 3
            GROUP BY ranked.user_id) AS latest"""


def reads(layout: Layout) -> dict[str, list[str]]:
    s = SCHEMA
    if layout.inline:
        # The arrays unnested in the select list: a function scan per row costs twice as much.
        actions = f"""(SELECT a.user_id, a.day, unnest(a.action_names) AS event_name,
                              unnest(a.action_last_at) AS last_at
                       FROM {s}.activity_daily AS a {{where}}) AS x"""
        success = (
            f"SELECT user_id, day FROM {s}.activity_daily "
            "WHERE action_names && ARRAY['invite.sent']"
        )
        erase = [f"DELETE FROM {s}.activity_daily WHERE user_id = ANY({ERASED})"]
    else:
        actions = f"(SELECT * FROM {s}.action_daily AS a {{where}}) AS x"
        success = f"SELECT user_id, day FROM {s}.action_daily WHERE event_name = 'invite.sent'"
        erase = [
            f"DELETE FROM {s}.{table} WHERE user_id = ANY({ERASED})" for table in _tables(layout)
        ]
    window = f"a.day <= {DAY} AND a.day > {DAY} - 90"
    return {
        "rolled-forward snapshot: the day's actions": [
            f"""SELECT count(*) FROM (
                    SELECT x.user_id, jsonb_agg(x.event_name),
                           jsonb_agg(jsonb_build_object('name', x.event_name, 'at', x.last_at)
                                     ORDER BY x.last_at DESC, x.event_name)
                    FROM {actions.format(where=f"WHERE a.day = {DAY}")}
                    GROUP BY x.user_id) AS day"""
        ],
        "full snapshot: everyone's latest actions over 90 days": [
            _latest(
                f"""SELECT x.user_id, x.event_name, max(x.last_at) AS last_at
                    FROM {actions.format(where=f"WHERE {window}")}
                    GROUP BY x.user_id, x.event_name"""
            )
        ],
        "full snapshot of 100 listed users: their latest actions": [
            f"""SELECT count(*) FROM {LISTED} CROSS JOIN LATERAL (
                    SELECT x.event_name, max(x.last_at)
                    FROM {actions.format(where=f"WHERE a.user_id = listed.user_id AND {window}")}
                    GROUP BY x.event_name) AS latest"""
        ],
        "outcomes: 100 users' event success days over 14 days": [
            f"""SELECT count(*) FROM ({success}) AS r
                JOIN {LISTED} ON r.user_id = listed.user_id AND r.day > {DAY} - 14"""
        ],
        "erasure of 100 users": erase,
    }


def measure_readers(
    connection: psycopg.Connection, all_layouts: list[Layout], repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Each layout's readers on its rollup of the worst case folded twice, interleaved; CPU
    seconds (wall seconds where the server is not on this machine)."""
    pid = connection.info.backend_pid
    connection.execute(f"SET work_mem = '{BATCH_WORK_MEM}'")
    connection.execute("SET jit = off")
    for index, layout in enumerate(all_layouts):
        _fresh_schema(connection, layout)
        # Folded twice: two drains' deltas of each key where a layout keeps deltas (the first
        # compacted, where a layout compacts: the second is what the drains appended since).
        connection.execute(layout.fold("layouts.worst")).fetchall()
        if layout.compact is not None:
            connection.execute(layout.compact)
        connection.execute(layout.fold("layouts.worst")).fetchall()
        for table in _tables(layout):
            connection.execute(f"VACUUM ANALYZE {SCHEMA}.{table}")
        connection.execute(f"ALTER SCHEMA {SCHEMA} RENAME TO {SCHEMA}_{index}")
    seconds: dict[str, dict[str, list[float]]] = {}
    for _repeat in range(repeats):
        for index, layout in enumerate(all_layouts):
            connection.execute(f"ALTER SCHEMA {SCHEMA}_{index} RENAME TO {SCHEMA}")
            for reader, statements in reads(layout).items():
                connection.execute("BEGIN")
                before = _clock(pid)
                for statement in statements:
                    connection.execute(statement)
                spent = _clock(pid) - before
                connection.execute("ROLLBACK")
                seconds.setdefault(reader, {}).setdefault(layout.label, []).append(spent)
            connection.execute(f"ALTER SCHEMA {SCHEMA} RENAME TO {SCHEMA}_{index}")
    return seconds


def measure_compactions(
    connection: psycopg.Connection, all_layouts: list[Layout], cases: list[Case], repeats: int
) -> list[Case]:
    """Each compacting layout's compaction of the worst case's deltas, as `cases` has them (into
    days not held yet, or into days holding every key), rolled back; CPU seconds. A compaction
    must leave the rollup its case's folds left."""
    pid = connection.info.backend_pid
    worst = [case for case in cases if case.captured == "worst"]
    compactions = [
        Case(f"compaction of the {case.label}", case.captured, case.rows, case.before)
        for case in worst
    ]
    for _repeat in range(repeats):
        for layout in all_layouts:
            if layout.compact is None:
                continue
            for compaction in compactions:
                _fresh_schema(connection, layout)
                connection.execute(f"SET work_mem = '{BATCH_WORK_MEM}'")
                connection.execute("SET jit = off")
                if compaction.before is not None:
                    connection.execute(layout.fold(f"layouts.{compaction.before}")).fetchall()
                    connection.execute(layout.compact)
                connection.execute(layout.fold(f"layouts.{compaction.captured}")).fetchall()
                for table in _tables(layout):
                    connection.execute(f"VACUUM ANALYZE {SCHEMA}.{table}")
                connection.execute("CHECKPOINT")
                connection.execute("BEGIN")
                before = _clock(pid)
                connection.execute(layout.compact)
                compaction.seconds.setdefault(layout.label, []).append(_clock(pid) - before)
                compaction.contents.setdefault(layout.label, set()).add(
                    _contents(connection, layout)
                )
                connection.execute("ROLLBACK")
                connection.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    for compaction, case in zip(compactions, worst, strict=True):
        expected = next(iter(case.contents.values()))
        for label, contents in compaction.contents.items():
            if contents != expected:
                raise AssertionError(f"{compaction.label}: {label} left another rollup")
    return compactions


def main(
    server_url: str,
    rows: int,
    users: int,
    active: int,
    repeats: int,
    held: bool,
    only: Sequence[str] = (),
) -> None:
    """`python -m benchmarks drain-layouts`: each layout's folds and reads, as Markdown."""
    scratch = Scratch(server_url)
    load_before = os.getloadavg()[0]
    try:
        url = scratch.create("drain_layouts", users)
        _prepare(url, rows, users, active)
        engine = create_engine(url)
        with engine.connect() as connection:
            all_layouts = layouts(tracking_sql(connection, make_config(url)))
        engine.dispose()
        if only:
            unknown = sorted(set(only) - {layout.label for layout in all_layouts})
            if unknown:
                raise SystemExit(f"--layout: no layout is called {unknown[0]!r}")
            # The shipped fold stays: every other figure is read against it.
            all_layouts = [layout for layout in all_layouts if layout.label in {"shipped", *only}]
        cases = [
            Case(f"worst case, new days ({rows:,} rows, 30 days x {users:,} users)", "worst", rows),
            *(
                [Case("worst case, every key held (the same rows again)", "worst", rows, "worst")]
                if held
                else []
            ),
            Case(f"app-shaped, a day's first drain ({active:,} active users)", "app_first", 0),
            Case("app-shaped, a later drain of the day", "app_later", 0, "app_first"),
        ]
        with psycopg.connect(libpq(url), autocommit=True) as connection:
            for case in cases:
                case.rows = (
                    case.rows
                    or connection.execute(
                        f"SELECT count(*) FROM layouts.{case.captured}"
                    ).fetchone()[0]
                )
                for _repeat in range(repeats):
                    for layout in all_layouts:
                        _fold_once(connection, layout, case)
                if len({frozenset(contents) for contents in case.contents.values()}) != 1:
                    raise AssertionError(f"{case.label}: the layouts differ: {case.contents}")
                print(f"  {case.label}: measured", flush=True)
            readers = measure_readers(connection, all_layouts, repeats)
            compactions = measure_compactions(connection, all_layouts, cases, repeats)
    finally:
        scratch.drop_all()
    print("\n".join(render(cases, readers, all_layouts, repeats, compactions)))
    print(
        f"\nLoad average (1 minute) of the machine ({os.cpu_count()} cores) when this benchmark "
        f"started and ended: {load_before:.2f}, {os.getloadavg()[0]:.2f}."
    )


def render(
    cases: list[Case],
    readers: dict[str, dict[str, list[float]]],
    all_layouts: list[Layout],
    repeats: int,
    compactions: list[Case] = (),
) -> list[str]:
    labels = [layout.label for layout in all_layouts]
    header = "| | " + " | ".join(labels) + " |"
    rule = "|---|" + "---|" * len(labels)
    lines = [
        "Folds: rows/s by the backend's CPU time (CPU seconds; wall seconds where the server "
        "is not on this machine), median of "
        f"{repeats}; every layout left the same user-days and actions.",
        "",
        header,
        rule,
    ]
    for case in cases:
        lines.append(_case_line(case, labels))
    lines += [
        "",
        f"Readers on the rollup of the worst case folded twice: CPU seconds, median of {repeats}.",
        "",
    ]
    lines += [header, rule]
    for reader, per_layout in readers.items():
        lines.append(
            f"| {reader} | "
            + " | ".join(f"{statistics.median(per_layout[label]):.2f} s" for label in labels)
            + " |"
        )
    compacting = [layout.label for layout in all_layouts if layout.compact is not None]
    if compacting:
        lines += [
            "",
            "Compactions, off the drain (what the drains appended moved into the keyed days): "
            f"CPU seconds, median of {repeats}; each left the rollup its case's folds left.",
            "",
            "| | " + " | ".join(compacting) + " |",
            "|---|" + "---|" * len(compacting),
        ]
        lines += [_case_line(compaction, compacting) for compaction in compactions]
    return lines


def _case_line(case: Case, labels: list[str]) -> str:
    """A case's row: each layout's rows/s by CPU time, and its CPU seconds, median."""
    cells = []
    for label in labels:
        cpu = statistics.median(case.seconds[label])
        # Below the clock's tick (tiny runs) there is no rate to give.
        rate = f"{case.rows / cpu:,.0f}" if cpu > 0 else "–"
        cells.append(f"{rate} ({cpu:.2f} s)")
    return f"| {case.label} | " + " | ".join(cells) + " |"
