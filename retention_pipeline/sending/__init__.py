"""Exactly-once sending: compose a day's emails, claim them in the send log, send the claimed
batches, record the outcomes. Who must not be emailed, and what Resend reports after a send,
live in `recipients/`.

A send run is `send_loop_day` (run.py), for one shard of the loop's users (shards.py; the whole
loop unless `email.send_shards` says more): under the shard's sender lock, per audience day of
the send window,

    with engine.begin() as connection:
        emails = compose_emails(connection, schema=..., config=..., loop=..., day=...,
                                unsubscribe_secret=...)
        claim(connection, schema=..., loop_name=loop.name, day=day, emails=emails)

then `send_pending(engine, ...)`, its requests paced with every other run's (pace.py); the job
fails while `still_pending` emails remain, so its RetryPolicy re-runs it, and the re-run claims
nothing new.

Plain Python over SQLAlchemy, no Dagster: the `defs` modules wire it into the send job.
"""

from retention_pipeline.sending.compose import compose_emails, day_end, send_key, treatment_rows
from retention_pipeline.sending.dispatch import DispatchReport, send_pending
from retention_pipeline.sending.run import SendRunReport, send_loop_day
from retention_pipeline.sending.send_log import (
    BATCH_SIZE,
    STATUSES,
    claim,
    pending_batch_keys,
    record,
    send_log_summary,
    start_batch,
)
from retention_pipeline.sending.sender_lock import SenderBusy, SenderLockLost, sender_lock

__all__ = [
    "BATCH_SIZE",
    "STATUSES",
    "DispatchReport",
    "SendRunReport",
    "SenderBusy",
    "SenderLockLost",
    "claim",
    "compose_emails",
    "day_end",
    "pending_batch_keys",
    "record",
    "send_key",
    "send_log_summary",
    "send_loop_day",
    "send_pending",
    "sender_lock",
    "start_batch",
    "treatment_rows",
]
