"""SQL that tracks activity, built from the configured mapping.

Names come from configuration and are quoted through SQLAlchemy's identifier preparer; values
(timezone, days) are read from the tracking state or bound, never pasted into the text.

Each activity source compiles into one SELECT of (kind, user_id, at, event_name) over a relation
(`source_rows`): the capture trigger runs it over the statement's new rows, the rebuild over the
app table, the poll over the rows newer than its watermark, so all of them agree row for row.

The triggers only append to a capture table. Every write to the rollup goes through one
additive fold, whatever it reads: the capture (the drain), the rows a poll found new, or the app
tables less what is still in the capture (a rebuild or a repair of some days).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy.engine.interfaces import Dialect

from retention_pipeline.database.activity_sources import ResolvedSource
from retention_pipeline.database.app_tables import ResolvedTable
from retention_pipeline.database.predicates import sql_literal

CAPTURE_TABLES = ("activity_capture_0", "activity_capture_1")
# The start of :first_day and of :end_day in :tz; a missing day leaves that end open.
RANGE_START = (
    "coalesce(CAST(:first_day AS date)::timestamp AT TIME ZONE CAST(:tz AS text), '-infinity')"
)
RANGE_END = "coalesce(CAST(:end_day AS date)::timestamp AT TIME ZONE CAST(:tz AS text), 'infinity')"
# How far back of its watermark each poll reads again: rows committed late (a transaction
# that began before the poll) with a time down to this far back are still counted, once.
POLL_LOOKBACK = "2 days"
MAX_NAME_LENGTH = 63
# A day's activity is kept as the 5-minute slots in which anything happened: 300 cover the
# 25-hour day daylight saving ends with, counted from the start of the day in the timezone.
SLOTS_PER_DAY = 300
SLOT_MINUTES = 5


def slot_sql(at: str, day: str, tz: str) -> str:
    """A bit(300) with only the slot of the time `at` on `day` (in the timezone `tz`) set.
    The elapsed seconds are a double (`date_part`), not a numeric (`extract`): exact for
    microseconds within a day, and this expression costs half as much per captured row."""
    elapsed = f"date_part('epoch', {at} - ({day}::timestamp AT TIME ZONE {tz}))"
    slot = f"least({SLOTS_PER_DAY - 1}, floor({elapsed} / {SLOT_MINUTES * 60})::integer)"
    return f"(CAST(B'1' AS bit({SLOTS_PER_DAY})) >> {slot})"


def visit_count_sql(slots: str, visit_gap_minutes: int) -> str:
    """The visits in the bit(300) `slots`: the set slots with no set slot in the gap's slots
    before them. `slots` is evaluated once per slot of the gap: give a column, not a query."""
    gap_slots = int(visit_gap_minutes) // SLOT_MINUTES
    within_gap_after_a_slot = " | ".join(
        f"({slots} >> {shift})" for shift in range(1, gap_slots + 1)
    )
    return f"bit_count({slots} & ~({within_gap_after_a_slot}))::integer"


def object_name(*parts: str) -> str:
    """`parts` joined by `_`, shortened with a hash of the whole where PostgreSQL would cut it
    (two long names must not end up the same)."""
    name = "_".join(parts)
    if len(name) <= MAX_NAME_LENGTH:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME_LENGTH - 9]}_{digest}"


def capture_function_name(source: str, mode: str) -> str:
    """The name of the source's trigger function for `mode` (inserts or updates)."""
    return object_name("capture", source, *(["updates"] if mode == "updates" else []))


def legacy_trigger_name(schema: str) -> str:
    """The one trigger name of revisions before 0015: on events and sessions (capture) and on
    users (erasure, still so named)."""
    return f"{schema}_track_activity"


def source_trigger_name(schema: str, source: str, mode: str) -> str:
    """A source's trigger: its inserts, or the changes of its time column."""
    return object_name(schema, "track", source, *(["updates"] if mode == "updates" else []))


@dataclass(frozen=True)
class TrackingSql:
    dialect: Dialect
    schema: str
    users: ResolvedTable
    sources: tuple[ResolvedSource, ...]

    def quote(self, name: str) -> str:
        return self.dialect.identifier_preparer.quote(name)

    @property
    def q_schema(self) -> str:
        return self.dialect.identifier_preparer.quote_schema(self.schema)

    def table_name(self, table: ResolvedTable) -> str:
        return table.sql_name(self.dialect.identifier_preparer)

    def column(self, table: ResolvedTable, key: str) -> str:
        return table.column_sql(key, "src", self.dialect.identifier_preparer)

    def source_rows(self, source: ResolvedSource, relation: str, time_range: str = "TRUE") -> str:
        """The source's definition: what the rollup counts of each row of `relation` (the app
        table, or a trigger's new rows): kind, user id, time and (for actions) the name. Rows
        without a user or a finite time, or that the source's `where` leaves out, are skipped.
        `time_range` may name the row's time as `{at}`.

        Every type, function and operator is named in pg_catalog: the trigger functions run
        as their owner with the caller's search_path (setting one per call would cost the app
        about 7% of its insert throughput), so nothing here may resolve through it."""
        at = source.at_sql(self.dialect)
        user_id = source.user_sql(self.dialect)
        return f"""
            SELECT '{source.kind}'::pg_catalog."char" AS kind,
                   {user_id}::pg_catalog.text AS user_id, {at} AS at,
                   {source.event_name_sql(self.dialect)} AS event_name
            FROM {relation} AS src
            WHERE {user_id} IS NOT NULL AND {at} IS NOT NULL
              AND pg_catalog.isfinite({at}) AND {source.filter_sql(self.dialect)}
              AND {time_range.format(at=at)}"""

    def definition(self, source: ResolvedSource) -> str:
        """The source's definition over its table, as stored with its state: a change of it is
        a change of what the source counts. Kept as written: white space inside a configured
        value is part of what the source matches."""
        return self.source_rows(source, source.relation_sql(self.dialect))

    def fold(
        self, source: str, tz: str, visit_gap_minutes: int, *, into_emptied_days: bool = False
    ) -> str:
        """Add `source` (kind, user_id, at, event_name, n) to the rollup. Rows with a negative
        n cancel rows of the same key; keys left at zero or below add nothing. The latest time
        is a maximum over the added rows: one that is also cancelled (it is in the capture) sets
        it harmlessly, as the drain will set the same time again. So are the active slots: an OR,
        which a slot added twice leaves as it was. Cancelled rows add no slot. The visits are
        recounted from the merged slots with the installed gap, `visit_gap_minutes`.

        Keys of a day the rollup holds nothing of yet (a day's first drain, a catch-up after the
        drain was down) are written with plain inserts; only the days it holds are upserted:
        an upsert probes the index before inserting, and costs about 1.5x a plain insert
        (`python -m benchmarks sources`). Every writer of the rollup holds the schema's lock, so
        no other transaction adds rows to a day between the probe and the insert.
        `into_emptied_days`: the rollup holds nothing of these days (they were just deleted, or
        are being rebuilt), so no day is probed. Keys are sorted (bytewise, the cheapest order,
        and the index's own in a C or C.UTF-8 database) so the indexes are written in one sweep.
        Returns per day: user-days, events and sessions added."""
        s = self.q_schema
        merged_visits = visit_count_sql(
            "(t.active_slots | EXCLUDED.active_slots)", visit_gap_minutes
        )
        # One descent of each table's day index per day: the first day held from `day` on.
        # (An EXISTS may be planned as a hash of every day the table holds, a scan of the
        # whole rollup.)
        held = (
            "FALSE"
            if into_emptied_days
            else " OR ".join(
                f"""coalesce((SELECT r.day FROM {s}.{table} AS r WHERE r.day >= days.day
                              ORDER BY r.day LIMIT 1) = days.day, FALSE)"""
                for table in ("activity_daily", "action_daily")
            )
        )
        actions = self._fold_insert(
            f"""INSERT INTO {s}.action_daily AS t (user_id, day, event_name, event_count, last_at)
                SELECT user_id, day, event_name, n, last_at
                FROM per_key WHERE kind = 'e' AND {{held}}
                ORDER BY user_id, day, event_name
            """,
            """ON CONFLICT (user_id, day, event_name) DO UPDATE
                SET event_count = t.event_count + EXCLUDED.event_count,
                    last_at = greatest(t.last_at, EXCLUDED.last_at)""",
            into_emptied_days,
        )
        daily = self._fold_insert(
            f"""INSERT INTO {s}.activity_daily AS t
                    (user_id, day, event_count, session_count, last_event_at, last_session_at,
                     active_slots, visit_count)
                SELECT user_id, day, day_events, day_sessions, day_last_event_at,
                       day_last_session_at, day_slots,
                       {visit_count_sql("day_slots", visit_gap_minutes)}
                FROM per_key WHERE first_of_day AND {{held}}
                ORDER BY user_id, day
            """,
            f"""ON CONFLICT (user_id, day) DO UPDATE
                SET event_count = t.event_count + EXCLUDED.event_count,
                    session_count = t.session_count + EXCLUDED.session_count,
                    last_event_at = greatest(t.last_event_at, EXCLUDED.last_event_at),
                    last_session_at = greatest(t.last_session_at, EXCLUDED.last_session_at),
                    active_slots = t.active_slots | EXCLUDED.active_slots,
                    visit_count = {merged_visits}""",
            into_emptied_days,
        )
        return f"""
            WITH source AS ({source}),
            {self.keyed_days(tz)},
            days AS (SELECT day, {held} AS held FROM day_totals AS days),
            {", ".join(f"actions_{n} AS ({statement})" for n, statement in enumerate(actions))},
            {", ".join(f"daily_{n} AS ({statement})" for n, statement in enumerate(daily))}
            SELECT day, user_days, events, sessions FROM day_totals"""

    @classmethod
    def keyed_days(cls, tz: str) -> str:
        """Two CTEs over a CTE `source` (kind, user_id, at, event_name, n): `per_key`, its keys
        (`_keys`) with each user-day's totals, and `day_totals`, per day the user-days, events
        and sessions they add. The keys are sorted once, and each user-day's totals are a window
        over them in that order (no second aggregate, no join back to the days)."""
        return f"""per_key AS (
                SELECT kind, user_id, day, event_name, n, last_at,
                       row_number() OVER user_day = 1 AS first_of_day,
                       coalesce(sum(n) FILTER (WHERE kind = 'e') OVER user_day, 0) AS day_events,
                       coalesce(sum(n) FILTER (WHERE kind = 's') OVER user_day, 0)
                           AS day_sessions,
                       max(last_at) FILTER (WHERE kind = 'e') OVER user_day AS day_last_event_at,
                       max(last_at) FILTER (WHERE kind = 's') OVER user_day
                           AS day_last_session_at,
                       bit_or(slots) OVER user_day AS day_slots
                FROM ({cls._keys(tz)}) AS keys
                WINDOW user_day AS (PARTITION BY user_id, day)
            ),
            day_totals AS (
                SELECT day, count(*) FILTER (WHERE first_of_day) AS user_days,
                       coalesce(sum(n) FILTER (WHERE kind = 'e'), 0) AS events,
                       coalesce(sum(n) FILTER (WHERE kind = 's'), 0) AS sessions
                FROM per_key GROUP BY day
            )"""

    @staticmethod
    def _keys(tz: str) -> str:
        """The rows of `source` summed per key (kind, user_id, day, event_name), keys left at
        zero or below dropped, sorted (user_id, day, kind, event_name). Hashed into their keys,
        then the keys sorted. Sorting the rows instead and aggregating adjacent ones was
        measured (the backend's CPU time, on the drains of `python -m benchmarks drain`): about
        9% less where nearly every row is a key of its own (the worst case), but 15-20% more on
        an app's day, where a key has about ten rows (docs/drain.md)."""
        return f"""
                    SELECT kind, user_id COLLATE "C" AS user_id, day,
                           event_name COLLATE "C" AS event_name,
                           sum(n)::integer AS n, max(at) FILTER (WHERE n > 0) AS last_at,
                           bit_or({slot_sql("at", "day", tz)}) FILTER (WHERE n > 0) AS slots
                    FROM (SELECT *, (at AT TIME ZONE {tz})::date AS day FROM source) AS dated
                    GROUP BY 1, 2, 3, 4
                    HAVING sum(n) > 0
                    ORDER BY user_id, day, kind, event_name"""

    @staticmethod
    def _fold_insert(insert: str, upsert: str, into_emptied_days: bool) -> list[str]:
        """The fold's writes into one rollup table: `insert` (its `{held}` placeholder selects
        the rows) as plain inserts for the days the rollup does not hold, and with the `upsert`
        clause for the days it holds."""
        held = "day = ANY (SELECT day FROM days WHERE held)"
        statements = [insert.replace("{held}", f"NOT ({held})")]
        if not into_emptied_days:
            statements.append(f"{insert.replace('{held}', held)} {upsert}")
        return statements

    def capture_source(self, table: str) -> str:
        return f"SELECT kind, user_id, at, event_name, 1 AS n FROM {self.q_schema}.{table}"

    def count_source_rows(self, rows: str, tz: str) -> str:
        """Add `rows` (source, at, n) to each source's rows per day (`source_day_rows`): what
        the reconciliation compares with each source's rows in the app. The rows are summed per
        30 seconds first, and each bin's day taken once (a day per row costs twice as much):
        since 1970 every zone's offset, and every instant its clocks changed, is a whole number
        of 30 seconds from midnight UTC, so a bin lies within one day of any zone (a quarter-hour
        does not: Newfoundland's clocks fell back at 00:01 until 2011)."""
        return f"""
            INSERT INTO {self.q_schema}.source_day_rows AS t (source, day, rows)
            SELECT source, (bin AT TIME ZONE {tz})::date, sum(n)
            FROM (
                SELECT source,
                       date_bin('30 seconds', at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bin,
                       sum(n) AS n
                FROM ({rows}) AS counted GROUP BY 1, 2
            ) AS bins
            GROUP BY 1, 2
            ON CONFLICT (source, day) DO UPDATE SET rows = t.rows + EXCLUDED.rows"""

    def app_rows_less_capture(self, sources: tuple[ResolvedSource, ...]) -> str:
        """The rows of `sources` of days [:first_day, :end_day) that the capture does not hold:
        those written before the triggers existed, or by an insert the capture missed. A capture
        row commits with its app row, so within one statement's snapshot both sides agree.
        A polled source's rows count up to its watermark less the lookback (`:poll_cut_N`,
        N its index in `sources`): the polls count the rest. Each row names its source
        (`:source_N`)."""
        time_range = f"{{at}} >= {RANGE_START} AND {{at}} < {RANGE_END}"
        parts = []
        for index, source in enumerate(sources):
            rows_range = time_range
            if source.capture == "polling":
                rows_range += f" AND {{at}} < CAST(:poll_cut_{index} AS timestamptz)"
            parts.append(
                f"SELECT kind, user_id, at, event_name, 1 AS n, "
                f"CAST(:source_{index} AS text) AS source FROM ("
                f"{self.source_rows(source, source.relation_sql(self.dialect), rows_range)}"
                ") AS app_rows"
            )
        parts.extend(
            f"SELECT kind, user_id, at, event_name, -1 AS n, source FROM {self.q_schema}.{table}"
            f" WHERE at >= {RANGE_START} AND at < {RANGE_END}"
            " AND source = ANY (CAST(:captured_sources AS text[]))"
            for table in CAPTURE_TABLES
        )
        return " UNION ALL ".join(parts)

    def day_histogram(self, source: ResolvedSource, tz: str) -> str:
        """Rows per day in the tracking timezone: the plan a rebuild is cut into."""
        rows = self.source_rows(source, source.relation_sql(self.dialect))
        return f"""
            SELECT (at AT TIME ZONE {tz})::date AS day, count(*) AS rows
            FROM ({rows}) AS app_rows GROUP BY 1"""

    def new_polled_rows(self, source: ResolvedSource, definition: str | None = None) -> str:
        """The source's rows from :since on that no poll has counted yet (a multiset difference:
        two equal rows count twice), read by its `definition` as installed when given (see
        `definition`), else as configured. A row the app moved in place (a last-seen time) shows
        as a new row; the value it had stays counted: nothing counted is ever taken back."""
        if definition is None:
            rows = self.source_rows(
                source, source.relation_sql(self.dialect), "{at} >= CAST(:since AS timestamptz)"
            )
        else:
            rows = f"""SELECT * FROM ({definition}) AS defined
                       WHERE at >= CAST(:since AS timestamptz)"""
        return f"""
            WITH app AS (
                SELECT kind, user_id, at, event_name, count(*) AS n
                FROM ({rows}) AS app_rows GROUP BY 1, 2, 3, 4
            ),
            counted AS (
                SELECT kind, user_id, at, event_name, sum(n) AS n
                FROM {self.q_schema}.polled_rows
                WHERE source = :source AND at >= CAST(:since AS timestamptz)
                GROUP BY 1, 2, 3, 4
            )
            SELECT app.kind, app.user_id, app.at, app.event_name,
                   (app.n - coalesce(counted.n, 0))::integer AS n
            FROM app LEFT JOIN counted
                ON counted.kind = app.kind AND counted.user_id = app.user_id
               AND counted.at = app.at
               AND coalesce(counted.event_name, '') = coalesce(app.event_name, '')
            WHERE app.n > coalesce(counted.n, 0)"""

    def function_name(self, source: ResolvedSource, mode: str) -> str:
        return self.quote(capture_function_name(source.name, mode))

    def capture_functions(self, source: ResolvedSource, slot: int) -> list[str]:
        """The source's trigger functions appending to capture table `slot`: a statement-level
        one reading the statement's inserted rows (the `new_rows` transition table), and for
        `updates` a row-level one reading the updated row. The drain switches tables by
        replacing these functions, so the triggers read no state on each statement.

        SECURITY DEFINER lets the app's role insert without rights on our schema. They take no
        lock another transaction holds and do no upsert, so an app write never waits on another
        app transaction because of them. There is no exception block: that would open a
        subtransaction (and spend a subtransaction id) on every statement the app makes, and the
        append has nothing left that can fail where the app's own write would not.
        """
        name = sql_literal(source.name)
        functions = [self._capture_function(source, "inserts", slot, "new_rows", name)]
        if source.capture == "updates":
            functions.append(
                self._capture_function(source, "updates", slot, "(SELECT (NEW).*)", name)
            )
        return functions

    def _capture_function(
        self, source: ResolvedSource, mode: str, slot: int, relation: str, name: str
    ) -> str:
        s = self.q_schema
        return f"""
            CREATE OR REPLACE FUNCTION {s}.{self.function_name(source, mode)}() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER
            AS $body$
            BEGIN
                INSERT INTO {s}.{CAPTURE_TABLES[slot]} (kind, user_id, at, event_name, source)
                SELECT kind, user_id, at, event_name, {name}
                FROM ({self.source_rows(source, relation)}) AS captured;
                RETURN NULL;
            END
            $body$"""

    def create_triggers(self, source: ResolvedSource) -> list[str]:
        """The source's triggers: after each insert statement, and for `updates` after each
        update of a row whose time column moved forward. The row trigger's WHEN is evaluated
        without calling the function, so an update leaving the time alone costs (nearly)
        nothing. No `UPDATE OF` column list: it would miss a time set by a BEFORE trigger (a
        `moddatetime` trigger, as Supabase apps use), which PostgreSQL does not count as set by
        the statement. A time moved back is no new activity."""
        table = source.relation_sql(self.dialect)
        function = f"{self.q_schema}.{self.function_name(source, 'inserts')}"
        statements = [
            f"""
            CREATE TRIGGER {self.quote(source_trigger_name(self.schema, source.name, "inserts"))}
            AFTER INSERT ON {table}
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION {function}()"""
        ]
        if source.capture == "updates":
            at = self.quote(source.spec.source.at)
            statements.append(f"""
            CREATE TRIGGER {self.quote(source_trigger_name(self.schema, source.name, "updates"))}
            AFTER UPDATE ON {table}
            FOR EACH ROW WHEN (NEW.{at} > OLD.{at} OR (OLD.{at} IS NULL AND NEW.{at} IS NOT NULL))
            EXECUTE FUNCTION {self.q_schema}.{self.function_name(source, "updates")}()""")
        return statements

    def erasure_function(self) -> str:
        """A statement-level trigger function on the users table recording deleted users, so
        the next drain erases them from every table of the pipeline."""
        s = self.q_schema
        user_id = self.column(self.users, "id")
        return f"""
            CREATE OR REPLACE FUNCTION {s}.track_users() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER
            AS $body$
            BEGIN
                INSERT INTO {s}.erased_users (user_id)
                SELECT {user_id}::pg_catalog.text FROM old_rows AS src WHERE {user_id} IS NOT NULL;
                RETURN NULL;
            END
            $body$"""

    def create_erasure_trigger(self) -> str:
        return f"""
            CREATE TRIGGER {self.quote(legacy_trigger_name(self.schema))}
            AFTER DELETE ON {self.table_name(self.users)}
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION {self.q_schema}.track_users()"""
