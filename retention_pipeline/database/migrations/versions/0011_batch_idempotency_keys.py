"""Each batch's Idempotency-Key, stored when the batch is claimed, so withholding a member
(suppressed or erased since the claim) never changes the key its retries carry.

Revision ID: 0011
Revises: 0010
"""

import hashlib
import json

from alembic import op
from sqlalchemy import text

revision = "0011"
down_revision = "0010"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.email_send_log ADD COLUMN idempotency_key text")
    # A batch still claimed may have gone out under the key the sender used to derive from its
    # claimed members: its retries must carry that key, or Resend would deliver it again.
    # Settled rows are never sent again and need none.
    connection = op.get_bind()
    batches = connection.execute(
        text(f"""
            SELECT batch_key, array_agg(send_key) FROM {q}.email_send_log
            WHERE status = 'claimed' GROUP BY batch_key""")
    ).all()
    if batches:
        connection.execute(
            text(f"""
                UPDATE {q}.email_send_log AS log SET idempotency_key = b.idempotency_key
                FROM unnest(CAST(:batch_keys AS text[]), CAST(:idempotency_keys AS text[]))
                    AS b(batch_key, idempotency_key)
                WHERE log.batch_key = b.batch_key AND log.status = 'claimed'"""),
            {
                "batch_keys": [batch_key for batch_key, _ in batches],
                "idempotency_keys": [_digest_key(send_keys) for _, send_keys in batches],
            },
        )
    op.execute(
        f"ALTER TABLE {q}.email_send_log ADD CONSTRAINT email_send_log_claimed_has_key "
        "CHECK (status <> 'claimed' OR idempotency_key IS NOT NULL)"
    )


def _digest_key(send_keys: list[str]) -> str:
    # Written out, not imported: the key of revision 0010's sender, whatever the code says later.
    digest = hashlib.sha256(json.dumps(sorted(send_keys)).encode()).hexdigest()
    return f"retention-batch/{digest}"


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.email_send_log DROP COLUMN idempotency_key")
