"""SQL that tracks activity, built from the configured mapping.

Names come from configuration and are quoted through SQLAlchemy's identifier preparer; values
(timezone, days) are read from the tracking state or bound, never pasted into the text.

The triggers only append to a capture table. Every write to the rollup goes through one
additive fold, whatever it reads: the capture (the drain), or the app tables less what is
still in the capture (a rebuild or a repair of some days).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine.interfaces import Dialect

from retention_pipeline.database.app_tables import ResolvedTable

MAX_EVENT_NAME_LENGTH = 200
CAPTURE_TABLES = ("activity_capture_0", "activity_capture_1")
TRACKED_KINDS = ("events", "sessions")
# The start of :first_day and of :end_day in :tz; a missing day leaves that end open.
RANGE_START = (
    "coalesce(CAST(:first_day AS date)::timestamp AT TIME ZONE CAST(:tz AS text), '-infinity')"
)
RANGE_END = "coalesce(CAST(:end_day AS date)::timestamp AT TIME ZONE CAST(:tz AS text), 'infinity')"
# A day's activity is kept as the 5-minute slots in which anything happened: 300 cover the
# 25-hour day daylight saving ends with, counted from the start of the day in the timezone.
SLOTS_PER_DAY = 300
SLOT_MINUTES = 5


def slot_sql(at: str, day: str, tz: str) -> str:
    """A bit(300) with only the slot of the time `at` on `day` (in the timezone `tz`) set."""
    elapsed = f"extract(epoch FROM {at} - ({day}::timestamp AT TIME ZONE {tz}))"
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


def trigger_name(schema: str) -> str:
    """The name of the tracking trigger on each app table: one per pipeline schema."""
    return f"{schema}_track_activity"


@dataclass(frozen=True)
class TrackingSql:
    dialect: Dialect
    schema: str
    users: ResolvedTable
    events: ResolvedTable
    sessions: ResolvedTable

    def quote(self, name: str) -> str:
        return self.dialect.identifier_preparer.quote(name)

    @property
    def q_schema(self) -> str:
        return self.dialect.identifier_preparer.quote_schema(self.schema)

    def table_name(self, table: ResolvedTable) -> str:
        return table.sql_name(self.dialect.identifier_preparer)

    def column(self, table: ResolvedTable, key: str) -> str:
        return table.column_sql(key, "src", self.dialect.identifier_preparer)

    def timestamp(self, table: ResolvedTable) -> str:
        return table.timestamp_sql("created_at", "src", self.dialect.identifier_preparer)

    def tracked_table(self, kind: str) -> ResolvedTable:
        return {"events": self.events, "sessions": self.sessions, "users": self.users}[kind]

    def captured_rows(self, kind: str, source: str, time_range: str = "TRUE") -> str:
        """What the capture keeps of each app row: kind, user id, time and (for events) the
        name, cut to a length worth showing. Rows without a user or a finite time are skipped.

        Every type, function and operator is named in pg_catalog: the trigger functions run
        as their owner with the caller's search_path (setting one per call would cost the app
        about 7% of its insert throughput), so nothing here may resolve through it."""
        table = self.tracked_table(kind)
        at = self.timestamp(table)
        user_id = self.column(table, "user_id")
        if kind == "events":
            name = f"{self.column(table, 'name')}::pg_catalog.text"
            event_name = (
                f"pg_catalog.left(CASE WHEN {name} IS NULL OR {name} OPERATOR(pg_catalog.=) '' "
                f"THEN '(unnamed)' ELSE {name} END, {MAX_EVENT_NAME_LENGTH})"
            )
        else:
            event_name = "NULL::pg_catalog.text"
        return f"""
            SELECT '{kind[0]}'::pg_catalog."char" AS kind, {user_id}::pg_catalog.text AS user_id,
                   {at} AS at, {event_name} AS event_name
            FROM {source} AS src
            WHERE {user_id} IS NOT NULL AND {at} IS NOT NULL
              AND pg_catalog.isfinite({at}) AND {time_range.format(at=at)}"""

    def fold(
        self, source: str, tz: str, visit_gap_minutes: int, *, into_emptied_days: bool = False
    ) -> str:
        """Add `source` (kind, user_id, at, event_name, n) to the rollup. Rows with a negative
        n cancel rows of the same key; keys left at zero or below add nothing. The latest time
        is a maximum over the added rows: one that is also cancelled (it is in the capture) sets
        it harmlessly, as the drain will set the same time again. So are the active slots: an OR,
        which a slot added twice leaves as it was. Cancelled rows add no slot. The visits are
        recounted from the merged slots with the installed gap, `visit_gap_minutes`.
        `into_emptied_days`: the rollup holds nothing of these days (they were just deleted, or
        are being rebuilt), so plain inserts do instead of upserts, at half the cost. Rows are
        sorted (bytewise, the cheapest order, and the index's own in a C or C.UTF-8 database) so
        the indexes are written in one sweep. Returns per day: user-days, events and sessions
        added."""
        s = self.q_schema
        add_action = add_daily = ""
        if not into_emptied_days:
            add_action = """
                ON CONFLICT (user_id, day, event_name) DO UPDATE
                SET event_count = t.event_count + EXCLUDED.event_count,
                    last_at = greatest(t.last_at, EXCLUDED.last_at)"""
            merged_visits = visit_count_sql(
                "(t.active_slots | EXCLUDED.active_slots)", visit_gap_minutes
            )
            add_daily = f"""
                ON CONFLICT (user_id, day) DO UPDATE
                SET event_count = t.event_count + EXCLUDED.event_count,
                    session_count = t.session_count + EXCLUDED.session_count,
                    last_event_at = greatest(t.last_event_at, EXCLUDED.last_event_at),
                    last_session_at = greatest(t.last_session_at, EXCLUDED.last_session_at),
                    active_slots = t.active_slots | EXCLUDED.active_slots,
                    visit_count = {merged_visits}"""
        return f"""
            WITH source AS ({source}),
            per_key AS (
                SELECT kind, user_id, day, event_name,
                       sum(n)::integer AS n, max(at) FILTER (WHERE n > 0) AS last_at,
                       bit_or({slot_sql("at", "day", tz)}) FILTER (WHERE n > 0) AS slots
                FROM (SELECT *, (at AT TIME ZONE {tz})::date AS day FROM source) AS dated
                GROUP BY 1, 2, 3, 4
                HAVING sum(n) > 0
            ),
            actions AS (
                INSERT INTO {s}.action_daily AS t (user_id, day, event_name, event_count, last_at)
                SELECT user_id, day, event_name, n, last_at
                FROM per_key WHERE kind = 'e'
                ORDER BY user_id COLLATE "C", day, event_name COLLATE "C"{add_action}
            ),
            per_day AS (
                SELECT user_id, day,
                       coalesce(sum(n) FILTER (WHERE kind = 'e'), 0) AS events,
                       coalesce(sum(n) FILTER (WHERE kind = 's'), 0) AS sessions,
                       max(last_at) FILTER (WHERE kind = 'e') AS last_event_at,
                       max(last_at) FILTER (WHERE kind = 's') AS last_session_at,
                       bit_or(slots) AS slots
                FROM per_key
                GROUP BY 1, 2
            ),
            daily AS (
                INSERT INTO {s}.activity_daily AS t
                    (user_id, day, event_count, session_count, last_event_at, last_session_at,
                     active_slots, visit_count)
                SELECT user_id, day, events, sessions, last_event_at, last_session_at, slots,
                       {visit_count_sql("slots", visit_gap_minutes)}
                FROM per_day
                ORDER BY user_id COLLATE "C", day{add_daily}
                RETURNING day
            ),
            user_days AS (SELECT day, count(*) AS user_days FROM daily GROUP BY day),
            rows_added AS (
                SELECT day, coalesce(sum(n) FILTER (WHERE kind = 'e'), 0) AS events,
                       coalesce(sum(n) FILTER (WHERE kind = 's'), 0) AS sessions
                FROM per_key GROUP BY day
            )
            SELECT day, user_days.user_days, rows_added.events, rows_added.sessions
            FROM user_days JOIN rows_added USING (day)"""

    def capture_source(self, table: str) -> str:
        return f"SELECT kind, user_id, at, event_name, 1 AS n FROM {self.q_schema}.{table}"

    def app_rows_less_capture(self) -> str:
        """The app's rows of days [:first_day, :end_day) that the capture does not hold: those
        written before the triggers existed, or by an insert the capture missed. A capture row
        commits with its app row, so within one statement's snapshot both sides agree."""
        time_range = f"{{at}} >= {RANGE_START} AND {{at}} < {RANGE_END}"
        app = " UNION ALL ".join(
            f"SELECT kind, user_id, at, event_name, 1 AS n FROM ("
            f"{self.captured_rows(kind, self.table_name(self.tracked_table(kind)), time_range)}"
            ") AS app_rows"
            for kind in TRACKED_KINDS
        )
        captured = " UNION ALL ".join(
            f"SELECT kind, user_id, at, event_name, -1 FROM {self.q_schema}.{table}"
            f" WHERE at >= {RANGE_START} AND at < {RANGE_END}"
            for table in CAPTURE_TABLES
        )
        return f"{app} UNION ALL {captured}"

    def day_histogram(self, kind: str, tz: str) -> str:
        """Rows per day in the tracking timezone: the plan a rebuild is cut into."""
        rows = self.captured_rows(kind, self.table_name(self.tracked_table(kind)))
        return f"""
            SELECT (at AT TIME ZONE {tz})::date AS day, count(*) AS rows
            FROM ({rows}) AS app_rows GROUP BY 1"""

    def capture_function(self, kind: str, slot: int) -> str:
        """A statement-level trigger function appending the statement's rows (from the
        `new_rows` transition table) to capture table `slot`. The drain switches tables by
        replacing this function, so the trigger reads no state on each statement.

        SECURITY DEFINER lets the app's role insert without rights on our schema. It takes no
        lock another transaction holds and does no upsert, so an app insert never waits on
        another app transaction because of it. There is no exception block: that would open a
        subtransaction (and spend a subtransaction id) on every statement the app makes, and the
        append has nothing left that can fail where the app's own insert would not.
        """
        s = self.q_schema
        return f"""
            CREATE OR REPLACE FUNCTION {s}.{self.function_name(kind)}() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER
            AS $body$
            BEGIN
                INSERT INTO {s}.{CAPTURE_TABLES[slot]} (kind, user_id, at, event_name)
                {self.captured_rows(kind, "new_rows")};
                RETURN NULL;
            END
            $body$"""

    def erasure_function(self) -> str:
        """A statement-level trigger function on the users table recording deleted users, so
        the next drain erases them from every table of the pipeline."""
        s = self.q_schema
        user_id = self.column(self.users, "id")
        return f"""
            CREATE OR REPLACE FUNCTION {s}.{self.function_name("users")}() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER
            AS $body$
            BEGIN
                INSERT INTO {s}.erased_users (user_id)
                SELECT {user_id}::pg_catalog.text FROM old_rows AS src WHERE {user_id} IS NOT NULL;
                RETURN NULL;
            END
            $body$"""

    @staticmethod
    def function_name(kind: str) -> str:
        return f"track_{kind}"

    def trigger_name(self) -> str:
        return self.quote(trigger_name(self.schema))

    def create_trigger(self, kind: str) -> str:
        operation, transition = ("DELETE", "OLD") if kind == "users" else ("INSERT", "NEW")
        return f"""
            CREATE TRIGGER {self.trigger_name()}
            AFTER {operation} ON {self.table_name(self.tracked_table(kind))}
            REFERENCING {transition} TABLE AS {transition.lower()}_rows
            FOR EACH STATEMENT EXECUTE FUNCTION {self.q_schema}.{self.function_name(kind)}()"""

    def drop_trigger(self, kind: str) -> str:
        table = self.table_name(self.tracked_table(kind))
        return f"DROP TRIGGER IF EXISTS {self.trigger_name()} ON {table}"
