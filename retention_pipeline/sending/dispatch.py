"""Send a loop's claimed batches and record each outcome before sending the next."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta

from sqlalchemy import Engine, text

from retention_pipeline.email.message import EmailSender
from retention_pipeline.sending.send_log import (
    drop_suppressed,
    expire_unanswered,
    mark_attempt,
    pending_batches,
    record,
)
from retention_pipeline.sending.shards import WHOLE_LOOP, Shard, row_in_shard

# Resend keeps an Idempotency-Key for 24 hours; stop trusting it a little earlier.
IDEMPOTENCY_WINDOW = timedelta(hours=23)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchReport:
    """What one dispatch changed in the send log. Every count is of rows this dispatch itself
    moved out of 'claimed', so two dispatches never count the same email."""

    sent: int
    failed: int
    """Failed for good in this dispatch (rejected addresses, validation, auth)."""
    still_pending: int
    """Rows of the loop's shard still claimed afterwards: transient failures a retry will
    re-send."""
    expired: int = 0
    """Rows given up on: first sent over a day ago and still unconfirmed (expire_unanswered)."""
    suppressed: int = 0
    """Claimed rows not sent because the address was suppressed since (drop_suppressed)."""
    by_day: dict[date, Counter[str]] = field(default_factory=dict, compare=False)
    """The same changes by partition day: 'sent' and 'failed' (expired and suppressed included)."""

    def __str__(self) -> str:
        sentence = f"{self.sent} sent, {self.failed} failed"
        if self.expired:
            sentence += f", {self.expired} given up on (unconfirmed for a day)"
        if self.suppressed:
            sentence += f", {self.suppressed} not sent (suppressed since they were claimed)"
        return sentence + f"; {self.still_pending} still claimed, to be retried"


def send_pending(
    engine: Engine,
    *,
    schema: str,
    loop_name: str,
    sender: EmailSender,
    provider: str,
    log: logging.Logger = logger,
    shard: Shard = WHOLE_LOOP,
) -> DispatchReport:
    """Send every pending batch of the loop's `shard`, recording each batch in its own
    transaction.

    A crash loses at most the outcome of the batch in flight; the next call re-sends that batch
    with the same members, content and `Idempotency-Key`, so what the provider accepted before the
    crash is not delivered twice. Two dispatches of one loop at once deliver nothing twice for the
    same reason, and count nothing twice because `record` never changes a row that is no longer
    claimed (`send_loop_day` also keeps them apart with a lock). Progress goes to `log`, a line
    per batch.
    """
    with engine.begin() as connection:
        expired = expire_unanswered(
            connection,
            schema=schema,
            loop_name=loop_name,
            older_than=IDEMPOTENCY_WINDOW,
            shard=shard,
        )
        suppressed = drop_suppressed(connection, schema=schema, loop_name=loop_name, shard=shard)
    if expired:
        log.warning(
            "%s: %d emails sent over a day ago with no answer: not re-sent",
            loop_name,
            expired.total(),
        )
    by_day: dict[date, Counter[str]] = {}
    for day, count in (expired + suppressed).items():
        by_day.setdefault(day, Counter())["failed"] += count
    with engine.connect() as connection:
        batches = pending_batches(connection, schema=schema, loop_name=loop_name, shard=shard)
    if batches:
        log.info("%s: %d batches to send", loop_name, len(batches))
    sent = failed = 0
    for number, batch in enumerate(batches, start=1):
        with engine.begin() as connection:
            mark_attempt(connection, schema=schema, keys=[email.key for email in batch])
        results = sender.send(batch)
        with engine.begin() as connection:
            changed = record(connection, schema=schema, results=results, provider=provider)
        batch_sent = batch_failed = 0
        for (day, status), count in changed.items():
            if status in ("sent", "failed"):
                by_day.setdefault(day, Counter())[status] += count
            batch_sent += count if status == "sent" else 0
            batch_failed += count if status == "failed" else 0
        sent += batch_sent
        failed += batch_failed
        log.info(
            "%s batch %d of %d: %d sent, %d failed, %d left to retry",
            loop_name,
            number,
            len(batches),
            batch_sent,
            batch_failed,
            changed.total() - batch_sent - batch_failed,
        )
        if results and all(result.retryable for result in results):
            # The provider is refusing whole requests even after retries (outage, bad key,
            # spent quota): leave the rest claimed for the job's retry instead of hammering it.
            log.warning("%s: stopping after batch %d; the rest stays claimed", loop_name, number)
            break
    s = engine.dialect.identifier_preparer.quote_schema(schema)
    with engine.connect() as connection:
        still_pending = connection.execute(
            text(
                f"SELECT count(*) FROM {s}.email_send_log "
                f"WHERE loop_name = :loop AND status = 'claimed' AND {row_in_shard('send_shard')}"
            ),
            {"loop": loop_name, **shard.params},
        ).scalar_one()
    return DispatchReport(
        sent=sent,
        failed=failed,
        still_pending=int(still_pending),
        expired=expired.total(),
        suppressed=suppressed.total(),
        by_day=by_day,
    )
