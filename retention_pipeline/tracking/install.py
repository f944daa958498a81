"""Install, rebuild, repair and remove what the pipeline adds to the app database, online.

`install` applies the migrations and swaps in the capture triggers in one short transaction
that gives up and retries rather than queue app inserts behind it for long. When the rollup has
to be built from the app tables (a first install, a new timezone, triggers after incremental),
it is rebuilt in day ranges committed one by one: an install stopped midway resumes where it
was, and the app's writes never wait on it.

Every rebuild or repair reads the app's rows less those still in the capture, in one statement:
a capture row commits with the app row it copies, so in any snapshot the difference is exactly
the rows the capture will never fold. The drain (which folds and truncates the capture) is kept
out while a rebuild is under way.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from typing import TypeVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from retention_pipeline.audience.days_rebuilt import record_emailed_days_as_rebuilt
from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database import migrate
from retention_pipeline.database.activity_sources import ResolvedSource
from retention_pipeline.database.reinstall import (
    keep_for_reinstall,
    lock_against_writes,
    restore_kept,
)
from retention_pipeline.sending.sender_lock import running_sender
from retention_pipeline.tracking.erasure import record_users_gone
from retention_pipeline.tracking.fold import Added, recompute_days, record_late_days
from retention_pipeline.tracking.sources import (
    InstalledSource,
    adopt_legacy_sources,
    drop_source_triggers,
    hand_over_to_triggers,
    installed_sources,
    source_differences,
    sync_sources,
    triggers_in_place,
)
from retention_pipeline.tracking.sql import TrackingSql, legacy_trigger_name, visit_count_sql
from retention_pipeline.tracking.state import (
    TrackingError,
    lock,
    locking_transaction,
    read_state,
    require_complete,
    tracking_sql,
)

# How long one attempt may queue app writes behind the trigger DDL, and how often to try.
BRIEF_LOCK_TIMEOUT = "200ms"
BRIEF_LOCK_ATTEMPTS = 60
REBUILD_CHUNK_ROWS = 2_000_000
LOCK_NOT_AVAILABLE = "55P03"
# What `db uninstall` keeps for the next install unless told to forget it, each table after
# those it refers to. Who unsubscribed, bounced or complained:
SUPPRESSION_TABLES = ("email_suppressions",)
# Who was picked (the audience of both arms, which steps each episode had, the frequency cap),
# under which experiment design (each episode's steps follow its period's), who was emailed, what
# Resend said of each email, and the decisions the audiences followed: a re-run of a day sends
# nobody twice, the links of emails already sent still unsubscribe, and a step paused as harmful
# stays paused.
SEND_HISTORY_TABLES = (
    "experiment_periods",
    "episodes",
    "reengagement_audience",
    "email_send_log",
    "email_events",
    "campaign_decisions",
)

Progress = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class InstallReport:
    revision: str
    mode: str
    timezone: str
    rebuilt_chunks: int
    rollup_rows: int
    first_data_day: date
    # What changed of each source, and what history each new one starts from: one line each.
    sources: tuple[str, ...] = ()


def with_brief_locks(engine: Engine, work: Callable[[Connection], T], what: str) -> T:
    """Run `work` in a transaction whose lock waits end after BRIEF_LOCK_TIMEOUT, retrying:
    DDL on an app table queues every later app write behind it while it waits, so it must
    never wait long. Gives up with one line after BRIEF_LOCK_ATTEMPTS."""
    for attempt in range(BRIEF_LOCK_ATTEMPTS):
        try:
            with locking_transaction(engine) as connection:
                return work(connection)
        except OperationalError as error:
            if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            time.sleep(min(2.0, 0.05 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.0))
    raise TrackingError(
        f"{what}: gave up after {BRIEF_LOCK_ATTEMPTS} tries to take a brief lock on the tables "
        "it changes (the app's, or the pipeline's own); a long-running transaction holds one "
        "(see pg_stat_activity)"
    )


def _brief_lock_timeout(connection: Connection) -> None:
    connection.execute(text(f"SET LOCAL lock_timeout = '{BRIEF_LOCK_TIMEOUT}'"))


def _has_trigger(connection: Connection, table: str, name: str) -> bool:
    return connection.execute(
        text(
            "SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :n)"
        ),
        {"t": table, "n": name},
    ).scalar_one()


def _history_a_rebuild_loses(
    sql: TrackingSql, installed: dict[str, InstalledSource], mode: str
) -> str | None:
    """What the rollup holds that a rebuild from the configured sources' tables would not give
    back, said as a source: one captured by `updates` or polled (their tables keep only the
    latest times), or one no longer configured (what it counted stays until a rebuild); None
    when a rebuild gives back everything."""
    configured = {source.name for source in sql.sources}
    for old in installed.values():
        if old.name not in configured:
            return f"source `{old.name}` (no longer configured)"
        if old.capture != "inserts":
            return f"source `{old.name}` (captured by `{old.capture}`)"
    if not installed and mode == "incremental":  # installed before sources were recorded
        return "the polled sources"
    return None


def install(
    engine: Engine,
    config: RetentionConfig,
    progress: Progress | None = None,
    *,
    rebuild_history: bool = False,
    second_install: bool = False,
) -> InstallReport:
    """Bring the pipeline's schema, triggers and rollup up to date with the configuration,
    without holding up the app's writes for more than a moment. Idempotent, and resumes a
    rebuild an earlier install left unfinished.

    A change of the loops' timezone rebuilds the rollup from the app's tables: refused, in one
    line, while a source holds history those tables no longer have (a time updated in place,
    a polled source), unless `rebuild_history` accepts losing it.

    A first install is refused while another schema of the database holds the pipeline's
    install (or what `db uninstall` kept of one): a new schema would not read its suppressions
    or send log, so everyone who unsubscribed there would be emailed. `second_install` installs
    beside it on purpose."""
    schema, mode, timezone = config.database.schema_, config.database.tracking, config.timezone
    notes: list[str] = []

    def set_up(connection: Connection) -> None:
        sql = tracking_sql(connection, config)
        lock(connection, schema)
        _brief_lock_timeout(connection)
        other = None if second_install else migrate.other_install(connection, schema)
        if other and migrate.current_revision(connection, schema) is None:
            raise TrackingError(
                f"db upgrade: database.schema is {schema!r}, but the pipeline's install in "
                f"this database is in {other}, whose unsubscribes and send log a new "
                f"install would not read: {migrate.MOVE_HINT}; or install a second pipeline "
                "beside it with `retention-pipeline db upgrade --second-install`"
            )
        migrate.upgrade(connection, schema)
        restored = restore_kept(connection, schema, (*SUPPRESSION_TABLES, *SEND_HISTORY_TABLES))
        if restored:
            _record_users_gone_while_uninstalled(connection, config)
        if "email_send_log" in restored:
            # Any day of the restored log may have been built again before it was kept.
            record_emailed_days_as_rebuilt(connection, schema)
        state = read_state(connection, sql)
        installed = installed_sources(connection, sql)
        # Day buckets depend on the timezone: rebuild everything when it changes.
        rebuild = state is None or state["timezone"] != timezone
        if state is not None and rebuild and not rebuild_history:
            lost = _history_a_rebuild_loses(sql, installed, state["mode"])
            if lost:
                raise TrackingError(
                    f"db upgrade: the loops' timezone is now {timezone}, the rollup counts days "
                    f"in {state['timezone']}: rebuilding it from your tables loses what {lost} "
                    "counted, which they no longer hold; set the timezone back, or accept the "
                    "loss with `retention-pipeline db upgrade --rebuild-history`"
                )
        connection.execute(
            text(f"""
                INSERT INTO {sql.q_schema}.tracking_state (timezone, mode) VALUES (:tz, :mode)
                ON CONFLICT (singleton) DO UPDATE SET timezone = :tz, mode = :mode"""),
            {"tz": timezone, "mode": mode},
        )
        if rebuild:
            for name, old in installed.items():
                drop_source_triggers(connection, sql, name, old.relation)
            connection.execute(
                text(
                    f"TRUNCATE {sql.q_schema}.activity_daily, {sql.q_schema}.action_daily, "
                    f"{sql.q_schema}.tracking_sources, {sql.q_schema}.polled_rows, "
                    f"{sql.q_schema}.source_day_rows"
                )
            )
            connection.execute(text(f"DELETE FROM {sql.q_schema}.rebuild_chunks"))
            # Every day of the rollup changes: the next snapshot is built in full.
            connection.execute(text(f"DELETE FROM {sql.q_schema}.snapshot_builds"))
            connection.execute(
                text(f"UPDATE {sql.q_schema}.tracking_state SET rebuild_into_empty = true")
            )
            installed = {}
        elif not installed:
            # Installed before revision 0015, when events and sessions were the only sources.
            adopt_legacy_sources(connection, sql, state["mode"], state["refreshed_through"])
            installed = installed_sources(connection, sql)
        changes, to_triggers = sync_sources(
            connection, sql, installed, timezone, state["visit_gap_minutes"] if state else 0
        )
        notes.extend(changes)
        connection.execute(
            text(f"""
                UPDATE {sql.q_schema}.tracking_state SET rebuild_pending = true
                WHERE EXISTS (SELECT FROM {sql.q_schema}.tracking_sources
                              WHERE backfill_pending)""")
        )
        installed_state = read_state(connection, sql)
        slot = installed_state["capture_slot"]
        for source in sql.sources:
            relation = source.relation_sql(sql.dialect)
            old = installed.get(source.name)
            # A source installed as configured keeps its triggers: replacing them would take a
            # lock on the app's table, and only its owner may drop one (`check` says so).
            keep = (
                source.capture != "polling"
                and old is not None
                and not source_differences(sql, source, old)
                and triggers_in_place(connection, sql, source)
            )
            if not keep:
                drop_source_triggers(connection, sql, source.name, relation)
            if source.capture == "polling":
                continue
            for function in sql.capture_functions(source, slot):
                connection.execute(text(function))
            if not keep:
                for trigger in sql.create_triggers(source):
                    connection.execute(text(trigger))
        hand_over_to_triggers(
            connection, sql, to_triggers, timezone, installed_state["visit_gap_minutes"]
        )
        connection.execute(text(sql.erasure_function()))
        users = sql.table_name(sql.users)
        present = _has_trigger(connection, users, legacy_trigger_name(schema))
        if mode == "triggers" and not present:
            connection.execute(text(sql.create_erasure_trigger()))
        elif mode == "incremental" and present:
            trigger = sql.quote(legacy_trigger_name(schema))
            connection.execute(text(f"DROP TRIGGER {trigger} ON {users}"))

    with_brief_locks(engine, set_up, "db upgrade")
    set_visit_gap(engine, config, progress)
    chunks, histories = finish_rebuild(engine, config, progress)
    with engine.begin() as connection:
        s = connection.dialect.identifier_preparer.quote_schema(schema)
        rows = connection.execute(text(f"SELECT count(*) FROM {s}.activity_daily")).scalar_one()
        # Kept from the first install on: the partitions must not move when history is erased.
        first_data_day = connection.execute(
            text(f"""
                UPDATE {s}.tracking_state SET first_data_day = coalesce(
                    first_data_day,
                    (SELECT min(day) FROM {s}.activity_daily),
                    CAST(now() AT TIME ZONE :tz AS date))
                RETURNING first_data_day"""),
            {"tz": timezone},
        ).scalar_one()
    return InstallReport(
        revision=migrate.head_revision(),
        mode=mode,
        timezone=timezone,
        rebuilt_chunks=chunks,
        rollup_rows=int(rows),
        first_data_day=first_data_day,
        sources=(*notes, *histories),
    )


def set_visit_gap(
    engine: Engine, config: RetentionConfig, progress: Progress | None = None
) -> None:
    """Install the configured `activity.visit_gap`: every day's visits are recounted from its
    slots in the same transaction, so no fold ever counts with a gap the rollup was not
    counted with, and no rebuild is needed."""
    gap = config.activity.visit_gap_minutes
    with locking_transaction(engine) as connection:
        s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
        lock(connection, config.database.schema_)
        installed = connection.execute(
            text(f"SELECT visit_gap_minutes FROM {s}.tracking_state")
        ).scalar_one()
        if installed == gap:
            return
        visits = visit_count_sql("active_slots", gap)
        recounted = connection.execute(
            text(f"""
                UPDATE {s}.activity_daily SET visit_count = {visits}
                WHERE visit_count <> {visits}""")
        ).rowcount
        connection.execute(
            text(f"UPDATE {s}.tracking_state SET visit_gap_minutes = :gap"), {"gap": gap}
        )
        # Snapshots that counted visits cannot be rolled forward into a day counted otherwise.
        connection.execute(text(f"DELETE FROM {s}.snapshot_builds WHERE counted = 'visits'"))
    if progress:
        progress(
            f"activity.visit_gap {installed}m -> {gap}m: visits recounted on {recounted:,} "
            "user-days"
        )


@dataclass(frozen=True)
class Chunk:
    number: int
    first_day: date | None
    end_day: date | None
    planned_rows: int

    def describe(self) -> str:
        first = self.first_day.isoformat() if self.first_day else "the beginning"
        end = self.end_day.isoformat() if self.end_day else "now"
        return f"{first} to {end}"


def _plan(
    connection: Connection, sql: TrackingSql, timezone: str, sources: tuple[ResolvedSource, ...]
) -> tuple[list[Chunk], dict[str, tuple[int, date | None]]]:
    """Cut the history of `sources` into consecutive day ranges of about REBUILD_CHUNK_ROWS
    rows; the first and last ranges are open, so rows outside every planned day still belong to
    one. Also returns each source's rows and first day."""
    per_day: dict[date, int] = {}
    per_source: dict[str, tuple[int, date | None]] = {}
    for source in sources:
        histogram = dict(
            connection.execute(
                text(sql.day_histogram(source, "CAST(:tz AS text)")), {"tz": timezone}
            ).all()
        )
        for day, rows in histogram.items():
            per_day[day] = per_day.get(day, 0) + rows
        per_source[source.name] = (sum(histogram.values()), min(histogram, default=None))
    chunks: list[Chunk] = []
    first: date | None = None
    rows_in_chunk = 0
    for day in sorted(per_day):
        if rows_in_chunk >= REBUILD_CHUNK_ROWS:
            chunks.append(Chunk(len(chunks) + 1, first, day, rows_in_chunk))
            first, rows_in_chunk = day, 0
        rows_in_chunk += per_day[day]
    chunks.append(Chunk(len(chunks) + 1, first, None, rows_in_chunk))
    return chunks, per_source


def _history(source: ResolvedSource, rows: int) -> str:
    """What history a source newly counted starts from."""
    where = source.spec.source.qualified_name
    if source.capture == "updates":
        return (
            f"source `{source.name}`: history of `{source.spec.source.at}` starts at install: "
            f"it is a last-seen column ({rows:,} current values of {where} counted)"
        )
    if source.capture == "polling":
        return (
            f"source `{source.name}`: rebuilt from its {rows:,} rows of {where}; each drain "
            "polls it from then on"
        )
    return f"source `{source.name}`: rebuilt from its {rows:,} rows of {where}"


def finish_rebuild(
    engine: Engine, config: RetentionConfig, progress: Progress | None = None
) -> tuple[int, list[str]]:
    """Rebuild the rollup's pending day ranges from the sources pending a backfill, one
    committed transaction each; returns how many ranges this call rebuilt, and what history
    each backfilled source starts from."""
    schema, timezone = config.database.schema_, config.timezone
    with locking_transaction(engine) as connection:
        sql = tracking_sql(connection, config)
        lock(connection, schema)
        state = read_state(connection, sql)
        if not state or not state["rebuild_pending"]:
            return 0, []
        pending_names = set(
            connection.execute(
                text(f"SELECT name FROM {sql.q_schema}.tracking_sources WHERE backfill_pending")
            ).scalars()
        )
        pending = tuple(source for source in sql.sources if source.name in pending_names)
        into_empty = state["rebuild_into_empty"]
        chunks = _stored_chunks(connection, sql)
        if not chunks:
            chunks, per_source = _plan(connection, sql, timezone, pending)
            for chunk in chunks:
                connection.execute(
                    text(f"""
                        INSERT INTO {sql.q_schema}.rebuild_chunks
                            (number, first_day, end_day, planned_rows)
                        VALUES (:number, :first_day, :end_day, :planned_rows)"""),
                    asdict(chunk),
                )
            for source in pending:
                rows, first_day = per_source[source.name]
                connection.execute(
                    text(f"""
                        UPDATE {sql.q_schema}.tracking_sources
                        SET history = :history,
                            first_day = CASE WHEN capture = 'updates'
                                             THEN CAST(now() AT TIME ZONE :tz AS date)
                                             ELSE CAST(:first_day AS date) END
                        WHERE name = :name"""),
                    {
                        "history": _history(source, rows),
                        "tz": timezone,
                        "first_day": first_day,
                        "name": source.name,
                    },
                )
    rebuilt = 0
    for chunk in chunks:
        started = time.monotonic()
        with locking_transaction(engine) as connection:
            lock(connection, schema)
            done = connection.execute(
                text(
                    f"SELECT done_at IS NOT NULL FROM {sql.q_schema}.rebuild_chunks "
                    "WHERE number = :n"
                ),
                {"n": chunk.number},
            ).scalar()
            if done:
                continue
            added = recompute_days(
                connection,
                sql,
                timezone,
                chunk.first_day,
                chunk.end_day,
                state["visit_gap_minutes"],
                sources=pending,
                into_emptied_days=into_empty,
            )
            if not into_empty:
                # Added to days a snapshot may have been built from without these sources: it
                # must not be rolled forward.
                record_late_days(connection, sql, set(added.days))
            connection.execute(
                text(f"UPDATE {sql.q_schema}.rebuild_chunks SET done_at = now() WHERE number = :n"),
                {"n": chunk.number},
            )
        rebuilt += 1
        if progress:
            progress(
                f"rollup rebuild {chunk.number}/{len(chunks)}: {chunk.describe()}: "
                f"{added.events:,} events, {added.sessions:,} sessions "
                f"({time.monotonic() - started:.1f}s)"
            )
    with locking_transaction(engine) as connection:
        lock(connection, schema)
        connection.execute(
            text(
                f"UPDATE {sql.q_schema}.tracking_state "
                "SET rebuild_pending = false, rebuild_into_empty = false"
            )
        )
        connection.execute(text(f"DELETE FROM {sql.q_schema}.rebuild_chunks"))
        histories = dict(
            connection.execute(
                text(f"""
                    UPDATE {sql.q_schema}.tracking_sources SET backfill_pending = false
                    WHERE backfill_pending RETURNING name, history""")
            ).all()
        )
        return rebuilt, [
            histories[source.name] for source in sql.sources if histories.get(source.name)
        ]


def _stored_chunks(connection: Connection, sql: TrackingSql) -> list[Chunk]:
    rows = connection.execute(
        text(
            f"SELECT number, first_day, end_day, planned_rows FROM {sql.q_schema}.rebuild_chunks "
            "ORDER BY number"
        )
    ).all()
    return [Chunk(*row) for row in rows]


def refresh_from(engine: Engine, config: RetentionConfig, since: date) -> Added:
    """Recompute the rollup's days from `since` on from the app tables: a repair. Takes no
    lock on the app's tables; the capture keeps what arrives meanwhile. Refused while a source
    holds history the app tables no longer have (a time updated in place, a polled source)."""
    with locking_transaction(engine) as connection:
        sql = tracking_sql(connection, config)
        lock(connection, sql.schema)
        state = require_complete(connection, sql)
        for source in sql.sources:
            if source.capture != "inserts":
                raise TrackingError(
                    f"db refresh --since: source `{source.name}` is captured by "
                    f"`{source.capture}`: what it counted of these days is no longer all in "
                    f"{source.spec.source.qualified_name}, and a repair would wipe it"
                )
        added = recompute_days(
            connection,
            sql,
            config.timezone,
            since,
            None,
            state["visit_gap_minutes"],
            sources=sql.sources,
            clear=True,
        )
        record_late_days(connection, sql, set(added.days))
        return added


def _record_users_gone_while_uninstalled(connection: Connection, config: RetentionConfig) -> None:
    """Users of the restored history that the app deleted while no trigger watched (or before
    a drain erased them): recorded for the next drain to erase, as the trigger would have."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    record_users_gone(
        connection,
        config,
        f"""SELECT user_id FROM {s}.email_send_log
            UNION SELECT user_id FROM {s}.episodes
            UNION SELECT user_id FROM {s}.reengagement_audience
            UNION SELECT user_id FROM {s}.email_suppressions WHERE user_id IS NOT NULL""",
        probe_key=False,
    )


def is_installed(engine: Engine, config: RetentionConfig) -> bool:
    """Whether the pipeline's schema, or a tracking trigger of it on any table, is in the
    database (a schema an uninstall left holding kept rows counts)."""
    with engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = :schema) "
                "OR EXISTS (SELECT FROM pg_trigger WHERE NOT tgisinternal "
                "           AND (tgname = :trigger OR starts_with(tgname, :prefix)))"
            ),
            {
                "schema": config.database.schema_,
                "trigger": legacy_trigger_name(config.database.schema_),
                "prefix": f"{config.database.schema_}_track_",
            },
        ).scalar_one()


def uninstall(
    engine: Engine,
    config: RetentionConfig,
    *,
    forget_suppressions: bool = False,
    forget_send_history: bool = False,
) -> dict[str, int]:
    """Remove the triggers from the app tables and drop the pipeline's schema.

    Unless told to forget them, the suppression list and the send history stay behind, alone in
    the schema, for the next install to restore: whoever unsubscribed is not emailed after a
    reinstall, and whoever was emailed is not emailed again. Returns how many rows stayed, per
    table.
    """
    schema = config.database.schema_
    tables = (
        *(() if forget_suppressions else SUPPRESSION_TABLES),
        *(() if forget_send_history else SEND_HISTORY_TABLES),
    )

    def refuse_while_sending(connection: Connection, changed: str) -> None:
        """What a send run sends while the schema goes could not be recorded."""
        sender = running_sender(
            connection,
            schema=schema,
            loop_names=config.loop_names,
            shards=config.email.send_shards,
        )
        if sender:
            raise TrackingError(
                f"db uninstall: a send run is sending ({sender}); {changed}: run it again once "
                "the send runs are done"
            )

    def remove_triggers(connection: Connection) -> None:
        """Every trigger calling a function of the schema: each source's, and the erasure's."""
        lock(connection, schema)
        refuse_while_sending(connection, "nothing was changed")
        _brief_lock_timeout(connection)
        preparer = connection.dialect.identifier_preparer
        triggers = connection.execute(
            text("""
                SELECT t.tgname, format('%I.%I', table_schema.nspname, c.relname)
                FROM pg_catalog.pg_trigger AS t
                JOIN pg_catalog.pg_proc AS p ON p.oid = t.tgfoid
                JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
                JOIN pg_catalog.pg_class AS c ON c.oid = t.tgrelid
                JOIN pg_catalog.pg_namespace AS table_schema ON table_schema.oid = c.relnamespace
                WHERE n.nspname = :schema AND NOT t.tgisinternal
                ORDER BY t.tgname <> :erasure, t.tgname"""),
            {"schema": schema, "erasure": legacy_trigger_name(schema)},
        ).all()
        for name, table in triggers:
            connection.execute(text(f"DROP TRIGGER IF EXISTS {preparer.quote(name)} ON {table}"))

    def drop_schema(connection: Connection) -> dict[str, int]:
        lock(connection, schema)
        _brief_lock_timeout(connection)  # in case a trigger of an unmapped table depends on it
        lock_against_writes(connection, schema, tables)
        # Again, under the lock: a sender that started since the first look may have sent what
        # it claimed, and its outcomes could not be recorded.
        refuse_while_sending(connection, "the triggers are gone, the schema is still there")
        return keep_for_reinstall(connection, schema, tables)

    with_brief_locks(engine, remove_triggers, "db uninstall")
    # Apart: copying the send history takes a while, and the app's writes must not wait on it.
    return with_brief_locks(engine, drop_schema, "db uninstall")
