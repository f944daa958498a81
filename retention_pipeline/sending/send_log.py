"""The send log: claim emails before sending, send exactly what was claimed, record the outcome.

A row is claimed once per loop, user, episode and step (both unique keys of `email_send_log`),
with its rendered content, a `batch_key` that fixes which batch it goes out in, and the batch's
`idempotency_key`, both fixed forever at the claim. Every request for a batch carries that key, so
a batch re-sent after a crash or a transient failure is answered from Resend's idempotency store,
not delivered again.

A batch starts (`start_batch`) in one statement that withholds its members whose address was
suppressed, or whose user was erased (or deleted or excluded by the app: `record_members_gone`
records them right before), since the claim, and in a batch never attempted those whose
`email.max_delay` ran out (`sending.due`), and marks the rest attempted and returns
them: nothing suppressed or erased before that statement goes into the request. Withholding a
member changes a batch's payload but never its key. For a batch that was never attempted, Resend
has not seen the key and sends the smaller batch. For one attempted before (its outcome unknown),
either Resend never took that request, and the smaller batch goes out as a first send, or it did,
and Resend answers the same key with a different payload `409 invalid_idempotent_request`
instead of sending anything: every remaining member was in the earlier, larger request Resend
accepted, so they are recorded as sent (without Resend's ids; one Resend rejected in that request
would count as sent too), and the withheld member, emailed in a request that started before the
suppression, is not emailed again. Either way nobody is emailed twice, and no request that starts
after a suppression carries the address.

A batch is pending as a whole or not at all: `record` settles every row of a batch in one
transaction, and only failures of a whole request are retryable.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from retention_pipeline.config.models import Loop, RetentionConfig
from retention_pipeline.email.message import OutgoingEmail, SendResult
from retention_pipeline.recipients.addresses import mailbox_sql
from retention_pipeline.recipients.delivery import link_early_events
from retention_pipeline.recipients.suppressions import (
    hashed_suppression_reason_sql,
    mailbox_suppression_reason_sql,
    personal_suppression_sql,
)
from retention_pipeline.sending.compose import compose_emails, send_key, treatment_rows
from retention_pipeline.sending.shards import WHOLE_LOOP, Shard, row_in_shard
from retention_pipeline.tracking.erasure import record_users_gone

BATCH_SIZE = 100
"""Emails per batch: the most Resend accepts in one batch request."""

STATUSES = ("claimed", "sent", "failed")


def batch_key(loop_name: str, day: date, number: int) -> str:
    return f"{loop_name}:{day.isoformat()}:{number}"


def take_claim_turn(connection: Connection, schema: str, loop_name: str) -> None:
    """Wait, until the caller's transaction ends, for every other claim of the loop (any shard)
    and every build of its audience with due times (`audience.build`) to end theirs."""
    connection.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(:lock))"),
        {"lock": f"retention-pipeline:{schema}:claim:{loop_name}"},
    )


def claim(
    connection: Connection,
    *,
    schema: str,
    loop_name: str,
    day: date,
    emails: Sequence[OutgoingEmail],
    audience_rows: Iterable[Mapping[str, Any]] | None = None,
    shard: Shard = WHOLE_LOOP,
) -> int:
    """Claim `emails`, all of users in `shard`, for sending, in the caller's transaction; return
    how many new ones are to be sent.

    `audience_rows` are mappings with `user_id`, `episode_start` (a date), `step`, `template` and
    `variant`, such as `compose.treatment_rows` returns or a DataFrame's `to_dict("records")`;
    without them, the loop's treatment rows of `day` are read from `reengagement_audience`. Each
    email is paired with the row of the same send key; rows without an email (the holdout) are
    ignored. Emails already in the log are left as they are, content included. The new ones,
    sorted by send key, are split into batches of `BATCH_SIZE` numbered after the loop's batches
    already stored for `day` (by every shard), and stored as `shard`'s to send.

    One mailbox (`mailbox_sql`) gets at most one email of the loop's audience day, whatever the
    audience holds: an email to a mailbox that already has one in the log for the loop and day,
    or that follows another of this claim in send-key order, is stored failed, naming the user
    who has it, and never sent. The audience already keeps one user per mailbox; this guards
    audiences built before it did, and rows a caller passes. Stored rather than refused, so the
    rest of the day still goes out, a rerun does not meet the email again, and the day's
    `failed` count shows it.
    """
    if not emails:
        return 0
    if audience_rows is None:
        audience_rows = treatment_rows(
            connection, schema=schema, loop_name=loop_name, day=day, shard=shard
        )
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    keys = [email.key for email in emails]
    duplicates = sorted(key for key, count in Counter(keys).items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate send keys: {duplicates[:5]}")
    rows = {
        send_key(loop_name, str(row["user_id"]), row["episode_start"], int(row["step"])): row
        for row in audience_rows
    }
    unpaired = sorted(key for key in keys if key not in rows)
    if unpaired:
        raise ValueError(f"{len(unpaired)} emails have no audience row, first: {unpaired[0]!r}")

    # Claims of one loop take turns, shards too, so two of them cannot number batches alike.
    take_claim_turn(connection, schema, loop_name)
    existing = set(
        connection.execute(
            text(f"SELECT send_key FROM {s}.email_send_log WHERE send_key = ANY(:keys)"),
            {"keys": keys},
        ).scalars()
    )
    new = sorted((email for email in emails if email.key not in existing), key=lambda e: e.key)
    if not new:
        return 0
    stored_batches = connection.execute(
        text(f"""
            SELECT coalesce(max(CAST(substring(batch_key FROM '[0-9]+$') AS integer)), 0)
            FROM {s}.email_send_log WHERE loop_name = :loop AND partition_date = :day"""),
        {"loop": loop_name, "day": day},
    ).scalar_one()
    paired = [rows[email.key] for email in new]
    numbers = [stored_batches + 1 + index // BATCH_SIZE for index in range(len(new))]
    # Random, not derived from the batch: unique across schemas, reinstalls and deployments
    # sharing one Resend account, whose idempotency store would otherwise mix their batches up.
    idempotency_keys = {number: f"retention-batch/{uuid.uuid4()}" for number in set(numbers)}
    columns = {
        "send_key": [email.key for email in new],
        "user_id": [str(row["user_id"]) for row in paired],
        "episode_start": [row["episode_start"] for row in paired],
        "step": [int(row["step"]) for row in paired],
        "email": [email.to for email in new],
        "template": [row["template"] for row in paired],
        "variant": [row["variant"] for row in paired],
        "batch_key": [batch_key(loop_name, day, number) for number in numbers],
        "idempotency_key": [idempotency_keys[number] for number in numbers],
        "subject": [email.subject for email in new],
        "html": [email.html for email in new],
        "body_text": [email.text for email in new],
        "headers": [json.dumps(email.headers) for email in new],
        "tags": [json.dumps(email.tags) for email in new],
    }
    # One statement for the whole claim; ON CONFLICT without a target covers both unique keys.
    # The claim lock makes the day's rows of the loop, every shard's, final while it runs.
    inserted = connection.execute(
        text(f"""
            WITH incoming AS (
                SELECT r.*, {mailbox_sql("r.email")} AS mailbox
                FROM unnest(CAST(:send_key AS text[]), CAST(:user_id AS text[]),
                            CAST(:episode_start AS date[]), CAST(:step AS integer[]),
                            CAST(:email AS text[]), CAST(:template AS text[]),
                            CAST(:variant AS text[]), CAST(:batch_key AS text[]),
                            CAST(:idempotency_key AS text[]), CAST(:subject AS text[]),
                            CAST(:html AS text[]), CAST(:body_text AS text[]),
                            CAST(:headers AS text[]), CAST(:tags AS text[]))
                    AS r(send_key, user_id, episode_start, step, email, template, variant,
                         batch_key, idempotency_key, subject, html, body_text, headers, tags)
            ),
            taken AS (
                SELECT {mailbox_sql("log.email")} AS mailbox, min(log.user_id) AS user_id
                FROM {s}.email_send_log AS log
                WHERE log.loop_name = :loop AND log.partition_date = :day
                GROUP BY 1
            ),
            judged AS (
                SELECT r.*,
                       coalesce(taken.user_id,
                                CASE WHEN row_number() OVER mailbox > 1
                                     THEN first_value(r.user_id) OVER mailbox END) AS holder
                FROM incoming AS r LEFT JOIN taken ON taken.mailbox = r.mailbox
                WINDOW mailbox AS (PARTITION BY r.mailbox ORDER BY r.send_key)
            )
            INSERT INTO {s}.email_send_log (send_key, loop_name, user_id, episode_start, step,
                partition_date, email, template, variant, batch_key, idempotency_key, subject,
                html, body_text, headers, tags, status, error, send_shard)
            SELECT r.send_key, :loop, r.user_id, r.episode_start, r.step, :day, r.email,
                   r.template, r.variant, r.batch_key, r.idempotency_key, r.subject, r.html,
                   r.body_text, CAST(r.headers AS jsonb), CAST(r.tags AS jsonb),
                   CASE WHEN r.holder IS NULL THEN 'claimed' ELSE 'failed' END,
                   'not sent: the address already has this loop''s email of the day, as user '
                       || r.holder,
                   :shard
            FROM judged AS r
            ORDER BY r.send_key
            ON CONFLICT DO NOTHING
            RETURNING status"""),
        {"loop": loop_name, "day": day, "shard": shard.index, **columns},
    )
    return list(inserted.scalars()).count("claimed")


def claim_rows(
    connection: Connection,
    *,
    config: RetentionConfig,
    loop: Loop,
    day: date,
    rows: Sequence[Mapping[str, Any]],
    unsubscribe_secret: str,
    shard: Shard,
) -> int:
    """Render the audience `rows` of `day` (`compose_emails`) and claim them (`claim`), in the
    caller's transaction; return how many emails are newly to be sent."""
    schema = config.database.schema_
    emails = compose_emails(
        connection,
        schema=schema,
        config=config,
        loop=loop,
        day=day,
        unsubscribe_secret=unsubscribe_secret,
        rows=rows,
    )
    return claim(
        connection,
        schema=schema,
        loop_name=loop.name,
        day=day,
        emails=emails,
        audience_rows=rows,
        shard=shard,
    )


def pending_batch_keys(
    connection: Connection, *, schema: str, loop_name: str, shard: Shard = WHOLE_LOOP
) -> list[str]:
    """The batches of the loop's `shard` with rows still claimed, oldest first."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return list(
        connection.execute(
            text(f"""
                SELECT batch_key FROM {s}.email_send_log
                WHERE loop_name = :loop AND status = 'claimed' AND {row_in_shard("send_shard")}
                GROUP BY batch_key
                ORDER BY min(partition_date), min(id)"""),
            {"loop": loop_name, **shard.params},
        ).scalars()
    )


def record_members_gone(
    connection: Connection, *, config: RetentionConfig, loop_name: str, batch_key: str
) -> int:
    """Record for erasure the batch's claimed members whom the app's users table no longer has
    or now excludes (an account disabled a minute ago), in the caller's transaction, so the
    batch's `start_batch` right after withholds them; return how many were newly recorded."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    return record_users_gone(
        connection,
        config,
        f"""SELECT DISTINCT user_id FROM {s}.email_send_log
            WHERE loop_name = :loop AND batch_key = :batch AND status = 'claimed'""",
        {"loop": loop_name, "batch": batch_key},
        probe_key=True,
    )


@dataclass(frozen=True)
class StartedBatch:
    """A batch as it goes out: the members still to send, and the members withheld."""

    batch_key: str
    idempotency_key: str | None
    """Fixed at the claim; None only when no member is left to send."""
    emails: list[OutgoingEmail]
    """In send-key order, rebuilt from the stored content."""
    withheld: Counter[tuple[date, str]] = field(default_factory=Counter)
    """Members failed instead of sent, by partition day and reason: 'suppressed' or 'erased'."""
    first_attempt_at: datetime | None = None
    """When this start stamped the batch attempted, where no request for it was made before;
    None otherwise."""


def start_batch(
    connection: Connection,
    *,
    schema: str,
    loop_name: str,
    batch_key: str,
    loops_configured: Sequence[str],
    now: datetime | None = None,
) -> StartedBatch:
    """Move the batch's claimed rows towards the provider, in one statement in the caller's
    transaction: fail those whose address is suppressed (for this loop, every loop, or a loop
    not among `loops_configured`: `covers_loop_sql`) or whose user is waiting to be erased,
    and, in a batch never attempted, those stale at `now` (default: the database's clock):
    claimed by an hourly send that never got to send them, their audience row's `stale_at` has
    passed (`sending.due`; a batch attempted before keeps its members, as the provider may have
    them). Mark the others attempted and return them to send.

    From the first attempt on, the provider may have the batch, and after its idempotency window
    `expire_unanswered` stops re-sending it. `headers` and `tags` come back with their keys
    sorted: jsonb does not keep key order, and the payload of a re-sent batch must not depend on it.
    """
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    # One statement, one snapshot: what is withheld and what is sent are decided together.
    # `log.status = 'claimed'` again in each UPDATE: a row settled by another sender meanwhile is
    # re-read after its lock and left alone.
    mailbox = mailbox_sql("log.email")
    loops = "CAST(:configured_loops AS text[])"
    rows = connection.execute(
        text(f"""
            WITH members AS (
                SELECT log.id,
                       EXISTS (SELECT FROM {s}.erased_users AS erased
                               WHERE erased.user_id = log.user_id) AS erased,
                       coalesce(
                           {mailbox_suppression_reason_sql(s, mailbox, "log.loop_name", loops)},
                           {hashed_suppression_reason_sql(s, mailbox, "log.loop_name", loops)},
                           {personal_suppression_sql(s, "log.user_id", "log.loop_name", loops)})
                           AS suppressed,
                       log.first_attempt_at IS NULL AS never_attempted,
                       log.first_attempt_at IS NULL AND EXISTS (
                           SELECT FROM {s}.reengagement_audience AS a
                           WHERE a.partition_date = log.partition_date
                             AND a.loop_name = log.loop_name AND a.user_id = log.user_id
                             AND a.episode_start = log.episode_start AND a.step = log.step
                             AND a.stale_at <= coalesce(CAST(:now AS timestamptz), now())
                       ) AS stale
                FROM {s}.email_send_log AS log
                WHERE log.loop_name = :loop AND log.batch_key = :batch AND log.status = 'claimed'
            ),
            withheld AS (
                UPDATE {s}.email_send_log AS log
                SET status = 'failed', updated_at = now(),
                    error = CASE WHEN m.erased THEN 'the user was erased'
                                     || ' after the email was claimed: not sent'
                                 WHEN m.suppressed IS NOT NULL
                                 THEN 'the address was suppressed (' || m.suppressed || ')'
                                     || ' after the email was claimed: not sent'
                                 ELSE 'not sent within email.max_delay of its local send time '
                                     || 'after it was claimed: skipped, never sent late' END
                            || CASE WHEN log.first_attempt_at IS NOT NULL
                                    THEN ' again (an earlier request for its batch, its outcome '
                                         || 'unknown, may have delivered it before)'
                                    ELSE '' END
                FROM members AS m
                WHERE log.id = m.id AND log.status = 'claimed'
                  AND (m.erased OR m.suppressed IS NOT NULL OR m.stale)
                RETURNING log.partition_date, CASE WHEN m.erased THEN 'erased'
                                                   WHEN m.suppressed IS NOT NULL THEN 'suppressed'
                                                   ELSE 'stale' END AS withheld
            ),
            started AS (
                UPDATE {s}.email_send_log AS log
                SET first_attempt_at = coalesce(log.first_attempt_at, now()), updated_at = now()
                FROM members AS m
                WHERE log.id = m.id AND log.status = 'claimed'
                  AND NOT m.erased AND m.suppressed IS NULL AND NOT m.stale
                RETURNING log.send_key, log.email, log.subject, log.html, log.body_text,
                          log.headers, log.tags, log.idempotency_key,
                          CASE WHEN m.never_attempted THEN log.first_attempt_at END
                              AS stamped_at
            )
            SELECT partition_date, withheld, NULL AS send_key, NULL AS email, NULL AS subject,
                   NULL AS html, NULL AS body_text, NULL::jsonb AS headers, NULL::jsonb AS tags,
                   NULL AS idempotency_key, NULL::timestamptz AS stamped_at
            FROM withheld
            UNION ALL
            SELECT NULL, NULL, send_key, email, subject, html, body_text, headers, tags,
                   idempotency_key, stamped_at
            FROM started"""),
        {
            "loop": loop_name,
            "batch": batch_key,
            "now": now,
            "configured_loops": list(loops_configured),
        },
    ).mappings()
    withheld: Counter[tuple[date, str]] = Counter()
    emails: list[OutgoingEmail] = []
    idempotency_key: str | None = None
    stamps = set()
    for row in rows:
        if row["withheld"] is not None:
            withheld[(row["partition_date"], row["withheld"])] += 1
            continue
        idempotency_key = row["idempotency_key"]
        stamps.add(row["stamped_at"])
        emails.append(
            OutgoingEmail(
                key=row["send_key"],
                to=row["email"],
                subject=row["subject"],
                html=row["html"],
                text=row["body_text"],
                headers=dict(sorted(row["headers"].items())),
                tags=dict(sorted(row["tags"].items())),
            )
        )
    return StartedBatch(
        batch_key=batch_key,
        idempotency_key=idempotency_key,
        emails=sorted(emails, key=lambda email: email.key),
        withheld=withheld,
        # One stamp for every member, or a member attempted before: then the batch was.
        first_attempt_at=next(iter(stamps)) if len(stamps) == 1 else None,
    )


def record(
    connection: Connection,
    *,
    schema: str,
    results: Sequence[SendResult],
    provider: str,
    first_attempt_at: datetime | None = None,
) -> Counter[tuple[date, str]]:
    """Record what the sender said, in the caller's transaction; return how many rows this call
    changed, by partition day and new status.

    Sent: status 'sent' with the provider's id and `sent_at`. Failed: status 'failed' with the
    error, final. Failed but retryable: still 'claimed', with the error, to be re-sent in its batch.
    Where the batch's first attempt (stamped at `first_attempt_at` by `start_batch`) was
    certainly not delivered (`SendResult.undelivered`), its stamp is unset again, unless another
    sender started the batch since (which sets `updated_at`): the batch is as never sent, so
    `expire_unanswered` does not fail it as perhaps delivered, and `start_batch` withholds it
    once stale. Every result counts an attempt. Rows no longer claimed are left alone, so a late
    or repeated result never undoes an outcome, and is not counted: a batch another sender
    settled first counts once, for that sender.
    """
    if not results:
        return Counter()
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    changed = connection.execute(
        text(f"""
            UPDATE {s}.email_send_log AS log
            SET status = r.status,
                provider = :provider,
                provider_id = r.provider_id,
                error = r.error,
                attempts = log.attempts + 1,
                sent_at = CASE WHEN r.status = 'sent' THEN now() END,
                -- `updated_at` still the start's: no other sender started the batch since.
                first_attempt_at = CASE
                    WHEN r.never_sent AND log.updated_at = CAST(:stamped_at AS timestamptz)
                    THEN NULL ELSE log.first_attempt_at END,
                updated_at = now()
            FROM unnest(CAST(:keys AS text[]), CAST(:statuses AS text[]),
                        CAST(:provider_ids AS text[]), CAST(:errors AS text[]),
                        CAST(:never_sent AS boolean[]))
                AS r(send_key, status, provider_id, error, never_sent)
            WHERE log.send_key = r.send_key AND log.status = 'claimed'
            RETURNING log.partition_date, log.status"""),
        {
            "provider": provider,
            "keys": [result.key for result in results],
            "statuses": [_status(result) for result in results],
            "provider_ids": [result.provider_id for result in results],
            "errors": [result.error for result in results],
            "never_sent": [result.retryable and result.undelivered for result in results],
            "stamped_at": first_attempt_at,
        },
    )
    counts = Counter((day, status) for day, status in changed.all())
    link_early_events(
        connection,
        schema=schema,
        send_keys=[result.key for result in results if result.status == "sent"],
    )
    return counts


def expire_unanswered(
    connection: Connection,
    *,
    schema: str,
    loop_name: str,
    older_than: timedelta,
    shard: Shard = WHOLE_LOOP,
) -> Counter[date]:
    """Give up on the batches of the loop's `shard` first sent longer ago than the provider
    remembers idempotency keys and still not confirmed: re-sending them could deliver twice, so
    they fail instead. Returns how many rows, by partition day."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    changed = connection.execute(
        text(f"""
            UPDATE {s}.email_send_log
            SET status = 'failed', updated_at = now(),
                error = 'not confirmed since its first send at ' || first_attempt_at
                        || '; not re-sent, since the idempotency key has expired and the email '
                        || 'may have been delivered'
            WHERE loop_name = :loop AND status = 'claimed' AND {row_in_shard("send_shard")}
              AND first_attempt_at < now() - CAST(:older_than AS interval)
            RETURNING partition_date"""),
        {"loop": loop_name, "older_than": older_than, **shard.params},
    )
    return Counter(changed.scalars())


def send_log_summary(
    connection: Connection, *, schema: str, loop_name: str, day: date
) -> dict[str, int]:
    """How many of the loop's emails for `day` are in each status (every status, zeros too)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    counts = dict(
        connection.execute(
            text(f"""
                SELECT status, count(*) FROM {s}.email_send_log
                WHERE loop_name = :loop AND partition_date = :day
                GROUP BY status"""),
            {"loop": loop_name, "day": day},
        ).all()
    )
    return {status: int(counts.get(status, 0)) for status in STATUSES}


def days_with_emails(
    connection: Connection, *, schema: str, loop_name: str, first: date, last: date
) -> list[date]:
    """The audience days from `first` to `last` for which the loop claimed emails."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return list(
        connection.execute(
            text(f"""
                SELECT DISTINCT partition_date FROM {s}.email_send_log
                WHERE loop_name = :loop AND partition_date BETWEEN :first AND :last
                ORDER BY partition_date"""),
            {"loop": loop_name, "first": first, "last": last},
        ).scalars()
    )


def _status(result: SendResult) -> str:
    if result.status == "sent":
        return "sent"
    return "claimed" if result.retryable else "failed"
