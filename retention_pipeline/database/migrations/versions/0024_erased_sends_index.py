"""The emails sent to users erased since, found by their send time: the audience's memory of
those users.

Erasure deletes a user's episodes and audience rows, which are what the cooldown and the
frequency cap read; the send log keeps each row, its address blanked. An account that is
excluded for a while (a ban until a date, a disabled flag set and cleared) comes back as a user
with no history, and was emailed step 0 again however recently it had been emailed. The audience
now also reads the loop's sent emails whose address was blanked, through this small index of
them alone.

Revision ID: 0024
Revises: 0023
"""

from alembic import op

revision = "0024"
down_revision = "0023"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(
        f"CREATE INDEX email_send_log_sent_to_erased ON {q}.email_send_log (sent_at) "
        "WHERE status = 'sent' AND email = ''"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP INDEX {q}.email_send_log_sent_to_erased")
