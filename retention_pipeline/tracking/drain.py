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

In incremental mode no trigger writes the capture; the same fold recomputes recent days from
the app tables instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import Connection, Engine, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.batch import tune_for_batch
from retention_pipeline.tracking.erasure import erase_users, users_gone_from_app
from retention_pipeline.tracking.fold import (
    Added,
    added_by,
    recompute_days,
    record_late_days,
)
from retention_pipeline.tracking.sql import CAPTURE_TABLES, TRACKED_KINDS, TrackingSql
from retention_pipeline.tracking.state import (
    holding_lock,
    read_state,
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
    recomputed_from: date | None
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
    connection.execute(text(f"TRUNCATE {table}"))
    return added


def update_rollup(engine: Engine, config: RetentionConfig) -> RollupUpdate:
    """Bring the rollup up to date: drain the capture, recompute recent days in incremental
    mode, and erase users deleted from the app."""
    started = time.monotonic()
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="READ COMMITTED")
        with holding_lock(connection, config.database.schema_):
            return _drain(connection, config, started)


def _drain(connection: Connection, config: RetentionConfig, started: float) -> RollupUpdate:
    timezone = config.timezone
    folds: list[Added] = []
    with connection.begin():
        sql = tracking_sql(connection, config)
        state = require_complete(connection, sql)
        # Left over from a drain that stopped after switching, or written by a transaction
        # that read the slot just before the switch.
        gap = state["visit_gap_minutes"]
        folds.append(_fold_capture(connection, sql, 1 - state["capture_slot"], timezone, gap))
    with connection.begin():
        active = connection.execute(
            text(f"""
                UPDATE {sql.q_schema}.tracking_state SET capture_slot = 1 - capture_slot
                RETURNING capture_slot""")
        ).scalar_one()
        # Statements that start once this commits append to the other table.
        for kind in TRACKED_KINDS:
            connection.execute(text(sql.capture_function(kind, active)))
    written = 1 - active
    recomputed_from = None
    with connection.begin():
        state = read_state(connection, sql)
        folds.append(_fold_capture(connection, sql, written, timezone, gap))
        if config.database.tracking == "incremental":
            recomputed_from = _day_before(connection, state["refreshed_through"], timezone)
            folds.append(
                recompute_days(connection, sql, timezone, recomputed_from, None, gap, clear=True)
            )
            users_gone_from_app(connection, config)
        connection.execute(
            text(f"""
                UPDATE {sql.q_schema}.tracking_state
                SET last_drained_at = now(),
                    refreshed_through = CASE WHEN mode = 'incremental' THEN now()
                                             ELSE refreshed_through END""")
        )
        erased_users, erased_keys = erase_users(connection, sql.schema)
        late = record_late_days(connection, sql, {day for fold in folds for day in fold.days})
    return RollupUpdate(
        events=sum(fold.events for fold in folds),
        sessions=sum(fold.sessions for fold in folds),
        user_days=sum(fold.user_days for fold in folds),
        late_days=() if recomputed_from else late,
        recomputed_from=recomputed_from,
        erased_users=erased_users,
        erased_send_keys=tuple(erased_keys),
        seconds=time.monotonic() - started,
    )


def _day_before(connection: Connection, moment, timezone: str) -> date | None:
    if moment is None:
        return None
    return connection.execute(
        text("SELECT (CAST(:moment AS timestamptz) AT TIME ZONE :tz)::date - 1"),
        {"moment": moment, "tz": timezone},
    ).scalar_one()
