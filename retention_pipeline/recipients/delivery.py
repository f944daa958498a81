"""What happened to sent emails after Resend accepted them: its webhook events, stored once per
delivery id against the send-log row they belong to, and the suppressions they call for.

A hard bounce (Resend's bounce type `Permanent`) or a complaint suppresses the address for every
loop at once; so does an email Resend suppressed (it did not send it, since the address is on the
account's own suppression list, after a hard bounce or a complaint from any of the account's
emails, or added by hand), as a bounce: the mailbox's, not the person's. Opens are stored and
counted, never taken as success: Apple Mail Privacy Protection and image proxies open every
email they receive.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from sqlalchemy import Connection, text

from retention_pipeline.recipients.addresses import mailbox_of, mailbox_sql, sha256_sql
from retention_pipeline.recipients.suppressions import suppress, suppress_hashed_mailbox

EVENT_TYPES = (
    "sent",
    "delivered",
    "delivery_delayed",
    "bounced",
    "complained",
    "opened",
    "clicked",
    "failed",
    "suppressed",
)
"""Resend's `email.*` events the pipeline keeps, without the `email.` prefix."""

REPORTED_EVENTS = ("delivered", "bounced", "complained", "suppressed", "opened", "clicked")
"""What the send log's metadata counts per day: emails with at least one such event."""


class InvalidEventError(ValueError):
    """A verified webhook payload that is not the Resend email event it claims to be."""


@dataclass(frozen=True)
class DeliveryEvent:
    delivery_id: str
    """The webhook delivery's `svix-id`: the same for every retry of one delivery."""
    event_type: str
    provider_email_id: str
    occurred_at: datetime
    recipients: tuple[str, ...]
    detail: dict[str, str] = field(default_factory=dict)
    """Bounce type and message, failure reason, Resend's suppression type and message, clicked
    link; never the clicker's IP or agent."""

    @property
    def suppression_reason(self) -> str | None:
        if self.event_type == "complained":
            return "complained"
        if self.event_type == "bounced" and self.detail.get("bounce_type") == "Permanent":
            return "bounced"
        if self.event_type == "suppressed":
            return "bounced"
        return None


@dataclass(frozen=True)
class StoredEvent:
    outcome: Literal["stored", "duplicate"]
    send_log_id: int | None
    suppressed: tuple[str, ...]
    """Addresses this event newly suppressed."""


def parse_event(delivery_id: str, payload: Any) -> DeliveryEvent | None:
    """The delivery event in a verified webhook payload; None for an event type the pipeline
    does not keep (contacts, domains, inbound email, ...). A one-line `InvalidEventError` when
    the payload does not hold what its type promises."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("type"), str):
        raise InvalidEventError("the payload is not a Resend event (no type)")
    kind = payload["type"]
    if not kind.startswith("email.") or kind.removeprefix("email.") not in EVENT_TYPES:
        return None
    data = payload.get("data")
    if not isinstance(data, Mapping) or not isinstance(data.get("email_id"), str):
        raise InvalidEventError(f"{kind}: data.email_id is missing")
    recipients = data.get("to") or []
    if isinstance(recipients, str):
        recipients = [recipients]
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise InvalidEventError(f"{kind}: data.to is not a list of addresses")
    return DeliveryEvent(
        delivery_id=delivery_id,
        event_type=kind.removeprefix("email."),
        provider_email_id=data["email_id"],
        occurred_at=_timestamp(kind, payload.get("created_at") or data.get("created_at")),
        recipients=tuple(recipients),
        detail=_detail(data),
    )


def store_event(connection: Connection, *, schema: str, event: DeliveryEvent) -> StoredEvent:
    """Store `event` once, in the caller's transaction: a delivery id seen before changes
    nothing. Links it to the send-log row of its email, moves that row's last event forward, and
    suppresses the recipients of a hard bounce or a complaint."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    emailed = connection.execute(
        text(f"""SELECT id, user_id, email = '' AS erased FROM {s}.email_send_log
                 WHERE provider_id = :email_id"""),
        {"email_id": event.provider_email_id},
    ).one_or_none()
    send_log_id, user_id, erased = emailed if emailed else (None, None, False)
    # An event of an erased user's email keeps nothing that names them: a bounce message may
    # quote the address, and the list holds their mailbox by its hash alone, without the user.
    detail = {} if erased else event.detail
    inserted = connection.execute(
        text(f"""
            INSERT INTO {s}.email_events (svix_id, event_type, provider_email_id, send_log_id,
                                          occurred_at, detail)
            VALUES (:delivery_id, :event_type, :email_id, :send_log_id, :occurred_at,
                    CAST(:detail AS jsonb))
            ON CONFLICT (svix_id) DO NOTHING
            RETURNING true"""),
        {
            "delivery_id": event.delivery_id,
            "event_type": event.event_type,
            "email_id": event.provider_email_id,
            "send_log_id": send_log_id,
            "occurred_at": event.occurred_at,
            "detail": json.dumps(detail),
        },
    ).scalar_one_or_none()
    if not inserted:
        return StoredEvent("duplicate", send_log_id, ())
    if send_log_id is not None:
        connection.execute(
            text(f"""
                UPDATE {s}.email_send_log
                SET last_event = :event_type, last_event_at = :occurred_at, updated_at = now()
                WHERE id = :id AND (last_event_at IS NULL OR last_event_at <= :occurred_at)"""),
            {"id": send_log_id, "event_type": event.event_type, "occurred_at": event.occurred_at},
        )
    suppressed: list[str] = []
    reason = event.suppression_reason
    for recipient in event.recipients if reason else ():
        address = mailbox_of(recipient)
        if not address:
            continue
        if erased:
            suppress_hashed_mailbox(
                connection,
                schema=schema,
                mailbox_sha256=connection.execute(
                    text(f"SELECT {sha256_sql(mailbox_sql('CAST(:email AS text)'))}"),
                    {"email": recipient},
                ).scalar_one(),
                reason=reason,
                source=f"resend_webhook:{event.event_type}",
                loop_name=None,
            )
        elif suppress(
            connection,
            schema=schema,
            email=recipient,
            reason=reason,
            source=f"resend_webhook:{event.event_type}",
            user_id=user_id,
        ):
            suppressed.append(address)
    return StoredEvent("stored", send_log_id, tuple(suppressed))


def link_early_events(connection: Connection, *, schema: str, send_keys: Sequence[str]) -> None:
    """Link to these just-recorded send-log rows the events that arrived before the send run
    stored Resend's id (a webhook can beat the run's own bookkeeping), and set their last
    event."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    connection.execute(
        text(f"""
            WITH linked AS (
                UPDATE {s}.email_events AS event SET send_log_id = log.id
                FROM {s}.email_send_log AS log
                WHERE event.send_log_id IS NULL AND event.provider_email_id = log.provider_id
                  AND log.send_key = ANY(CAST(:keys AS text[]))
                RETURNING event.send_log_id, event.event_type, event.occurred_at
            ),
            latest AS (
                SELECT DISTINCT ON (send_log_id) * FROM linked
                ORDER BY send_log_id, occurred_at DESC
            )
            UPDATE {s}.email_send_log AS log
            SET last_event = latest.event_type, last_event_at = latest.occurred_at
            FROM latest
            WHERE log.id = latest.send_log_id
              AND (log.last_event_at IS NULL OR log.last_event_at <= latest.occurred_at)"""),
        {"keys": list(send_keys)},
    )


def delivery_counts(
    connection: Connection, *, schema: str, loop_name: str, days: Sequence[date]
) -> dict[date, dict[str, int]]:
    """Per audience day, how many of the loop's emails had each of `REPORTED_EVENTS` (an email
    opened five times counts once), zeros included."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""
            SELECT log.partition_date, event.event_type, count(DISTINCT log.id)
            FROM {s}.email_send_log AS log
            JOIN {s}.email_events AS event ON event.send_log_id = log.id
            WHERE log.loop_name = :loop AND log.partition_date = ANY(CAST(:days AS date[]))
              AND event.event_type = ANY(CAST(:types AS text[]))
            GROUP BY log.partition_date, event.event_type"""),
        {"loop": loop_name, "days": list(days), "types": list(REPORTED_EVENTS)},
    ).all()
    counts = {day: dict.fromkeys(REPORTED_EVENTS, 0) for day in days}
    for day, event_type, count in rows:
        counts[day][event_type] = int(count)
    return counts


def _timestamp(kind: str, value: Any) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEventError(f"{kind}: created_at is not a timestamp: {value!r}") from None
    if moment.tzinfo is None:
        raise InvalidEventError(f"{kind}: created_at has no time zone: {value!r}")
    return moment


def _detail(data: Mapping[str, Any]) -> dict[str, str]:
    detail: dict[str, str] = {}
    for section, fields in (
        ("bounce", {"type": "bounce_type", "subType": "bounce_subtype", "message": "bounce"}),
        ("failed", {"reason": "failure"}),
        ("suppressed", {"type": "suppressed_type", "message": "suppressed"}),
        ("click", {"link": "link"}),
    ):
        values = data.get(section)
        if isinstance(values, Mapping):
            detail.update({name: str(values[key]) for key, name in fields.items() if key in values})
    return detail
