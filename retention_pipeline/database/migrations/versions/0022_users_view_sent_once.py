"""`re_engagement_sent` reads the loop's sent emails from an index of their own, with the day's
end worked out once per statement.

The `users` view's latest email per user called `as_of()` (a SQL function reading
`tracking_state`, which PostgreSQL cannot inline) once per row of the send log, and read the
whole send log's rows, whose rendered bodies make each about 4 kB: at a million users with ten
days of sends, 0.5 s of the seed condition's 1.1 s, growing with every email ever sent. The day's
end is now a subquery PostgreSQL evaluates once, and the loop's sent emails are read from an
index of (loop, user, sent time) alone.

Revision ID: 0022
Revises: 0021
"""

import importlib

from alembic import op

revision = "0022"
down_revision = "0021"

# As 0021 made it, with the day's end evaluated once.
PREVIOUS_USERS_VIEW = importlib.import_module(
    "retention_pipeline.database.migrations.versions.0021_users_view_joins"
).USERS_VIEW
USERS_VIEW = PREVIOUS_USERS_VIEW.replace(
    "sent.sent_at < {q}.as_of()", "sent.sent_at < (SELECT {q}.as_of())"
)


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(
        f"CREATE INDEX email_send_log_sent_by_loop_user ON {q}.email_send_log "
        "(loop_name, user_id, sent_at) WHERE status = 'sent'"
    )
    op.execute(USERS_VIEW.format(q=q))


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(PREVIOUS_USERS_VIEW.format(q=q))
    op.execute(f"DROP INDEX {q}.email_send_log_sent_by_loop_user")
