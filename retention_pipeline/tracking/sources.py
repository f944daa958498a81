"""Each activity source's state across installs, and the polls.

An install compares the configured sources with those installed (`tracking_sources`): a new
source is backfilled alone, a removed one stops being counted (what it counted stays), a source
renamed (its definition unchanged) keeps its history, a source switching capture mode hands over
without a gap or a double count. Every change is said in one line, with what history each source
starts from. Everything else that runs against an installed database refuses to run while the
configured sources differ from the installed ones (`sources_problem`): only `db upgrade` changes
what is counted.

A poll reads the source's rows from its watermark less a lookback, subtracts the rows it already
counted there (kept in `polled_rows`) and folds only the rest, in one transaction: it never
clears a day, a row moved in place counts its new time and keeps its old one, a late row within
the lookback counts once, and a poll killed midway adds nothing.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from datetime import datetime

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from retention_pipeline.database.activity_sources import ResolvedSource
from retention_pipeline.tracking.fold import Added, added_by, record_late_days
from retention_pipeline.tracking.sql import (
    CAPTURE_TABLES,
    POLL_LOOKBACK,
    TrackingSql,
    capture_function_name,
    legacy_trigger_name,
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


def source_differences(sql: TrackingSql, source: ResolvedSource, old: InstalledSource) -> list[str]:
    """What of `source` differs from its installed state."""
    differences = []
    if old.relation != source.relation_sql(sql.dialect):
        differences.append("its table")
    elif old.definition != sql.definition(source):
        # The SQL that reads it: its configuration, or how this version of the pipeline reads it.
        differences.append("its user, time, action or where, or how this version reads them")
    if old.capture != source.capture:
        differences.append("its capture")
    return differences


def renamed_sources(
    sql: TrackingSql, installed: dict[str, InstalledSource]
) -> dict[str, InstalledSource]:
    """The configured sources not installed under their name whose definition (which does not
    hold the name) is that of an installed source no longer configured: each new name with the
    state it takes over."""
    configured = {source.name for source in sql.sources}
    removed = [old for name, old in installed.items() if name not in configured]
    renamed: dict[str, InstalledSource] = {}
    for source in sql.sources:
        if source.name in installed:
            continue
        definition = sql.definition(source)
        taken = {old.name for old in renamed.values()}
        for old in removed:
            if old.definition == definition and old.name not in taken:
                renamed[source.name] = old
                break
    return renamed


def sources_problem(connection: Connection, sql: TrackingSql) -> str | None:
    """The first configured source that is not installed as configured, or an installed one no
    longer configured, in one line; None when they agree. Counting with a configuration the
    database was not upgraded to would go wrong silently: a new source's rows not captured, a
    changed definition going live without its upgrade."""
    installed = installed_sources(connection, sql)
    upgrade = "run `retention-pipeline db upgrade`"
    for source in sql.sources:
        old = installed.get(source.name)
        if old is None:
            return f"{source.spec.key}: source `{source.name}` is not installed: {upgrade}"
        differences = source_differences(sql, source, old)
        if differences:
            return (
                f"{source.spec.key}: source `{source.name}` changed since the last `db upgrade` "
                f"({' and '.join(differences)}): {upgrade}"
            )
    configured = {source.name for source in sql.sources}
    for name, old in installed.items():
        if name not in configured:
            return (
                f"database.activity: source `{name}` ({old.relation}) is installed but no longer "
                f"configured: {upgrade}"
            )
    return None


def trigger_right_problems(
    connection: Connection, sql: TrackingSql, installed: dict[str, InstalledSource] | None
) -> list[str]:
    """One line per source captured by a trigger whose table the role may not give one:
    `db upgrade` creates the trigger (the TRIGGER right) and, where one is there already, drops
    it first (only the table's owner may). `installed`: the installed sources, None when the
    schema is not installed at its current revision. A source installed as configured, its
    trigger in place, is left out: nothing needs `db upgrade` to touch it, and the role `check`
    runs as may be a run's, which needs neither right."""
    problems = []
    for source in sql.sources:
        if source.capture not in TRIGGER_MODES:
            continue
        role, may_create, owns, has_trigger = connection.execute(
            text("""
                SELECT current_user,
                       has_table_privilege(c.oid, 'TRIGGER'),
                       pg_has_role(c.relowner, 'USAGE'),
                       EXISTS (SELECT FROM pg_catalog.pg_trigger AS t
                               WHERE t.tgrelid = c.oid AND t.tgname = ANY (:triggers))
                FROM pg_catalog.pg_class AS c WHERE c.oid = CAST(:relation AS regclass)"""),
            {
                "relation": source.relation_sql(sql.dialect),
                "triggers": [
                    source_trigger_name(sql.schema, source.name, mode) for mode in TRIGGER_MODES
                ],
            },
        ).one()
        table = source.spec.source.qualified_name
        old = (installed or {}).get(source.name)
        if (
            old is not None
            and not source_differences(sql, source, old)
            and triggers_in_place(connection, sql, source)
        ):
            continue
        if not may_create:
            problems.append(
                f"{source.spec.key}.capture: role {role} lacks TRIGGER on table {table}: "
                "`db upgrade` creates the source's capture trigger there (grant it, or use "
                "`capture: polling`)"
            )
        elif has_trigger and not owns:
            problems.append(
                f"{source.spec.key}.capture: role {role} is not the owner of table {table}: "
                "`db upgrade` replaces the source's capture trigger there, which only the owner "
                "may drop (run it as the owner, or use `capture: polling`)"
            )
    return problems


def erasure_trigger_problem(connection: Connection, sql: TrackingSql, tracking: str) -> str | None:
    """Why `db upgrade` could not put the trigger that records deleted users on the users table
    (`database.tracking: triggers`), the role lacking TRIGGER there, as one line; None when it
    can, or the trigger is there already."""
    if tracking != "triggers":
        return None
    role, may_create, present = connection.execute(
        text("""
            SELECT current_user, has_table_privilege(c.oid, 'TRIGGER'),
                   EXISTS (SELECT FROM pg_catalog.pg_trigger AS t
                           WHERE t.tgrelid = c.oid AND t.tgname = :trigger)
            FROM pg_catalog.pg_class AS c WHERE c.oid = CAST(:relation AS regclass)"""),
        {"relation": sql.table_name(sql.users), "trigger": legacy_trigger_name(sql.schema)},
    ).one()
    if may_create or present:
        return None
    return (
        f"database.tables.users: role {role} lacks TRIGGER on table "
        f"{sql.users.mapping.qualified_name}: `db upgrade` creates the trigger there that records "
        "the users your app deletes, to erase them (grant it, or use `database.tracking: "
        "incremental`)"
    )


def triggers_in_place(connection: Connection, sql: TrackingSql, source: ResolvedSource) -> bool:
    """Whether every capture trigger of `source` is on its table (`db upgrade` leaves them be)."""
    expected = ["inserts", *(["updates"] if source.capture == "updates" else [])]
    return connection.execute(
        text("""
            SELECT count(*) = cardinality(CAST(:triggers AS text[]))
            FROM pg_catalog.pg_trigger
            WHERE tgrelid = to_regclass(:relation) AND tgname = ANY (CAST(:triggers AS text[]))"""),
        {
            "relation": source.relation_sql(sql.dialect),
            "triggers": [source_trigger_name(sql.schema, source.name, mode) for mode in expected],
        },
    ).scalar_one()


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
        function = sql.quote(capture_function_name(name, mode))
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
        count_rows_from_tomorrow(connection, sql, name)
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


def count_rows_from_tomorrow(connection: Connection, sql: TrackingSql, name: str) -> None:
    """Compare the source's counted rows with the app's from tomorrow on: today's count began
    by another definition, or not at all (`status.reconcile_last_day`)."""
    s = sql.q_schema
    connection.execute(
        text(f"""
            UPDATE {s}.tracking_sources
            SET rows_counted_from = (now() AT TIME ZONE (SELECT timezone FROM {s}.tracking_state))
                                    ::date + 1
            WHERE name = :name"""),
        {"name": name},
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
        # Every row from the lookback on, the newest and any dated ahead included: a poll has
        # counted them all (or the capture did, before polling).
        f"{{at}} >= (SELECT watermark - CAST(:lookback AS interval) FROM {s}.tracking_sources "
        "WHERE name = :name)",
    )
    connection.execute(
        text(f"""
            INSERT INTO {s}.polled_rows (source, kind, user_id, at, event_name, n)
            SELECT :name, kind, user_id, at, event_name, count(*)
            FROM ({rows}) AS app_rows GROUP BY 2, 3, 4, 5"""),
        {**params, "lookback": POLL_LOOKBACK},
    )


def _rename(connection: Connection, sql: TrackingSql, old: InstalledSource, new: str) -> None:
    """Carry `old`'s state over to the name `new`: its watermark, polled rows, first day, its
    rows counted per day, and the capture rows it wrote, which a repair subtracts by source
    name."""
    s = sql.q_schema
    drop_source_triggers(connection, sql, old.name, old.relation)
    names = {"old": old.name, "new": new}
    connection.execute(
        text(f"UPDATE {s}.tracking_sources SET name = :new WHERE name = :old"), names
    )
    for table in ("polled_rows", "source_day_rows", *CAPTURE_TABLES):
        connection.execute(text(f"UPDATE {s}.{table} SET source = :new WHERE source = :old"), names)


def sync_sources(
    connection: Connection,
    sql: TrackingSql,
    installed: dict[str, InstalledSource],
    timezone: str,
    visit_gap_minutes: int,
) -> tuple[list[str], list[ResolvedSource]]:
    """Bring the installed sources' state to the configured ones. Returns a line per change,
    and the sources that switch from polling to a trigger: each is polled once more after its
    triggers exist (`hand_over_to_triggers`). A polled source whose definition changed is
    polled once more by the old one (in the rollup's `timezone`, visits by the installed
    `visit_gap_minutes`)."""
    s = sql.q_schema
    notes: list[str] = []
    to_triggers: list[ResolvedSource] = []
    configured = {source.name: source for source in sql.sources}
    installed = dict(installed)
    for new, old in renamed_sources(sql, installed).items():
        _rename(connection, sql, old, new)
        del installed[old.name]
        installed[new] = InstalledSource(new, *astuple(old)[1:])
        notes.append(f"source `{old.name}` renamed `{new}`: its history is kept")
    for name, old in installed.items():
        if name in configured:
            continue
        drop_source_triggers(connection, sql, name, old.relation)
        connection.execute(text(f"DELETE FROM {s}.tracking_sources WHERE name = :n"), {"n": name})
        for table in ("polled_rows", "source_day_rows"):
            connection.execute(text(f"DELETE FROM {s}.{table} WHERE source = :n"), {"n": name})
        notes.append(
            f"source `{name}` removed: what it counted stays in the rollup"
            + (f" (from {old.first_day})" if old.first_day else "")
            + f"; nothing more is counted from {old.relation}"
        )
        for source in configured.values():
            if source.name not in installed and source.relation_sql(sql.dialect) == old.relation:
                # Not a rename (the definitions differ), so the new source's backfill counts
                # rows of the same table again: said, since nothing can tell the counts apart.
                notes.append(
                    f"source `{source.name}` reads {old.relation} like the removed `{name}`, "
                    f"whose counts stay: `{source.name}` is backfilled from all of its rows, so "
                    "the days before today count both (to count them once, keep the name "
                    f"`{name}`: a changed definition applies to new rows only)"
                )
    for name, source in configured.items():
        old = installed.get(name)
        if old is None:
            _insert_state(connection, sql, source, source.capture, pending=True)
            continue
        relation = source.relation_sql(sql.dialect)
        if old.relation != relation:
            drop_source_triggers(connection, sql, name, old.relation)
        definition_changed = old.definition != sql.definition(source)
        if definition_changed:
            count_rows_from_tomorrow(connection, sql, name)
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
        if definition_changed and old.capture == "polling":
            if _backfill_pending(connection, sql, name):
                # Its rebuild, still to finish, counts up to the watermark less the lookback,
                # and no poll has counted anything since the watermark was set: it stays.
                seed_counted(connection, sql, source, old.watermark)
            else:
                # The rows written since its last poll count by the old definition, as every
                # row before them did; then those the new one reads count as counted, so the
                # change applies to rows written from now on.
                notes.extend(
                    _poll_by_installed_definition(
                        connection, sql, source, old, timezone, visit_gap_minutes
                    )
                )
                seed_counted(connection, sql, source, None)
        if old.capture == source.capture:
            continue
        if source.capture == "polling":
            # Its triggers go first: dropping them waits for the app's transactions that wrote
            # to the table, whose rows the capture holds and the seed must then see as counted
            # (seeded first, a row committed meanwhile was captured and polled both).
            drop_source_triggers(connection, sql, name, relation)
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


def _backfill_pending(connection: Connection, sql: TrackingSql, name: str) -> bool:
    return connection.execute(
        text(f"SELECT backfill_pending FROM {sql.q_schema}.tracking_sources WHERE name = :name"),
        {"name": name},
    ).scalar_one()


def _poll_by_installed_definition(
    connection: Connection,
    sql: TrackingSql,
    source: ResolvedSource,
    installed: InstalledSource,
    timezone: str,
    visit_gap_minutes: int,
) -> list[str]:
    """Poll `source` once more by its `installed` definition; a line saying so when that
    definition no longer reads (a table or column gone), whose rows since the last poll then
    count as counted."""
    try:
        with connection.begin_nested():
            added = poll(connection, sql, source, timezone, visit_gap_minutes, installed.definition)
    except DBAPIError as error:
        # Class 42: what the definition names is gone or out of reach. Anything else (a lock
        # wait given up, the server going away) fails the upgrade, which tries again.
        if not str(getattr(error.orig, "sqlstate", "") or "").startswith("42"):
            raise
        reason = (str(error.orig).strip().splitlines() or [type(error).__name__])[0]
        return [
            f"source `{source.name}`: its rows written since the last drain are not counted: "
            f"its previous definition no longer reads them ({reason})"
        ]
    record_late_days(connection, sql, set(added.days))
    return []


def hand_over_to_triggers(
    connection: Connection,
    sql: TrackingSql,
    sources: list[ResolvedSource],
    timezone: str,
    visit_gap_minutes: int,
) -> None:
    """A last poll of sources whose triggers were just created in this transaction: the
    triggers' lock waited for every app write before it, which the poll sees; every write
    after it is captured. Days it adds to after their snapshot are noted late."""
    for source in sources:
        record_late_days(
            connection, sql, set(poll(connection, sql, source, timezone, visit_gap_minutes).days)
        )
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
    definition: str | None = None,
) -> Added:
    """Fold the source's rows no poll has counted yet, from its watermark less the lookback,
    and keep them as counted; move the watermark to the newest (never past now). Visits are
    counted with the installed gap, `visit_gap_minutes`. `definition`: the source's rows as an
    earlier installed definition read them (default: as configured)."""
    s = sql.q_schema
    params = {"source": source.name, "lookback": POLL_LOOKBACK}
    since = connection.execute(
        text(f"""
            SELECT watermark - CAST(:lookback AS interval) FROM {s}.tracking_sources
            WHERE name = :source"""),
        params,
    ).scalar_one()
    connection.execute(
        text(f"CREATE TEMPORARY TABLE polled_now AS {sql.new_polled_rows(source, definition)}"),
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
        text(
            sql.count_source_rows(
                "SELECT CAST(:source AS text) AS source, at, n FROM pg_temp.polled_now",
                "CAST(:tz AS text)",
            )
        ),
        {**params, "tz": timezone},
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
