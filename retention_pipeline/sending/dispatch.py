"""Send a loop's claimed batches and record each outcome before sending the next."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, text

from retention_pipeline.email.message import EmailSender
from retention_pipeline.sending.send_log import (
    drop_suppressed,
    expire_unanswered,
    mark_attempt,
    pending_batches,
    record,
)

# Resend keeps an Idempotency-Key for 24 hours; stop trusting it a little earlier.
IDEMPOTENCY_WINDOW = timedelta(hours=23)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchReport:
    sent: int
    failed: int
    """Failed for good in this dispatch (rejected addresses, validation, auth)."""
    still_pending: int
    """Rows of the loop still claimed afterwards: transient failures a retry will re-send."""
    expired: int = 0
    """Rows given up on: first sent over a day ago and still unconfirmed (expire_unanswered)."""
    suppressed: int = 0
    """Claimed rows not sent because the address was suppressed since (drop_suppressed)."""


def send_pending(
    engine: Engine, *, schema: str, loop_name: str, sender: EmailSender, provider: str
) -> DispatchReport:
    """Send every pending batch of the loop, recording each batch in its own transaction.

    A crash loses at most the outcome of the batch in flight; the next call re-sends that batch
    with the same members, content and `Idempotency-Key`, so what the provider accepted before the
    crash is not delivered twice. Two dispatches of one loop at once are safe for the same reason,
    and because `record` never changes a row that is no longer claimed.
    """
    with engine.begin() as connection:
        expired = expire_unanswered(
            connection, schema=schema, loop_name=loop_name, older_than=IDEMPOTENCY_WINDOW
        )
        suppressed = drop_suppressed(connection, schema=schema, loop_name=loop_name)
    if expired:
        logger.warning(
            "%s: %d emails sent over a day ago with no answer: not re-sent", loop_name, expired
        )
    with engine.connect() as connection:
        batches = pending_batches(connection, schema=schema, loop_name=loop_name)
    sent = failed = 0
    for number, batch in enumerate(batches, start=1):
        with engine.begin() as connection:
            mark_attempt(connection, schema=schema, keys=[email.key for email in batch])
        results = sender.send(batch)
        with engine.begin() as connection:
            record(connection, schema=schema, results=results, provider=provider)
        batch_sent = sum(result.status == "sent" for result in results)
        batch_failed = sum(result.status == "failed" and not result.retryable for result in results)
        sent += batch_sent
        failed += batch_failed
        logger.info(
            "%s batch %d/%d: %d sent, %d failed, %d left to retry",
            loop_name,
            number,
            len(batches),
            batch_sent,
            batch_failed,
            len(results) - batch_sent - batch_failed,
        )
        if results and all(result.retryable for result in results):
            # The provider is refusing whole requests even after retries (outage, bad key,
            # spent quota): leave the rest claimed for the job's retry instead of hammering it.
            logger.warning("%s: stopping after batch %d; the rest stays claimed", loop_name, number)
            break
    s = engine.dialect.identifier_preparer.quote_schema(schema)
    with engine.connect() as connection:
        still_pending = connection.execute(
            text(
                f"SELECT count(*) FROM {s}.email_send_log "
                "WHERE loop_name = :loop AND status = 'claimed'"
            ),
            {"loop": loop_name},
        ).scalar_one()
    return DispatchReport(
        sent=sent,
        failed=failed,
        still_pending=int(still_pending),
        expired=expired,
        suppressed=suppressed,
    )
