"""`retention-pipeline serve` over real HTTP: uvicorn on a loopback port, PostgreSQL behind it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.email.unsubscribe import make_token
from retention_pipeline_tests.sending.support import LOOP, SCHEMA, SECRET, SendingDatabase
from retention_pipeline_tests.web.support import (
    OTHER_WEBHOOK_SECRET,
    WEBHOOK_SECRET,
    call,
    resend_event,
    serving,
    signed,
)


def rows(db: SendingDatabase, query: str) -> list[tuple]:
    with db.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(query))]


def events(db: SendingDatabase) -> list[tuple]:
    return rows(
        db,
        "SELECT svix_id, event_type, provider_email_id, send_log_id IS NOT NULL "
        "FROM retention.email_events ORDER BY received_at, svix_id",
    )


def last_events(db: SendingDatabase) -> dict[str, str | None]:
    return dict(
        rows(db, "SELECT user_id, last_event FROM retention.email_send_log ORDER BY user_id")
    )


def suppressions(db: SendingDatabase) -> list[tuple]:
    return rows(
        db,
        "SELECT email, user_id, reason, loop_name FROM retention.email_suppressions "
        "ORDER BY email, loop_name",
    )


def post_event(server: str, body: bytes, headers: dict[str, str]):
    return call(server, "POST", "/webhooks/resend", body, headers)


def test_a_signed_event_delivered_three_times_is_stored_once(
    server: str, emailed: SendingDatabase
) -> None:
    body, headers = signed(
        resend_event("email.delivered", "re-email-of-u1", "Ada@Example.com"), "msg_delivered_1"
    )

    answers = [post_event(server, body, headers) for _ in range(3)]

    assert [(a.status, json.loads(a.body)) for a in answers] == [
        (200, {"status": "stored"}),
        (200, {"status": "duplicate"}),
        (200, {"status": "duplicate"}),
    ]
    assert events(emailed) == [("msg_delivered_1", "delivered", "re-email-of-u1", True)]
    assert last_events(emailed) == {"u1": "delivered", "u2": None}


def test_the_send_log_keeps_the_latest_event_whatever_order_they_arrive_in(
    server: str, emailed: SendingDatabase
) -> None:
    later = resend_event(
        "email.clicked",
        "re-email-of-u1",
        "Ada@Example.com",
        created_at="2026-11-20T10:00:00.000Z",
        click={"link": "https://app.acme.test", "ipAddress": "203.0.113.9", "userAgent": "UA"},
    )
    earlier = resend_event("email.delivered", "re-email-of-u1", "Ada@Example.com")

    assert post_event(server, *signed(later, "msg_click")).status == 200
    assert post_event(server, *signed(earlier, "msg_delivered")).status == 200

    assert last_events(emailed)["u1"] == "clicked"
    with emailed.engine.connect() as connection:
        detail = connection.execute(
            text("SELECT detail FROM retention.email_events WHERE svix_id = 'msg_click'")
        ).scalar_one()
    # Where the reader clicked from is theirs, not ours to keep.
    assert detail == {"link": "https://app.acme.test"}


@pytest.mark.parametrize("attack", ["tampered body", "wrong secret", "ten minutes old"])
def test_forged_or_replayed_events_are_rejected_and_nothing_is_stored(
    server: str, emailed: SendingDatabase, attack: str
) -> None:
    bounce = resend_event(
        "email.bounced",
        "re-email-of-u1",
        "Ada@Example.com",
        bounce={"type": "Permanent", "subType": "General", "message": "550 no such user"},
    )
    body, headers = signed(
        bounce,
        "msg_bounce",
        secret=OTHER_WEBHOOK_SECRET if attack == "wrong secret" else WEBHOOK_SECRET,
        sent_at=time.time() - 600 if attack == "ten minutes old" else None,
    )
    if attack == "tampered body":
        body = body.replace(b"re-email-of-u1", b"re-email-of-u2")

    answer = post_event(server, body, headers)

    assert answer.status == 401
    assert answer.body.startswith("webhook rejected: ")
    assert "\n" not in answer.body.rstrip("\n")
    assert events(emailed) == []
    assert suppressions(emailed) == []
    assert last_events(emailed) == {"u1": None, "u2": None}


def test_unsigned_or_malformed_deliveries_get_a_one_line_4xx(
    server: str, emailed: SendingDatabase
) -> None:
    body, headers = signed(resend_event("email.opened", "re-email-of-u1", "a@b.co"), "msg_1")
    unsigned = {name: value for name, value in headers.items() if name != "svix-signature"}
    not_an_event, not_an_event_headers = signed({"data": {}}, "msg_2")

    missing = post_event(server, body, unsigned)
    assert (missing.status, missing.body) == (400, "missing header svix-signature\n")
    malformed = post_event(server, not_an_event, not_an_event_headers)
    assert (malformed.status, malformed.body) == (
        400,
        "the payload is not a Resend event (no type)\n",
    )
    assert call(server, "GET", "/webhooks/resend").status == 405
    assert events(emailed) == []


def test_a_hard_bounce_or_a_complaint_suppresses_at_once_a_soft_bounce_does_not(
    server: str, emailed: SendingDatabase
) -> None:
    soft = resend_event(
        "email.bounced",
        "re-email-of-u1",
        "Ada@Example.com",
        bounce={"type": "Transient", "subType": "MailboxFull", "message": "mailbox full"},
    )
    hard = resend_event(
        "email.bounced",
        "re-email-of-u1",
        "Ada@Example.com",
        created_at="2026-11-20T09:05:00.000Z",
        bounce={"type": "Permanent", "subType": "General", "message": "550 no such user"},
    )
    complaint = resend_event("email.complained", "re-email-of-u2", "bob@example.com")

    assert post_event(server, *signed(soft, "msg_soft")).status == 200
    assert suppressions(emailed) == []
    assert post_event(server, *signed(hard, "msg_hard")).status == 200
    assert post_event(server, *signed(complaint, "msg_complaint")).status == 200

    assert suppressions(emailed) == [
        ("ada@example.com", "u1", "bounced", None),
        ("bob@example.com", "u2", "complained", None),
    ]
    assert last_events(emailed) == {"u1": "bounced", "u2": "complained"}


def test_events_of_other_kinds_are_acknowledged_and_not_kept(
    server: str, emailed: SendingDatabase
) -> None:
    contact = {"type": "contact.created", "created_at": "2026-11-20T09:00:00Z", "data": {}}

    answer = post_event(server, *signed(contact, "msg_contact"))

    assert (answer.status, json.loads(answer.body)) == (200, {"status": "ignored"})
    assert events(emailed) == []


def test_the_unsubscribe_page_only_asks_and_offers_this_loop_or_every_loop(
    server: str, emailed: SendingDatabase
) -> None:
    token = make_token(SECRET, "u1", LOOP)

    # Link checkers and mail gateways fetch the links they find, with HEAD as often as GET.
    assert call(server, "HEAD", f"/unsubscribe?token={token}").status == 200
    page = call(server, "GET", f"/unsubscribe?token={token}")

    assert page.status == 200
    assert page.headers["referrer-policy"] == "no-referrer"
    assert f'action="?token={token}"' in page.body
    every_loop = make_token(SECRET, "u1", None)
    assert f'action="?token={every_loop}"' in page.body
    assert "Unsubscribe from all Acme emails" in page.body
    assert suppressions(emailed) == []


def test_one_click_post_unsubscribes_from_the_loop_and_repeating_it_is_harmless(
    server: str, emailed: SendingDatabase
) -> None:
    token = make_token(SECRET, "u1", LOOP)
    one_click = {"content-type": "application/x-www-form-urlencoded"}

    answers = [
        call(
            server, "POST", f"/unsubscribe?token={token}", b"List-Unsubscribe=One-Click", one_click
        )
        for _ in range(2)
    ]

    assert [answer.status for answer in answers] == [200, 200]
    assert "You will not receive these emails any more." in answers[1].body
    assert suppressions(emailed) == [("ada@example.com", "u1", "unsubscribed", LOOP)]

    every_loop = make_token(SECRET, "u1", None)
    assert call(server, "POST", f"/unsubscribe?token={every_loop}", b"", one_click).status == 200
    assert ("ada@example.com", "u1", "unsubscribed", None) in suppressions(emailed)


def test_a_link_of_a_loop_renamed_since_unsubscribes_from_every_loop(
    server: str, emailed: SendingDatabase
) -> None:
    """Scoped to a name no loop has any more, the unsubscribe would hold back nobody: the loop,
    renamed, would email the reader again."""
    token = make_token(SECRET, "u1", "old_name")
    one_click = {"content-type": "application/x-www-form-urlencoded"}

    page = call(server, "GET", f"/unsubscribe?token={token}")
    answer = call(server, "POST", f"/unsubscribe?token={token}", b"", one_click)

    assert "Unsubscribe from these emails" not in page.body
    assert answer.status == 200
    assert "You will not receive any email from Acme any more." in answer.body
    assert suppressions(emailed) == [("ada@example.com", "u1", "unsubscribed", None)]


def test_links_signed_before_the_secret_was_rotated_still_unsubscribe(
    emailed: SendingDatabase, tmp_path: Path
) -> None:
    one_click = {"content-type": "application/x-www-form-urlencoded"}
    with serving(
        emailed.engine,
        schema=SCHEMA,
        unsubscribe_secret="the secret after the rotation",
        previous_unsubscribe_secrets=(SECRET,),
        journal=tmp_path / "unsubscribe_journal.jsonl",
    ) as rotated:
        old_link = call(
            rotated, "POST", f"/unsubscribe?token={make_token(SECRET, 'u1', LOOP)}", b"", one_click
        )
        forged = make_token("a secret never configured", "u2", LOOP)
        refused = call(rotated, "POST", f"/unsubscribe?token={forged}", b"", one_click)

    assert old_link.status == 200
    assert refused.status == 400 and "signature does not match" in refused.body
    assert suppressions(emailed) == [("ada@example.com", "u1", "unsubscribed", LOOP)]


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(
    server: str, emailed: SendingDatabase
) -> None:
    forged = make_token("a secret someone guessed", "u1", LOOP)
    chunked_flood = (b"x" * 65536 for _ in range(320))  # 20 MB without a Content-Length

    answers = {
        "forged token": call(server, "POST", f"/unsubscribe?token={forged}", b""),
        "altered token": call(server, "GET", f"/unsubscribe?token={forged[:-2]}xy"),
        "no token": call(server, "POST", "/unsubscribe", b""),
        "100 kB URL": call(server, "GET", "/unsubscribe?token=" + "a" * 100_000),
        "20 MB body": call(server, "POST", "/webhooks/resend", b"{" * 20_000_000),
        "20 MB chunked": call(
            server, "POST", f"/unsubscribe?token={make_token(SECRET, 'u1', LOOP)}", chunked_flood
        ),
        "unknown path": call(server, "GET", "/admin"),
    }

    assert {name: answer.status for name, answer in answers.items()} == {
        "forged token": 400,
        "altered token": 400,
        "no token": 400,
        "100 kB URL": 414,
        "20 MB body": 413,
        "20 MB chunked": 413,
        "unknown path": 404,
    }
    assert "signature does not match" in answers["forged token"].body
    for answer in answers.values():
        assert "Traceback" not in answer.body
    assert suppressions(emailed) == []
    assert call(server, "GET", "/healthz").body == "ok\n"


def test_healthz_says_when_the_database_is_unreachable(
    emailed: SendingDatabase, tmp_path: Path
) -> None:
    nowhere = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")

    with serving(
        nowhere, schema=SCHEMA, unsubscribe_secret=SECRET, journal=tmp_path / "journal.jsonl"
    ) as server:
        answer = call(server, "GET", "/healthz")

    assert (answer.status, answer.body) == (503, "the database is unreachable\n")


def test_each_request_is_one_access_log_line_without_the_token(
    server: str, emailed: SendingDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    token = make_token(SECRET, "u2", LOOP)
    caplog.set_level(logging.INFO)

    call(server, "POST", f"/unsubscribe?token={token}", b"List-Unsubscribe=One-Click")

    (access,) = [r for r in caplog.records if r.name == "retention_pipeline.web.access"]
    assert access.fields["method"] == "POST"
    assert access.fields["path"] == "/unsubscribe"
    assert access.fields["status"] == 200
    logged = " ".join(str(record.__dict__) for record in caplog.records)
    assert token not in logged and SECRET not in logged and WEBHOOK_SECRET not in logged
