"""What a snapshot needs to roll the day before's forward: the raw baseline session count, the
configuration and time each day's snapshot was built with, rollup days that changed after their
snapshot, and an index to read one day of actions.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # Snapshots built before this revision have none: the next day is then built in full.
    op.execute(f"ALTER TABLE {q}.user_activity_snapshot ADD COLUMN baseline_sessions integer")
    op.execute(f"CREATE INDEX action_daily_day ON {q}.action_daily (day)")
    op.execute(f"""
        CREATE TABLE {q}.snapshot_builds (
            partition_date date PRIMARY KEY,
            built_at timestamptz NOT NULL,
            path text NOT NULL CHECK (path IN ('full', 'incremental')),
            timezone text NOT NULL,
            baseline_weeks integer NOT NULL,
            last_actions integer NOT NULL
        )""")
    op.execute(f"""
        CREATE TABLE {q}.late_activity (
            day date PRIMARY KEY,
            noticed_at timestamptz NOT NULL
        )""")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP TABLE {q}.late_activity")
    op.execute(f"DROP TABLE {q}.snapshot_builds")
    op.execute(f"DROP INDEX {q}.action_daily_day")
    op.execute(f"ALTER TABLE {q}.user_activity_snapshot DROP COLUMN baseline_sessions")
