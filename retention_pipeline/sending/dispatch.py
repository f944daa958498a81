"""Send a loop's claimed batches and record each outcome before sending the next.

Each batch starts in one statement (`send_log.start_batch`) that withholds the members
suppressed or erased since the claim and marks the rest attempted, right before its request:
what was suppressed before that statement is never in a request, and the batch keeps the
Idempotency-Key it was claimed with, so a retry never delivers anyone twice (the send log's
docstring has the reasoning). Before each batch the dispatch also asks `keep_going`, which the
send run answers from its sender lock and its Dagster run: a sender that lost either stops, and
what it has not started stays claimed for the next one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import Connection, Engine, text

from retention_pipeline.email.message import EmailSender
from retention_pipeline.sending.send_log import (
    expire_unanswered,
    pending_batch_keys,
    record,
    start_batch,
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
    """Claimed rows not sent because the address was suppressed since the claim."""
    erased: int = 0
    """Claimed rows not sent because the user was erased since the claim."""
    stale: int = 0
    """Claimed rows of a batch never attempted, not sent because their `stale_at` passed
    (`email.max_delay` after their local send time) before the batch started."""
    by_day: dict[date, Counter[str]] = field(default_factory=dict, compare=False)
    """The same changes by partition day: 'sent' and 'failed' (expired, suppressed and erased
    included)."""

    def then(self, later: DispatchReport) -> DispatchReport:
        """This dispatch followed by `later` of the same run: the changes of both, and what
        `later` left claimed."""
        by_day = {day: Counter(changes) for day, changes in self.by_day.items()}
        for day, changes in later.by_day.items():
            by_day.setdefault(day, Counter()).update(changes)
        return DispatchReport(
            sent=self.sent + later.sent,
            failed=self.failed + later.failed,
            still_pending=later.still_pending,
            expired=self.expired + later.expired,
            suppressed=self.suppressed + later.suppressed,
            erased=self.erased + later.erased,
            stale=self.stale + later.stale,
            by_day=by_day,
        )

    def __str__(self) -> str:
        sentence = f"{self.sent} sent, {self.failed} failed"
        if self.expired:
            sentence += f", {self.expired} given up on (unconfirmed for a day)"
        if self.suppressed:
            sentence += f", {self.suppressed} not sent (suppressed since they were claimed)"
        if self.erased:
            sentence += f", {self.erased} not sent (user erased since they were claimed)"
        if self.stale:
            sentence += f", {self.stale} not sent (not sent within email.max_delay: skipped)"
        return sentence + f"; {self.still_pending} still claimed, to be retried"


def send_pending(
    engine: Engine,
    *,
    schema: str,
    loop_name: str,
    loops_configured: Sequence[str],
    sender: EmailSender,
    provider: str,
    log: logging.Logger = logger,
    shard: Shard = WHOLE_LOOP,
    keep_going: Callable[[], bool] = lambda: True,
    record_gone: Callable[[Connection, str], object] | None = None,
    now: datetime | None = None,
) -> DispatchReport:
    """Send every pending batch of the loop's `shard`, recording each batch in its own
    transaction.

    A crash loses at most the outcome of the batch in flight; the next call re-sends that batch
    with the same content and `Idempotency-Key` (less the members suppressed or erased since), so
    what the provider accepted before the crash is not delivered twice. Two dispatches of one loop
    at once deliver nothing twice for the same reason, and count nothing twice because `record`
    never changes a row that is no longer claimed (`send_loop_day` also keeps them apart with a
    lock). Progress goes to `log`, a line per batch. `loops_configured`, the configuration's
    loops: an unsubscribe from a loop not among them holds for every loop (`start_batch`).

    `keep_going` is asked before each batch: when it answers False, or raises, the dispatch stops
    there and the batches not started stay claimed.

    `record_gone(connection, batch_key)`, when given, runs in each batch's starting transaction
    right before `start_batch`: it records in `erased_users` the members the app has deleted or
    now excludes (`send_log.record_members_gone`), so they are withheld as erased, however
    recently the app changed them.

    `now` (default: the database's clock) is the instant the batches start at: a batch never
    attempted leaves out its members whose `stale_at` is past it (`start_batch`).
    """
    with engine.begin() as connection:
        expired = expire_unanswered(
            connection,
            schema=schema,
            loop_name=loop_name,
            older_than=IDEMPOTENCY_WINDOW,
            shard=shard,
        )
    if expired:
        log.warning(
            "%s: %d emails sent over a day ago with no answer: not re-sent",
            loop_name,
            expired.total(),
        )
    by_day: dict[date, Counter[str]] = {}
    for day, count in expired.items():
        by_day.setdefault(day, Counter())["failed"] += count
    with engine.connect() as connection:
        batch_keys = pending_batch_keys(connection, schema=schema, loop_name=loop_name, shard=shard)
    if batch_keys:
        log.info("%s: %d batches to send", loop_name, len(batch_keys))
    sent = failed = 0
    withheld: Counter[str] = Counter()
    for number, key in enumerate(batch_keys, start=1):
        if not keep_going():
            log.warning(
                "%s: stopping before batch %d of %d: the send run is no longer alive; the rest "
                "stays claimed for its retry",
                loop_name,
                number,
                len(batch_keys),
            )
            break
        with engine.begin() as connection:
            if record_gone is not None:
                record_gone(connection, key)
            batch = start_batch(
                connection,
                schema=schema,
                loop_name=loop_name,
                batch_key=key,
                loops_configured=loops_configured,
                now=now,
            )
        for (day, reason), count in batch.withheld.items():
            by_day.setdefault(day, Counter())["failed"] += count
            withheld[reason] += count
        if not batch.emails:  # settled by another sender meanwhile, or every member withheld
            continue
        results = sender.send(batch.emails, idempotency_key=batch.idempotency_key)
        with engine.begin() as connection:
            changed = record(
                connection,
                schema=schema,
                results=results,
                provider=provider,
                first_attempt_at=batch.first_attempt_at,
            )
        batch_sent = batch_failed = 0
        for (day, status), count in changed.items():
            if status in ("sent", "failed"):
                by_day.setdefault(day, Counter())[status] += count
            batch_sent += count if status == "sent" else 0
            batch_failed += count if status == "failed" else 0
        sent += batch_sent
        failed += batch_failed
        log.info(
            "%s batch %d of %d: %d sent, %d failed, %d left to retry%s",
            loop_name,
            number,
            len(batch_keys),
            batch_sent,
            batch_failed,
            changed.total() - batch_sent - batch_failed,
            f", {batch.withheld.total()} withheld (suppressed, erased or stale since the claim)"
            if batch.withheld
            else "",
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
        suppressed=withheld["suppressed"],
        erased=withheld["erased"],
        stale=withheld["stale"],
        by_day=by_day,
    )
