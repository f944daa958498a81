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

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database import migrate
from retention_pipeline.database.app_tables import table_sql
from retention_pipeline.database.reinstall import keep_for_reinstall, restore_kept
from retention_pipeline.tracking.erasure import record_users_gone
from retention_pipeline.tracking.fold import Added, recompute_days, record_late_days
from retention_pipeline.tracking.sql import (
    TRACKED_KINDS,
    TrackingSql,
    trigger_name,
    visit_count_sql,
)
from retention_pipeline.tracking.state import (
    TrackingError,
    lock,
    read_state,
    require_complete,
    tracking_sql,
)

# Triggers on users record deletions (erasure); on events and sessions they capture activity.
TRIGGER_KINDS = (*TRACKED_KINDS, "users")
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


def with_brief_locks(engine: Engine, work: Callable[[Connection], T], what: str) -> T:
    """Run `work` in a transaction whose lock waits end after BRIEF_LOCK_TIMEOUT, retrying:
    DDL on an app table queues every later app write behind it while it waits, so it must
    never wait long. Gives up with one line after BRIEF_LOCK_ATTEMPTS."""
    for attempt in range(BRIEF_LOCK_ATTEMPTS):
        try:
            with engine.begin() as connection:
                return work(connection)
        except OperationalError as error:
            if getattr(error.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            time.sleep(min(2.0, 0.05 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.0))
    raise TrackingError(
        f"{what}: gave up after {BRIEF_LOCK_ATTEMPTS} tries to take a brief lock on the app "
        "tables; a long-running transaction holds one (see pg_stat_activity)"
    )


def _brief_lock_timeout(connection: Connection) -> None:
    connection.execute(text(f"SET LOCAL lock_timeout = '{BRIEF_LOCK_TIMEOUT}'"))


def _has_trigger(connection: Connection, sql: TrackingSql, kind: str) -> bool:
    return connection.execute(
        text(
            "SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname = :n)"
        ),
        {"t": sql.table_name(sql.tracked_table(kind)), "n": trigger_name(sql.schema)},
    ).scalar_one()


def install(
    engine: Engine, config: RetentionConfig, progress: Progress | None = None
) -> InstallReport:
    """Bring the pipeline's schema, triggers and rollup up to date with the configuration,
    without holding up the app's writes for more than a moment. Idempotent, and resumes a
    rebuild an earlier install left unfinished."""
    schema, mode, timezone = config.database.schema_, config.database.tracking, config.timezone

    def set_up(connection: Connection) -> None:
        sql = tracking_sql(connection, config)
        lock(connection, schema)
        _brief_lock_timeout(connection)
        migrate.upgrade(connection, schema)
        if restore_kept(connection, schema, (*SUPPRESSION_TABLES, *SEND_HISTORY_TABLES)):
            _record_users_gone_while_uninstalled(connection, config)
        state = read_state(connection, sql)
        # Day buckets depend on the timezone, and triggers only capture rows inserted after
        # they exist: rebuild whenever the rollup may miss rows or be bucketed differently.
        rebuild = (
            state is None or state["timezone"] != timezone or (state["mode"] != mode == "triggers")
        )
        connection.execute(
            text(f"""
                INSERT INTO {sql.q_schema}.tracking_state (timezone, mode) VALUES (:tz, :mode)
                ON CONFLICT (singleton) DO UPDATE SET timezone = :tz, mode = :mode"""),
            {"tz": timezone, "mode": mode},
        )
        if rebuild:
            connection.execute(
                text(f"TRUNCATE {sql.q_schema}.activity_daily, {sql.q_schema}.action_daily")
            )
            connection.execute(text(f"DELETE FROM {sql.q_schema}.rebuild_chunks"))
            # Every day of the rollup changes: the next snapshot is built in full.
            connection.execute(text(f"DELETE FROM {sql.q_schema}.snapshot_builds"))
            connection.execute(
                text(f"UPDATE {sql.q_schema}.tracking_state SET rebuild_pending = true")
            )
        elif state is not None and state["mode"] == "triggers" and mode == "incremental":
            # Complete up to now: the next incremental refresh starts from the day before.
            connection.execute(
                text(f"UPDATE {sql.q_schema}.tracking_state SET refreshed_through = now()")
            )
        slot = read_state(connection, sql)["capture_slot"]
        for kind in TRACKED_KINDS:
            connection.execute(text(sql.capture_function(kind, slot)))
        connection.execute(text(sql.erasure_function()))
        for kind in TRIGGER_KINDS:
            present = _has_trigger(connection, sql, kind)
            if mode == "triggers" and not present:
                connection.execute(text(sql.create_trigger(kind)))
            elif mode == "incremental" and present:
                connection.execute(text(sql.drop_trigger(kind)))

    with_brief_locks(engine, set_up, "db upgrade")
    set_visit_gap(engine, config, progress)
    chunks = finish_rebuild(engine, config, progress)
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
    )


def set_visit_gap(
    engine: Engine, config: RetentionConfig, progress: Progress | None = None
) -> None:
    """Install the configured `activity.visit_gap`: every day's visits are recounted from its
    slots in the same transaction, so no fold ever counts with a gap the rollup was not
    counted with, and no rebuild is needed."""
    gap = config.activity.visit_gap_minutes
    with engine.begin() as connection:
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


def _plan(connection: Connection, sql: TrackingSql, timezone: str) -> list[Chunk]:
    """Cut the app's history into consecutive day ranges of about REBUILD_CHUNK_ROWS rows; the
    first and last ranges are open, so rows outside every planned day still belong to one."""
    per_day: dict[date, int] = {}
    for kind in TRACKED_KINDS:
        for day, rows in connection.execute(
            text(sql.day_histogram(kind, "CAST(:tz AS text)")), {"tz": timezone}
        ):
            per_day[day] = per_day.get(day, 0) + rows
    chunks: list[Chunk] = []
    first: date | None = None
    rows_in_chunk = 0
    for day in sorted(per_day):
        if rows_in_chunk >= REBUILD_CHUNK_ROWS:
            chunks.append(Chunk(len(chunks) + 1, first, day, rows_in_chunk))
            first, rows_in_chunk = day, 0
        rows_in_chunk += per_day[day]
    chunks.append(Chunk(len(chunks) + 1, first, None, rows_in_chunk))
    return chunks


def finish_rebuild(
    engine: Engine, config: RetentionConfig, progress: Progress | None = None
) -> int:
    """Rebuild the rollup's pending day ranges, one committed transaction each; returns how
    many ranges this call rebuilt."""
    schema, timezone = config.database.schema_, config.timezone
    with engine.begin() as connection:
        sql = tracking_sql(connection, config)
        lock(connection, schema)
        state = read_state(connection, sql)
        if not state or not state["rebuild_pending"]:
            return 0
        chunks = _stored_chunks(connection, sql)
        if not chunks:
            chunks = _plan(connection, sql, timezone)
            for chunk in chunks:
                connection.execute(
                    text(f"""
                        INSERT INTO {sql.q_schema}.rebuild_chunks
                            (number, first_day, end_day, planned_rows)
                        VALUES (:number, :first_day, :end_day, :planned_rows)"""),
                    asdict(chunk),
                )
            connection.execute(
                text(f"UPDATE {sql.q_schema}.tracking_state SET refreshed_through = now()")
            )
    rebuilt = 0
    for chunk in chunks:
        started = time.monotonic()
        with engine.begin() as connection:
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
            )
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
    with engine.begin() as connection:
        lock(connection, schema)
        connection.execute(
            text(f"UPDATE {sql.q_schema}.tracking_state SET rebuild_pending = false")
        )
        connection.execute(text(f"DELETE FROM {sql.q_schema}.rebuild_chunks"))
    return rebuilt


def _stored_chunks(connection: Connection, sql: TrackingSql) -> list[Chunk]:
    rows = connection.execute(
        text(
            f"SELECT number, first_day, end_day, planned_rows FROM {sql.q_schema}.rebuild_chunks "
            "ORDER BY number"
        )
    ).all()
    return [Chunk(*row) for row in rows]


def refresh_from(engine: Engine, config: RetentionConfig, since: date) -> Added:
    """Recompute the rollup's days from `since` on from the app tables, in either mode: a
    repair. Takes no lock on the app's tables; the capture keeps what arrives meanwhile."""
    with engine.begin() as connection:
        sql = tracking_sql(connection, config)
        lock(connection, sql.schema)
        state = require_complete(connection, sql)
        added = recompute_days(
            connection, sql, config.timezone, since, None, state["visit_gap_minutes"], clear=True
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
    )


def is_installed(engine: Engine, config: RetentionConfig) -> bool:
    """Whether the pipeline's schema, or a tracking trigger of it on any table, is in the
    database (a schema an uninstall left holding kept rows counts)."""
    with engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = :schema) "
                "OR EXISTS (SELECT FROM pg_trigger WHERE tgname = :trigger AND NOT tgisinternal)"
            ),
            {"schema": config.database.schema_, "trigger": trigger_name(config.database.schema_)},
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

    def remove_triggers(connection: Connection) -> None:
        lock(connection, schema)
        _brief_lock_timeout(connection)
        preparer = connection.dialect.identifier_preparer
        trigger = preparer.quote(trigger_name(schema))
        for _name, mapping in config.database.tables.items():
            table = table_sql(mapping, preparer)
            exists = connection.execute(
                text("SELECT to_regclass(:name) IS NOT NULL"), {"name": table}
            ).scalar()
            if exists:
                connection.execute(text(f"DROP TRIGGER IF EXISTS {trigger} ON {table}"))

    def drop_schema(connection: Connection) -> dict[str, int]:
        lock(connection, schema)
        _brief_lock_timeout(connection)  # in case a trigger of an unmapped table depends on it
        return keep_for_reinstall(connection, schema, tables)

    with_brief_locks(engine, remove_triggers, "db uninstall")
    # Apart: copying the send history takes a while, and the app's writes must not wait on it.
    return with_brief_locks(engine, drop_schema, "db uninstall")
