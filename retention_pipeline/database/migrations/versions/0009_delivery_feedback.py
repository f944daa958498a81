"""Delivery feedback: Resend's webhook events, each email's last delivery event, and
suppressions that cover one loop or every loop.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"

# Written out, not imported: a migration states the schema of its revision, whatever the code
# says later.
EVENT_TYPES = (
    "sent",
    "delivered",
    "delivery_delayed",
    "bounced",
    "complained",
    "opened",
    "clicked",
    "failed",
)


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    types = ", ".join(f"'{event_type}'" for event_type in EVENT_TYPES)
    op.execute(f"""
        ALTER TABLE {q}.email_send_log
            ADD COLUMN last_event text CHECK (last_event IN ({types})),
            ADD COLUMN last_event_at timestamptz""")
    # Webhook events name the email by Resend's id, which the send log keeps in provider_id.
    op.execute(
        f"CREATE INDEX email_send_log_by_provider_id ON {q}.email_send_log (provider_id) "
        "WHERE provider_id IS NOT NULL"
    )
    # One row per webhook delivery id (svix-id): Resend retries a delivery with the same id.
    # `send_log_id` stays empty for an email the pipeline did not send, or one whose event came
    # before the send run recorded Resend's id (the run links it then).
    op.execute(f"""
        CREATE TABLE {q}.email_events (
            svix_id text PRIMARY KEY,
            event_type text NOT NULL CHECK (event_type IN ({types})),
            provider_email_id text NOT NULL,
            send_log_id bigint REFERENCES {q}.email_send_log (id),
            occurred_at timestamptz NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            detail jsonb NOT NULL DEFAULT '{{}}'
        )""")
    op.execute(
        f"CREATE INDEX email_events_by_send_log ON {q}.email_events (send_log_id, event_type)"
    )
    op.execute(
        f"CREATE INDEX email_events_unlinked ON {q}.email_events (provider_email_id) "
        "WHERE send_log_id IS NULL"
    )
    # An empty loop_name suppresses the address for every loop (bounces, complaints, the
    # "all emails" choice); a loop's name, for that loop only. Existing rows cover every loop.
    op.execute(f"ALTER TABLE {q}.email_suppressions ADD COLUMN loop_name text")
    op.execute(f"ALTER TABLE {q}.email_suppressions DROP CONSTRAINT email_suppressions_pkey")
    op.execute(
        f"CREATE UNIQUE INDEX email_suppressions_per_scope "
        f"ON {q}.email_suppressions (email, (coalesce(loop_name, '')))"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # A loop's unsubscribe becomes one from every loop: dropped, its loop would email the
    # person again.
    op.execute(f"""
        DELETE FROM {q}.email_suppressions AS loop_only
        USING {q}.email_suppressions AS other
        WHERE loop_only.loop_name IS NOT NULL AND other.email = loop_only.email
          AND (other.loop_name IS NULL OR other.ctid < loop_only.ctid)""")
    op.execute(f"UPDATE {q}.email_suppressions SET loop_name = NULL")
    op.execute(f"DROP INDEX {q}.email_suppressions_per_scope")
    op.execute(f"ALTER TABLE {q}.email_suppressions DROP COLUMN loop_name")
    op.execute(f"ALTER TABLE {q}.email_suppressions ADD PRIMARY KEY (email)")
    op.execute(f"DROP TABLE {q}.email_events")
    op.execute(f"DROP INDEX {q}.email_send_log_by_provider_id")
    op.execute(f"ALTER TABLE {q}.email_send_log DROP COLUMN last_event, DROP COLUMN last_event_at")
