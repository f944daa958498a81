"""Sharded sending: the shard that claimed each send-log row, and the provider's request pace
that every send run shares.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # Fixed at claim time, so a batch is always sent whole by one shard, even after
    # email.send_shards changed; rows claimed before shards existed belong to shard 0.
    op.execute(
        f"ALTER TABLE {q}.email_send_log ADD COLUMN send_shard smallint NOT NULL DEFAULT 0 "
        "CHECK (send_shard >= 0)"
    )
    # One row per provider: when its next request may start, whichever run sends it.
    op.execute(f"""
        CREATE TABLE {q}.send_pace (
            provider text PRIMARY KEY,
            next_request_at timestamptz NOT NULL
        )""")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP TABLE {q}.send_pace")
    op.execute(f"ALTER TABLE {q}.email_send_log DROP COLUMN send_shard")
