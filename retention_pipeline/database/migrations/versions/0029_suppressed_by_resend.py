"""Resend's `email.suppressed` event: Resend accepted an email, then did not send it, since the
address is on the account's suppression list (a hard bounce or a complaint from any email of
the account, or added by hand). The event was acknowledged and ignored: the send log showed the
email as sent, and the next day's audience took the address again.

Revision ID: 0029
Revises: 0028
"""

from alembic import op

revision = "0029"
down_revision = "0028"

# Written out, not imported: a migration states the schema of its revision.
EVENT_TYPES_BEFORE = (
    "sent",
    "delivered",
    "delivery_delayed",
    "bounced",
    "complained",
    "opened",
    "clicked",
    "failed",
)
EVENT_TYPES = (*EVENT_TYPES_BEFORE, "suppressed")


def _allow(schema: str, event_types: tuple[str, ...]) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    allowed = ", ".join(f"'{event_type}'" for event_type in event_types)
    op.execute(f"""
        ALTER TABLE {q}.email_send_log DROP CONSTRAINT email_send_log_last_event_check,
            ADD CONSTRAINT email_send_log_last_event_check CHECK (last_event IN ({allowed}))""")
    op.execute(f"""
        ALTER TABLE {q}.email_events DROP CONSTRAINT email_events_event_type_check,
            ADD CONSTRAINT email_events_event_type_check CHECK (event_type IN ({allowed}))""")


def upgrade(schema: str) -> None:
    _allow(schema, EVENT_TYPES)


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # Kept as what they are closest to before this revision: an email that was not sent.
    op.execute(f"UPDATE {q}.email_events SET event_type = 'failed' WHERE event_type = 'suppressed'")
    op.execute(
        f"UPDATE {q}.email_send_log SET last_event = 'failed' WHERE last_event = 'suppressed'"
    )
    _allow(schema, EVENT_TYPES_BEFORE)
