"""The emails that went out or may have, found by their day: what the frequency cap counts.

The cap read the audience rows of its days alone. A rebuild of a day takes back the audience
rows of users dropped since the emails went out (unsubscribed from that loop, say), and the cap
stopped seeing those emails: another loop could email the same person that day. The audience now
also reads the send log's emails of the cap's days that are claimed, sent, or failed once their
request was made (an unanswered one may have been delivered), through this index of those rows
alone, which holds what the cap reads of them (the rows carry the rendered email: about 1.6 kB
each).

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
        "INCLUDE (loop_name, user_id, email) "
        "WHERE status <> 'failed' OR first_attempt_at IS NOT NULL"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP INDEX {q}.email_send_log_mailed_by_day")
