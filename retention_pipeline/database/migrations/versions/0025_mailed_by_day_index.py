"""The emails claimed or sent, found by their day: what the frequency cap counts.

The cap read the audience rows of its days alone. A rebuild of a day takes back the audience
rows of users dropped since the emails went out (unsubscribed from that loop, say), and the cap
stopped seeing those emails: another loop could email the same person that day. The audience now
also reads the send log's claimed and sent emails of the cap's days, through this index of
those rows alone.

Revision ID: 0025
Revises: 0024
"""

from alembic import op

revision = "0025"
down_revision = "0024"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(
        f"CREATE INDEX email_send_log_mailed_by_day ON {q}.email_send_log (partition_date) "
        "WHERE status IN ('claimed', 'sent')"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP INDEX {q}.email_send_log_mailed_by_day")
