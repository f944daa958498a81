"""Fold the capture into the rollup, outside the app's transactions.

The triggers append to the active one of two capture tables. A drain folds the inactive one,
switches the triggers to it, then folds the one they were writing to. Each fold runs with the
table locked (so every transaction that wrote to it has committed), and truncates it in the
same transaction: a drain killed midway folds nothing, a drain run twice counts nothing twice,
and the capture never bloats. One drain holds the schema's lock from its first fold to its last:
a second drain (or an install) waits for it to end.

Each fold reads in READ COMMITTED, whatever the engine's default: it must see every row of the
transactions its table lock waited for. A snapshot taken before the lock (REPEATABLE READ)
would not, and the TRUNCATE would drop those rows uncounted.

Sources no trigger captures (views, and every source in incremental mode) are polled by the same
drain, in its last transaction (`sources.poll`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import Connection, Engine, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.batch import tune_for_batch
from retention_pipeline.tracking.erasure import (
    erase_users,
    forget_captured_rows,
    stop_mass_erasure,
    users_gone_from_app,
)
from retention_pipeline.tracking.fold import Added, added_by, record_late_days
from retention_pipeline.tracking.sources import poll
from retention_pipeline.tracking.sql import CAPTURE_TABLES, TrackingSql
from retention_pipeline.tracking.state import (
    holding_lock,
    require_complete,
    tracking_sql,
)


@dataclass(frozen=True)
class RollupUpdate:
    """What one update of the rollup did."""

    events: int
    sessions: int
    user_days: int
    # Days that received rows after their snapshot was taken: re-materialize from the first.
    late_days: tuple[date, ...]
    # The sources polled (read from the app's tables) rather than captured by a trigger.
    polled_sources: tuple[str, ...]
    erased_users: int
    erased_send_keys: tuple[str, ...] = field(default=())
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return self.events + self.sessions


def _fold_capture(
    connection: Connection, sql: TrackingSql, slot: int, timezone: str, visit_gap_minutes: int
) -> Added:
    table = f"{sql.q_schema}.{CAPTURE_TABLES[slot]}"
    connection.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
    tune_for_batch(connection)
    added = added_by(
        connection.execute(
            text(
                sql.fold(
                    sql.capture_source(CAPTURE_TABLES[slot]),
                    "CAST(:tz AS text)",
                    visit_gap_minutes,
                )
            ),
            {"tz": timezone},
        )
    )
    # Rows a removed source left in the capture are folded, but counted for no source: a new
    # source of that name starts from its own rows.
    counted = f"SELECT source, at, 1 AS n FROM {table} WHERE source = ANY(CAST(:sources AS text[]))"
    connection.execute(
        text(sql.count_source_rows(counted, "CAST(:tz AS text)")),
        {"tz": timezone, "sources": [source.name for source in sql.sources]},
    )
    connection.execute(text(f"TRUNCATE {table}"))
    return added


def update_rollup(
    engine: Engine, config: RetentionConfig, *, all_at_once: bool = False
) -> RollupUpdate:
    """Bring the rollup up to date: drain the capture, poll the sources no trigger captures,
    and erase users deleted from the app or now excluded from it; where most of the users the
    pipeline knows are to be erased at once, stop instead (`MassErasure`), unless
    `all_at_once`."""
    started = time.monotonic()
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="READ COMMITTED")
        with holding_lock(connection, config.database.schema_):
            return _drain(connection, config, started, all_at_once)


def _drain(
    connection: Connection, config: RetentionConfig, started: float, all_at_once: bool
) -> RollupUpdate:
    timezone = config.timezone
    folds: list[Added] = []
    with connection.begin():
        sql = tracking_sql(connection, config)
        state = require_complete(connection, sql)
        # Left over from a drain that stopped after switching, or written by a transaction
        # that read the slot just before the switch.
        gap = state["visit_gap_minutes"]
        folds.append(_fold_capture(connection, sql, 1 - state["capture_slot"], timezone, gap))
        # Noted with the fold it comes from: a later transaction of this drain may not commit.
        late = set(record_late_days(connection, sql, set(folds[0].days)))
    with connection.begin():
        active = connection.execute(
            text(f"""
                UPDATE {sql.q_schema}.tracking_state SET capture_slot = 1 - capture_slot
                RETURNING capture_slot""")
        ).scalar_one()
        # Statements that start once this commits append to the other table.
        for source in sql.sources:
            if source.capture != "polling":
                for function in sql.capture_functions(source, active):
                    connection.execute(text(function))
    written = 1 - active
    polled = tuple(source for source in sql.sources if source.capture == "polling")
    with connection.begin():
        folds.append(_fold_capture(connection, sql, written, timezone, gap))
        for source in polled:
            folds.append(poll(connection, sql, source, timezone, gap))
        # The delete trigger sees deletes, and nothing sees an account becoming excluded (an
        # UPDATE the app makes): both are found by reading the users the pipeline knows.
        if config.database.tracking == "incremental" or config.database.tables.users.exclude:
            users_gone_from_app(connection, config)
        stop_mass_erasure(connection, sql, all_at_once=all_at_once)
        connection.execute(
            text(f"UPDATE {sql.q_schema}.tracking_state SET last_drained_at = now()")
        )
        erased, erased_keys = erase_users(connection, sql.schema)
        forget_captured_rows(connection, sql, erased, timezone)
        late.update(
            record_late_days(connection, sql, {day for fold in folds[1:] for day in fold.days})
        )
    return RollupUpdate(
        events=sum(fold.events for fold in folds),
        sessions=sum(fold.sessions for fold in folds),
        user_days=sum(fold.user_days for fold in folds),
        late_days=tuple(sorted(late)),
        polled_sources=tuple(source.name for source in polled),
        erased_users=len(erased),
        erased_send_keys=tuple(erased_keys),
        seconds=time.monotonic() - started,
    )
