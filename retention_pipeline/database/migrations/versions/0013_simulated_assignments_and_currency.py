"""Assignments nobody could email are marked simulated; the snapshot and the outcomes keep the
subscription's currency, so revenue is never summed across currencies.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"

# Written out, not imported: the send window of this revision, whatever the code says later.
SEND_WINDOW_DAYS = 3


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(
        f"ALTER TABLE {q}.reengagement_audience ADD COLUMN simulated boolean NOT NULL DEFAULT false"
    )
    # Days already built: a day older than the send window from which the loop emailed nobody
    # was a backfill (or a day whose send never ran), not an experiment.
    op.execute(f"""
        UPDATE {q}.reengagement_audience AS a SET simulated = true
        WHERE a.partition_date <= current_date - {SEND_WINDOW_DAYS}
          AND NOT EXISTS (SELECT FROM {q}.email_send_log AS sent
                          WHERE sent.loop_name = a.loop_name
                            AND sent.partition_date = a.partition_date)""")
    op.execute(f"""
        DELETE FROM {q}.reengagement_outcomes AS o USING {q}.reengagement_audience AS a
        WHERE a.simulated AND a.loop_name = o.loop_name AND a.partition_date = o.partition_date
          AND a.user_id = o.user_id""")
    op.execute(f"ALTER TABLE {q}.user_activity_snapshot ADD COLUMN subscription_currency text")
    op.execute(f"ALTER TABLE {q}.reengagement_outcomes ADD COLUMN revenue_currency text")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.reengagement_outcomes DROP COLUMN revenue_currency")
    op.execute(f"ALTER TABLE {q}.user_activity_snapshot DROP COLUMN subscription_currency")
    op.execute(f"ALTER TABLE {q}.reengagement_audience DROP COLUMN simulated")
