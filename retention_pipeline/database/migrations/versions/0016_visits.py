"""Visits: the 5-minute slots of each user-day with any activity, the visits they make, the gap
that separates two visits, and what each snapshot counted (visits or logins).

A rollup row of an earlier revision kept only its latest event and latest session: those give
its slots (one, or two when both are set), so its visits are at least 1 and at most 2, fewer
than the day may have had. `retention-pipeline db refresh --since DAY` counts the visits of the
days the app tables still hold in full.

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"

# 300 slots of 5 minutes: a 25-hour day (daylight saving ends) has 300, any other day fewer.
SLOTS = 300
SLOT_SECONDS = 300
# The gap of a new installation (`activity.visit_gap`'s default); `db upgrade` then installs the
# configured one and recounts.
DEFAULT_GAP_MINUTES = 30


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"""
        ALTER TABLE {q}.tracking_state
            ADD COLUMN visit_gap_minutes integer NOT NULL DEFAULT {DEFAULT_GAP_MINUTES}
                CHECK (visit_gap_minutes BETWEEN 5 AND 240 AND visit_gap_minutes % 5 = 0)""")
    op.execute(f"""
        ALTER TABLE {q}.activity_daily
            ADD COLUMN active_slots bit({SLOTS}) NOT NULL DEFAULT CAST(B'0' AS bit({SLOTS})),
            ADD COLUMN visit_count integer NOT NULL DEFAULT 0""")
    # The slot of a time: whole 5-minute steps since the start of its day in the timezone
    # (NULL for no time: `least` would take its other argument).
    slot = (
        "CASE WHEN {at} IS NOT NULL THEN least({slots} - 1, floor(extract(epoch FROM {at} - "
        "(d.day::timestamp AT TIME ZONE state.timezone)) / {seconds})::integer) END"
    )
    event_slot = slot.format(slots=SLOTS, at="d.last_event_at", seconds=SLOT_SECONDS)
    session_slot = slot.format(slots=SLOTS, at="d.last_session_at", seconds=SLOT_SECONDS)
    gap_slots = DEFAULT_GAP_MINUTES * 60 // SLOT_SECONDS
    op.execute(f"""
        UPDATE {q}.activity_daily AS d
        SET active_slots = coalesce(CAST(B'1' AS bit({SLOTS})) >> ({event_slot}),
                                    CAST(B'0' AS bit({SLOTS})))
                         | coalesce(CAST(B'1' AS bit({SLOTS})) >> ({session_slot}),
                                    CAST(B'0' AS bit({SLOTS}))),
            visit_count = CASE
                WHEN abs(({event_slot}) - ({session_slot})) > {gap_slots} THEN 2
                ELSE 1
            END
        FROM {q}.tracking_state AS state""")
    # Snapshots built before counted logins.
    op.execute(f"""
        ALTER TABLE {q}.snapshot_builds
            ADD COLUMN counted text NOT NULL DEFAULT 'logins'
                CHECK (counted IN ('logins', 'visits'))""")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.snapshot_builds DROP COLUMN counted")
    op.execute(f"ALTER TABLE {q}.activity_daily DROP COLUMN active_slots, DROP COLUMN visit_count")
    op.execute(f"ALTER TABLE {q}.tracking_state DROP COLUMN visit_gap_minutes")
