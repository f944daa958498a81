"""The days whose audience of a loop was built again: the only days whose emails the frequency
cap must read from the send log.

Revision 0025 had the cap read every email of its days from the send log, through an index of
them, because a rebuild of a day takes back the audience rows of users dropped since their email
went out (unsubscribed from that loop, say). The send log's rows carry the rendered email and
change two or three times each (claimed, attempted, sent), so that read fetched a heap page per
email: at a million users, the 114,000 emails of the cap's days cost 0.3-0.9 s of the morning's
audience, growing with every email a team sends. An email can lack its audience row only on a
day built again, or once its user is erased (their sent emails are read apart; erasure records
the day of one that failed once its request was made): a rebuild that takes back any row
records its day here, and the cap reads the send log of those days alone.
The days that have emails are recorded here now, since any of them may have been built again
before this revision. The index of 0025 has no reader left: every claim and status change wrote
it.

Revision ID: 0027
Revises: 0026
"""

from alembic import op

revision = "0027"
down_revision = "0026"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"""
        CREATE TABLE {q}.audience_days_rebuilt (
            loop_name text NOT NULL,
            partition_date date NOT NULL,
            PRIMARY KEY (loop_name, partition_date))""")
    op.execute(f"""
        INSERT INTO {q}.audience_days_rebuilt (loop_name, partition_date)
        SELECT DISTINCT loop_name, partition_date FROM {q}.email_send_log""")
    op.execute(f"DROP INDEX {q}.email_send_log_mailed_by_day")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(
        f"CREATE INDEX email_send_log_mailed_by_day ON {q}.email_send_log (partition_date) "
        "INCLUDE (loop_name, user_id, email) "
        "WHERE status <> 'failed' OR first_attempt_at IS NOT NULL"
    )
    op.execute(f"DROP TABLE {q}.audience_days_rebuilt")
