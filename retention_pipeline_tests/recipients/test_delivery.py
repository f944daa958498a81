"""Delivery events without HTTP: parsing, storing once, events that beat the send run, and
emails Resend did not send."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import text

from retention_pipeline.database import migrate
from retention_pipeline.email.message import SendResult
from retention_pipeline.recipients.delivery import InvalidEventError, parse_event, store_event
from retention_pipeline.sending import record
from retention_pipeline_tests.sending.support import (
    SCHEMA,
    SendingDatabase,
    User,
    add_users,
    compose_and_claim,
)

KEY = "re_engagement:u1:2026-11-20:0"


def event(kind: str, email_id: str = "re-1", **data) -> dict:
    return {
        "type": kind,
        "created_at": "2026-11-20T09:00:00Z",
        "data": {"email_id": email_id, "to": ["Ada@Example.com"], **data},
    }


def test_an_event_that_arrives_before_the_run_records_the_id_is_linked_then(
    sending_db: SendingDatabase,
) -> None:
    add_users(sending_db.engine, [User("u1", "Ada@Example.com")])
    compose_and_claim(sending_db)

    with sending_db.engine.begin() as connection:
        early = store_event(
            connection, schema=SCHEMA, event=parse_event("msg_1", event("email.delivered"))
        )
        record(
            connection,
            schema=SCHEMA,
            results=[SendResult(KEY, "sent", "re-1")],
            provider="resend",
        )

    assert (early.outcome, early.send_log_id) == ("stored", None)
    with sending_db.engine.connect() as connection:
        assert connection.execute(
            text(
                "SELECT log.last_event, log.last_event_at, event.send_log_id = log.id "
                "FROM retention.email_send_log AS log, retention.email_events AS event"
            )
        ).one() == ("delivered", datetime(2026, 11, 20, 9, tzinfo=UTC), True)


def test_events_the_pipeline_does_not_keep_and_malformed_ones() -> None:
    assert parse_event("m", {"type": "domain.updated", "data": {}}) is None
    assert parse_event("m", event("email.received")) is None
    with pytest.raises(InvalidEventError, match="email.bounced: data.email_id is missing"):
        parse_event("m", {"type": "email.bounced", "data": {}})
    with pytest.raises(InvalidEventError, match="created_at is not a timestamp: 'yesterday'"):
        parse_event("m", {**event("email.opened"), "created_at": "yesterday"})
    bounce = parse_event(
        "m",
        event("email.bounced", bounce={"type": "Transient", "subType": "MailboxFull"}),
    )
    assert bounce.suppression_reason is None
    assert bounce.detail == {"bounce_type": "Transient", "bounce_subtype": "MailboxFull"}


def test_an_email_resend_suppressed_holds_back_its_mailbox_and_survives_a_downgrade_as_failed(
    sending_db: SendingDatabase,
) -> None:
    """Resend accepts an email to an address on the account's suppression list, then does not
    send it: the list may hold it after a complaint about another email of the account."""
    add_users(sending_db.engine, [User("u1", "Ada@Example.com")])
    compose_and_claim(sending_db)
    suppressed = event(
        "email.suppressed",
        suppressed={"type": "OnAccountSuppressionList", "message": "on the account's list"},
    )
    with sending_db.engine.begin() as connection:
        record(
            connection,
            schema=SCHEMA,
            results=[SendResult(KEY, "sent", "re-1")],
            provider="resend",
        )
        stored = store_event(connection, schema=SCHEMA, event=parse_event("msg_1", suppressed))

    assert stored.suppressed == ("ada@example.com",)
    with sending_db.engine.begin() as connection:
        assert connection.execute(
            text("SELECT user_id, reason, loop_name FROM retention.email_suppressions")
        ).one() == ("u1", "bounced", None)
        command.downgrade(migrate._alembic_config(connection, SCHEMA), "0028")
    with sending_db.engine.begin() as connection:
        assert connection.execute(
            text(
                "SELECT log.last_event, event.event_type, event.detail->>'suppressed_type' "
                "FROM retention.email_send_log AS log "
                "JOIN retention.email_events AS event ON event.send_log_id = log.id"
            )
        ).one() == ("failed", "failed", "OnAccountSuppressionList")
        command.upgrade(migrate._alembic_config(connection, SCHEMA), "head")
