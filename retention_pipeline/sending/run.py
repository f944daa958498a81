"""One send run: a loop's emails for one audience day, from the audience to the provider.

The send job's op calls `send_loop_day` and reports what it returns; everything here is plain
Python over SQLAlchemy, so it runs and is tested without Dagster.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import Engine

from retention_pipeline.config.models import Loop, RetentionConfig
from retention_pipeline.email.message import EmailSender
from retention_pipeline.recipients.delivery import delivery_counts
from retention_pipeline.segments.calendar import send_window
from retention_pipeline.sending.compose import loop_templates, treatment_rows
from retention_pipeline.sending.dispatch import DispatchReport, send_pending
from retention_pipeline.sending.due import (
    DueClaim,
    DueHour,
    claim_due,
    due_hours,
    due_hours_markdown,
)
from retention_pipeline.sending.send_log import (
    BATCH_SIZE,
    claim_rows,
    days_with_emails,
    record_members_gone,
    send_log_summary,
)
from retention_pipeline.sending.sender_lock import sender_lock
from retention_pipeline.sending.shards import WHOLE_LOOP, Shard

logger = logging.getLogger(__name__)

DELIVERY_REPORT_DAYS = 7
"""How many days back each send run reports the send log again, with the delivery events
(bounces, complaints, clicks) that arrived since the emails went out."""


class Markdown(str):
    """Metadata text the send job shows as Markdown (a table)."""


@dataclass(frozen=True)
class SendRunReport:
    """What one send run did, by audience day, and where each day's send log stands now."""

    loop_name: str
    day: date
    audience_days: tuple[date, ...]
    """The days this run claimed from: `day` and the recent days before it (`send_window`)."""
    claimed: dict[date, int]
    """New send-log rows this run claimed, by audience day."""
    dispatch: DispatchReport
    ledger: dict[date, dict[str, int]]
    """Every row of each day in `days_reported`, by status, whichever run wrote it."""
    delivery: dict[date, dict[str, int]]
    """Per day in `days_reported`, the emails Resend reported delivered, bounced, ... so far."""
    shard: Shard = WHOLE_LOOP
    """Whose emails this run claimed and sent; the ledger and delivery counts cover every shard."""
    due: DueClaim | None = None
    """For a loop whose members have due times: the members this run read as due, and what
    became of them (None: the loop sends right after its run)."""
    hours: dict[date, list[DueHour]] = field(default_factory=dict)
    """For such a loop, per day in `days_changed`: its members by hour of due time."""

    @property
    def days_changed(self) -> list[date]:
        """The run's own day, and every other day whose send log this run changed."""
        return _days_changed(self.day, self.claimed, self.dispatch)

    @property
    def days_reported(self) -> list[date]:
        """`days_changed`, and the loop's days of the last `DELIVERY_REPORT_DAYS` with emails,
        whose delivery events keep arriving after they were sent."""
        return sorted(self.ledger)

    def metadata_for(self, day: date) -> dict[str, object]:
        """One day's send-log metadata: this run's changes to that day, and the day's totals,
        so no count of this run exceeds the total it belongs to."""
        changes = self.dispatch.by_day.get(day, Counter())
        due: dict[str, object] = {}
        if self.due is not None:
            due["send_run_due_by"] = self.due.by.isoformat()
            due["skipped_this_run"] = self.due.skipped[day]
            due["deferred_this_run"] = self.due.deferred[day]
        if day in self.hours:
            hours = self.hours[day]
            due[f"{self.loop_name}/due/waiting"] = sum(each.waiting for each in hours)
            due[f"{self.loop_name}/due/skipped"] = sum(each.skipped for each in hours)
            due[f"{self.loop_name}/due/hours"] = Markdown(due_hours_markdown(hours))
        return {
            "loop": self.loop_name,
            "send_run_day": self.day.isoformat(),
            "send_run_shard": f"{self.shard.index} of {self.shard.count}",
            "send_run_audience_days": ", ".join(each.isoformat() for each in self.audience_days)
            or "none (the day is older than the send window)",
            "claimed_this_run": self.claimed.get(day, 0),
            "sent_this_run": changes["sent"],
            "failed_this_run": changes["failed"],
            # The day's totals of every loop share the send log's partition: each under its loop.
            **{
                f"{self.loop_name}/status/{status}": count
                for status, count in self.ledger[day].items()
            },
            **{
                f"{self.loop_name}/delivery/{event}": count
                for event, count in self.delivery[day].items()
            },
            **due,
        }

    def __str__(self) -> str:
        which = "" if self.shard == WHOLE_LOOP else f" ({self.shard})"
        if self.due is not None:
            return f"{self.loop_name} {self.day}{which}: {self.due}; {self.dispatch}"
        if self.audience_days:
            days = ", ".join(each.isoformat() for each in self.audience_days)
            claimed = f"claimed {sum(self.claimed.values())} new emails from audience days {days}"
        else:
            claimed = "claimed nothing: the day is older than the send window (history)"
        return f"{self.loop_name} {self.day}{which}: {claimed}; {self.dispatch}"


def send_loop_day(
    engine: Engine,
    *,
    config: RetentionConfig,
    loop: Loop,
    day: date,
    now: datetime,
    sender: EmailSender,
    provider: str,
    unsubscribe_secret: str,
    holder: str,
    log: logging.Logger = logger,
    shard: Shard = WHOLE_LOOP,
    keep_going: Callable[[], bool] = lambda: True,
) -> SendRunReport:
    """Claim the loop's treated audience of `day` (and of the recent days before it) in the send
    log, then send everything of the loop not yet confirmed; of the users in `shard` only, when
    several runs send the loop. Of each day, one batch is claimed and sent before the rest is
    rendered and claimed, so the first email does not wait for the whole day's.

    Only one sender per loop and shard runs at a time (`sender_lock`, named `holder`); another
    raises `SenderBusy` before claiming anything. Audience days older than the send window at
    `now` are history and are never claimed. A retry, or a rerun after a crash, claims nothing
    twice and re-sends unconfirmed batches with their original Idempotency-Keys.

    Before each batch the sender checks that it still holds its lock (`SenderLockLost` if not:
    its connection was terminated, and another sender may have taken over) and asks
    `keep_going` (the send op: is the Dagster run still alive?); when that says no, it stops and
    the rest stays claimed for the next send run.

    A loop whose members have due times (`send_at: {local_time}`, or quiet hours) claims instead
    the members due since the shard's previous claim and by `now`, whatever their audience day
    (`due.claim_due`); `day` then only names the run.
    """
    schema = config.database.schema_
    with sender_lock(
        engine, schema=schema, loop_name=loop.name, holder=holder, shard=shard
    ) as lock:

        def still_sending() -> bool:
            lock.ensure_held()
            return keep_going()

        audience_days = tuple(send_window(day, now, config.timezone))
        if not audience_days and not config.sends_on_due_times(loop):
            log.warning(
                "%s %s: the audience is older than the send window, so it is history: "
                "nothing claimed",
                loop.name,
                day,
            )

        def dispatch_pending() -> DispatchReport:
            return send_pending(
                engine,
                schema=schema,
                loop_name=loop.name,
                loops_configured=config.loop_names,
                sender=sender,
                provider=provider,
                log=log,
                shard=shard,
                keep_going=still_sending,
                # An account the app disabled after the audience was built is not emailed.
                record_gone=lambda connection, batch: record_members_gone(
                    connection, config=config, loop_name=loop.name, batch_key=batch
                ),
                # A batch never attempted whose members went stale by now is not sent late.
                now=now,
            )

        def claim_unclaimed(audience_day: date, limit: int | None) -> tuple[int, int]:
            """Render and claim the first `limit` unclaimed rows of the day (all: None); return
            how many rows were read and how many emails are newly to be sent."""
            with engine.begin() as connection:
                rows = treatment_rows(
                    connection,
                    schema=schema,
                    loop_name=loop.name,
                    day=audience_day,
                    # Claimed emails keep their stored content: rendering them again is waste.
                    unclaimed_only=True,
                    shard=shard,
                    limit=limit,
                    templates=loop_templates(loop),
                )
                new = claim_rows(
                    connection,
                    config=config,
                    loop=loop,
                    day=audience_day,
                    rows=rows,
                    unsubscribe_secret=unsubscribe_secret,
                    shard=shard,
                )
            return len(rows), new

        dispatch = DispatchReport(sent=0, failed=0, still_pending=0)
        claimed: dict[date, int] = {}
        due: DueClaim | None = None
        if config.sends_on_due_times(loop):
            # Members have due times of their own: the run claims those due since the last claim.
            due = claim_due(
                engine,
                config=config,
                loop=loop,
                now=now,
                unsubscribe_secret=unsubscribe_secret,
                shard=shard,
            )
            claimed = dict(due.claimed)
            audience_days = tuple(sorted(set(due.claimed) | set(due.deferred) | set(due.skipped)))
            log.info("%s: %s", loop.name, due)
            if due.skipped:
                log.warning(
                    "%s: %d members skipped: their email could not go out within "
                    "email.max_delay (%s) of their send time",
                    loop.name,
                    due.skipped.total(),
                    config.email.max_delay,
                )
        else:
            for audience_day in audience_days:
                if dispatch.still_pending:
                    # Stopped (the run ended, the lock was lost) or refused by the provider: the
                    # rest is left unclaimed for the retry, and the provider is not asked again.
                    break
                # One batch is claimed and sent before the rest is rendered, so the first email
                # leaves without waiting for the whole day's.
                read, claimed[audience_day] = claim_unclaimed(audience_day, BATCH_SIZE)
                if read == BATCH_SIZE:
                    dispatch = dispatch.then(dispatch_pending())
                    if not dispatch.still_pending:
                        claimed[audience_day] += claim_unclaimed(audience_day, None)[1]
                if claimed[audience_day]:
                    log.info(
                        "%s: claimed %d new emails of audience day %s",
                        loop.name,
                        claimed[audience_day],
                        audience_day,
                    )
        if not dispatch.still_pending:
            # The rest of what was claimed, and what earlier runs left claimed.
            dispatch = dispatch.then(dispatch_pending())
    with engine.connect() as connection:
        days = sorted(
            set(_days_changed(day, claimed, dispatch))
            | set(
                days_with_emails(
                    connection,
                    schema=schema,
                    loop_name=loop.name,
                    first=day - timedelta(days=DELIVERY_REPORT_DAYS - 1),
                    last=day,
                )
            )
        )
        ledger = {
            each: send_log_summary(connection, schema=schema, loop_name=loop.name, day=each)
            for each in days
        }
        delivery = delivery_counts(connection, schema=schema, loop_name=loop.name, days=days)
        hours = {}
        if due is not None:
            changed = (
                set(_days_changed(day, claimed, dispatch)) | set(due.deferred) | set(due.skipped)
            )
            hours = {
                each: due_hours(connection, schema=schema, loop_name=loop.name, day=each)
                for each in sorted(changed)
                if each in ledger
            }
    return SendRunReport(
        loop_name=loop.name,
        day=day,
        audience_days=audience_days,
        claimed=claimed,
        dispatch=dispatch,
        ledger=ledger,
        delivery=delivery,
        shard=shard,
        due=due,
        hours=hours,
    )


def _days_changed(day: date, claimed: dict[date, int], dispatch: DispatchReport) -> list[date]:
    changed = {day} | {each for each, count in claimed.items() if count}
    return sorted(changed | set(dispatch.by_day))
