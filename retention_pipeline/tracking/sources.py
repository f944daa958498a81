"""Each activity source's state across installs, and the polls.

An install compares the configured sources with those installed (`tracking_sources`): a new
source is backfilled alone, a removed one stops being counted (what it counted stays), a source
switching capture mode hands over without a gap or a double count. Every change is said in one
line, with what history each source starts from.

A poll reads the source's rows from its watermark less a lookback, subtracts the rows it already
counted there (kept in `polled_rows`) and folds only the rest, in one transaction: it never
clears a day, a row moved in place counts its new time and keeps its old one, a late row within
the lookback counts once, and a poll killed midway adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text

from retention_pipeline.database.activity_sources import ResolvedSource
from retention_pipeline.tracking.fold import Added, added_by
from retention_pipeline.tracking.sql import (
    POLL_LOOKBACK,
    TrackingSql,
    legacy_trigger_name,
    object_name,
    source_trigger_name,
)

TRIGGER_MODES = ("inserts", "updates")
# The shorthand sources an install made before revision 0015 captured, under the old names.
LEGACY_SOURCES = {"events": "track_events", "sessions": "track_sessions"}


@dataclass(frozen=True)
class InstalledSource:
    name: str
    relation: str
    capture: str
    definition: str
    watermark: datetime | None
    first_day: object


def installed_sources(connection: Connection, sql: TrackingSql) -> dict[str, InstalledSource]:
    rows = connection.execute(
        text(f"""
            SELECT name, relation, capture, definition, watermark, first_day
            FROM {sql.q_schema}.tracking_sources""")
    )
    return {row.name: InstalledSource(*row) for row in rows}


def drop_source_triggers(
    connection: Connection, sql: TrackingSql, name: str, relation: str
) -> None:
    exists = connection.execute(
        text("SELECT to_regclass(:relation) IS NOT NULL"), {"relation": relation}
    ).scalar()
    for mode in TRIGGER_MODES:
        if exists:
            trigger = sql.quote(source_trigger_name(sql.schema, name, mode))
            connection.execute(text(f"DROP TRIGGER IF EXISTS {trigger} ON {relation}"))
        function = sql.quote(
            object_name("capture", name, *(["updates"] if mode == "updates" else []))
        )
        connection.execute(text(f"DROP FUNCTION IF EXISTS {sql.q_schema}.{function}()"))


def adopt_legacy_sources(
    connection: Connection, sql: TrackingSql, mode: str, refreshed_through: datetime | None
) -> None:
    """An install made before revision 0015: its one trigger per table (on events and
    sessions) makes way for the sources' own, in this transaction, so every row is captured by
    exactly one of them; the shorthand sources carry on from where the old capture or refresh
    was, without a rebuild."""
    s = sql.q_schema
    for name, function in LEGACY_SOURCES.items():
        for (relation,) in connection.execute(
            text("""
                SELECT t.tgrelid::regclass::text FROM pg_catalog.pg_trigger AS t
                WHERE t.tgname = :trigger AND t.tgfoid = to_regprocedure(:function)"""),
            {"trigger": legacy_trigger_name(sql.schema), "function": f"{s}.{function}()"},
        ).all():
            trigger = sql.quote(legacy_trigger_name(sql.schema))
            connection.execute(text(f"DROP TRIGGER {trigger} ON {relation}"))
        connection.execute(text(f"DROP FUNCTION IF EXISTS {s}.{function}()"))
        configured = [source for source in sql.sources if source.name == name]
        if not configured:
            continue
        source = configured[0]
        capture = "inserts" if mode == "triggers" else "polling"
        _insert_state(connection, sql, source, capture, pending=False)
        if capture == "polling":
            # The old refresh recomputed every day from the one before `refreshed_through`:
            # what it read is counted; the polls go on from there.
            seed_counted(connection, sql, source, refreshed_through)


def _insert_state(
    connection: Connection, sql: TrackingSql, source: ResolvedSource, capture: str, pending: bool
) -> None:
    connection.execute(
        text(f"""
            INSERT INTO {sql.q_schema}.tracking_sources
                (name, relation, capture, definition, watermark, backfill_pending)
            VALUES (:name, :relation, :capture, :definition,
                    CASE WHEN :capture = 'polling' THEN now() END, :pending)"""),
        {
            "name": source.name,
            "relation": source.relation_sql(sql.dialect),
            "capture": capture,
            "definition": sql.definition(source),
            "pending": pending,
        },
    )


def seed_counted(
    connection: Connection, sql: TrackingSql, source: ResolvedSource, watermark: datetime | None
) -> None:
    """Start polling `source` from `watermark` (default now), its rows of the lookback before it
    taken as counted already (the capture or the rebuild counted them)."""
    s = sql.q_schema
    params = {"name": source.name, "watermark": watermark}
    connection.execute(
        text(f"""
            UPDATE {s}.tracking_sources
            SET watermark = coalesce(CAST(:watermark AS timestamptz), now())
            WHERE name = :name"""),
        params,
    )
    connection.execute(text(f"DELETE FROM {s}.polled_rows WHERE source = :name"), params)
    rows = sql.source_rows(
        source,
        source.relation_sql(sql.dialect),
        f"{{at}} >= (SELECT watermark - CAST(:lookback AS interval) FROM {s}.tracking_sources "
        "WHERE name = :name) "
        f"AND {{at}} < (SELECT watermark FROM {s}.tracking_sources WHERE name = :name)",
    )
    connection.execute(
        text(f"""
            INSERT INTO {s}.polled_rows (source, kind, user_id, at, event_name, n)
            SELECT :name, kind, user_id, at, event_name, count(*)
            FROM ({rows}) AS app_rows GROUP BY 2, 3, 4, 5"""),
        {**params, "lookback": POLL_LOOKBACK},
    )


def sync_sources(
    connection: Connection, sql: TrackingSql, installed: dict[str, InstalledSource]
) -> tuple[list[str], list[ResolvedSource]]:
    """Bring the installed sources' state to the configured ones. Returns a line per change,
    and the sources that switch from polling to a trigger: each is polled once more after its
    triggers exist (`hand_over_to_triggers`)."""
    s = sql.q_schema
    notes: list[str] = []
    to_triggers: list[ResolvedSource] = []
    configured = {source.name: source for source in sql.sources}
    for name, old in installed.items():
        if name in configured:
            continue
        drop_source_triggers(connection, sql, name, old.relation)
        connection.execute(text(f"DELETE FROM {s}.tracking_sources WHERE name = :n"), {"n": name})
        connection.execute(text(f"DELETE FROM {s}.polled_rows WHERE source = :n"), {"n": name})
        notes.append(
            f"source `{name}` removed: what it counted stays in the rollup"
            + (f" (from {old.first_day})" if old.first_day else "")
            + f"; nothing more is counted from {old.relation}"
        )
    for name, source in configured.items():
        old = installed.get(name)
        if old is None:
            _insert_state(connection, sql, source, source.capture, pending=True)
            continue
        relation = source.relation_sql(sql.dialect)
        if old.relation != relation:
            drop_source_triggers(connection, sql, name, old.relation)
        if old.definition != sql.definition(source):
            notes.append(
                f"source `{name}`: definition changed; what it counted stays as counted, new "
                "rows count by the new one (`retention-pipeline db refresh --since DAY` recounts "
                "days of a source captured by `inserts`)"
            )
        connection.execute(
            text(f"""
                UPDATE {s}.tracking_sources
                SET relation = :relation, capture = :capture, definition = :definition
                WHERE name = :name"""),
            {
                "name": name,
                "relation": relation,
                "capture": source.capture,
                "definition": sql.definition(source),
            },
        )
        if old.capture == source.capture:
            continue
        if source.capture == "polling":
            seed_counted(connection, sql, source, None)
            notes.append(
                f"source `{name}`: now polled by each drain (was captured by `{old.capture}`); "
                "nothing it counted is recounted"
            )
        elif old.capture == "polling":
            to_triggers.append(source)
            notes.append(
                f"source `{name}`: now captured by `{source.capture}` (was polled); polled once "
                "more as its triggers start"
            )
        else:
            notes.append(f"source `{name}`: now captured by `{source.capture}`")
    return notes, to_triggers


def hand_over_to_triggers(
    connection: Connection,
    sql: TrackingSql,
    sources: list[ResolvedSource],
    timezone: str,
    visit_gap_minutes: int,
) -> None:
    """A last poll of sources whose triggers were just created in this transaction: the
    triggers' lock waited for every app write before it, which the poll sees; every write
    after it is captured."""
    for source in sources:
        poll(connection, sql, source, timezone, visit_gap_minutes)
        connection.execute(
            text(f"DELETE FROM {sql.q_schema}.polled_rows WHERE source = :n"), {"n": source.name}
        )
        connection.execute(
            text(f"UPDATE {sql.q_schema}.tracking_sources SET watermark = NULL WHERE name = :n"),
            {"n": source.name},
        )


def poll(
    connection: Connection,
    sql: TrackingSql,
    source: ResolvedSource,
    timezone: str,
    visit_gap_minutes: int,
) -> Added:
    """Fold the source's rows no poll has counted yet, from its watermark less the lookback,
    and keep them as counted; move the watermark to the newest (never past now). Visits are
    counted with the installed gap, `visit_gap_minutes`."""
    s = sql.q_schema
    params = {"source": source.name, "lookback": POLL_LOOKBACK}
    since = connection.execute(
        text(f"""
            SELECT watermark - CAST(:lookback AS interval) FROM {s}.tracking_sources
            WHERE name = :source"""),
        params,
    ).scalar_one()
    connection.execute(
        text(f"CREATE TEMPORARY TABLE polled_now AS {sql.new_polled_rows(source)}"),
        {**params, "since": since},
    )
    added = added_by(
        connection.execute(
            text(
                sql.fold(
                    "SELECT kind, user_id, at, event_name, n FROM pg_temp.polled_now",
                    "CAST(:tz AS text)",
                    visit_gap_minutes,
                )
            ),
            {"tz": timezone},
        )
    )
    connection.execute(
        text(f"""
            INSERT INTO {s}.polled_rows (source, kind, user_id, at, event_name, n)
            SELECT :source, kind, user_id, at, event_name, n FROM pg_temp.polled_now"""),
        params,
    )
    connection.execute(
        text(f"""
            UPDATE {s}.tracking_sources
            SET watermark = greatest(
                watermark, least((SELECT max(at) FROM pg_temp.polled_now), now()))
            WHERE name = :source"""),
        params,
    )
    connection.execute(
        text(f"""
            DELETE FROM {s}.polled_rows
            WHERE source = :source
              AND at < (SELECT watermark - CAST(:lookback AS interval)
                        FROM {s}.tracking_sources WHERE name = :source)"""),
        params,
    )
    connection.execute(text("DROP TABLE pg_temp.polled_now"))
    return added
