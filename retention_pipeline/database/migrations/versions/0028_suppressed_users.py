"""An unsubscribe or a complaint holds back the person, whatever address they have since.

The list compared mailboxes only: a user who unsubscribed at one address, then changed it in
the app, was emailed at the new one. The audience and the batch start now also hold back a
user named by an unsubscribe or a complaint for that loop or every loop (a bounce is the
mailbox's: a new address may work), read through this index.

Revision ID: 0028
Revises: 0027
"""

from alembic import op

revision = "0028"
down_revision = "0027"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(
        f"CREATE INDEX email_suppressions_by_user ON {q}.email_suppressions (user_id) "
        "WHERE user_id IS NOT NULL"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP INDEX {q}.email_suppressions_by_user")
