"""Helpers of the sending tests: a database with the pipeline's schema, audience rows written
directly with SQL, and a fake Resend that answers slowly (or not until told to)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import resend
from sqlalchemy import Engine, text

from retention_pipeline.config import RetentionConfig
from retention_pipeline.database.day_partitions import ensure_day_partition
from retention_pipeline.email.message import OutgoingEmail, SendResult
from retention_pipeline.email.resend_sender import ResendSender
from retention_pipeline.sending import claim, compose_emails
from retention_pipeline_tests.email.fake_resend import FakeClock, FakeResend

DAY = date(2026, 11, 20)
LOOP = "re_engagement"
SCHEMA = "retention"
SECRET = "unsubscribe-secret-for-tests"
API_KEY = "re_test_SECRET_key_42"
FROM = "Acme <hello@acme.test>"


@dataclass(frozen=True)
class SendingDatabase:
    engine: Engine
    config: RetentionConfig
    url: str


@dataclass(frozen=True)
class User:
    user_id: str
    email: str
    name: str | None = "Ada Lovelace"
    step: int = 0
    arm: str = "treatment"
    variant: str = "a"
    timezone: str | None = "UTC"
    last_activity_at: datetime | None = datetime(2026, 11, 11, 10, 0, tzinfo=UTC)
    last_actions: tuple[str, ...] = ("report.exported", "project_created")


def users(count: int, *, start: int = 0, **fields: Any) -> list[User]:
    """`count` treated users, ids zero-padded so their order is their number's."""
    return [
        User(user_id=f"u{n:05d}", email=f"user{n}@example.com", **fields)
        for n in range(start, start + count)
    ]


def add_users(engine: Engine, people: Sequence[User], *, day: date = DAY) -> None:
    """Write each user's snapshot row and audience row for `day`, as the daily assets would,
    and the user's row in the app's users table (its ids made text, as these are, and an email
    allowed twice), which each batch of a send run reads to withhold the users the app deleted
    or excludes."""
    snapshot = []
    audience = []
    for person in people:
        at = person.last_activity_at.isoformat() if person.last_activity_at else None
        actions = [{"name": name, "at": at} for name in person.last_actions]
        snapshot.append(
            {
                "day": day,
                "user_id": person.user_id,
                "email": person.email,
                "name": person.name,
                "timezone": person.timezone,
                "signed_up_at": datetime(2026, 1, 5, tzinfo=UTC),
                "last_activity_at": person.last_activity_at,
                "last_actions": json.dumps(actions),
            }
        )
        audience.append(
            {
                "day": day,
                "loop": LOOP,
                "user_id": person.user_id,
                "email": person.email,
                # Step n is due `delay` days into the episode: 0, 3 and 7 in the shipped loop.
                "episode_start": day - timedelta(days=(0, 3, 7)[person.step]),
                "step": person.step,
                "template": (
                    "re_engagement",
                    "re_engagement_follow_up",
                    "re_engagement_last_call",
                )[person.step],
                "arm": person.arm,
                "variant": person.variant,
            }
        )
    with engine.begin() as connection:
        connection.execute(
            text("""
                DO $$ BEGIN
                    IF (SELECT atttypid <> 'text'::regtype FROM pg_attribute
                        WHERE attrelid = 'public.users'::regclass AND attname = 'id') THEN
                        ALTER TABLE public.users ALTER id DROP IDENTITY IF EXISTS;
                        -- Tests give two users one mailbox.
                        ALTER TABLE public.users ALTER id TYPE text,
                                                 DROP CONSTRAINT IF EXISTS users_email_key;
                    END IF;
                END $$""")
        )
        connection.execute(
            text("""
                INSERT INTO public.users (id, email, name, timezone, created_at)
                VALUES (:user_id, :email, :name, :timezone, :signed_up_at)
                ON CONFLICT DO NOTHING"""),
            snapshot,
        )
        ensure_day_partition(connection, SCHEMA, "user_activity_snapshot", day)
        connection.execute(
            text("""
                INSERT INTO retention.user_activity_snapshot (partition_date, user_id, email,
                    name, timezone, signed_up_at, account_age_days, last_activity_at, active_today,
                    last_actions, events_7d, sessions_7d, baseline_sessions_per_week,
                    active_days_28d)
                VALUES (:day, :user_id, :email, :name, :timezone, :signed_up_at, 300,
                        :last_activity_at, false, CAST(:last_actions AS jsonb), 0, 0, 0, 0)"""),
            snapshot,
        )
        connection.execute(
            text("""
                INSERT INTO retention.reengagement_audience (partition_date, loop_name, user_id,
                    email, episode_start, step, template, arm, variant)
                VALUES (:day, :loop, :user_id, :email, :episode_start, :step, :template, :arm,
                        :variant)"""),
            audience,
        )


def compose_and_claim(db: SendingDatabase, *, day: date = DAY) -> int:
    """What the send job does before sending: compose the day's emails and claim them."""
    loop = db.config.loop(LOOP)
    with db.engine.begin() as connection:
        emails = compose_emails(
            connection,
            schema=SCHEMA,
            config=db.config,
            loop=loop,
            day=day,
            unsubscribe_secret=SECRET,
        )
        # Without audience rows, claim pairs the emails with the day's treatment rows itself.
        return claim(connection, schema=SCHEMA, loop_name=LOOP, day=day, emails=emails)


def statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return dict(
            connection.execute(
                text("SELECT status, count(*) FROM retention.email_send_log GROUP BY status")
            ).all()
        )


def make_sender(clock: FakeClock | None = None, **overrides: Any) -> ResendSender:
    """A sender that waits on `clock` (a fake one: no real waiting) and is otherwise unpaced."""
    clock = clock or FakeClock()
    options: dict[str, Any] = {"sleep": clock.sleep, "clock": clock, "requests_per_second": 1e6}
    options.update(overrides)
    return ResendSender(API_KEY, FROM, **options)


class ActingAfterFirstRequest:
    """A `ResendSender` that runs `action` once its first request is answered: an unsubscribe,
    an erasure or a lost lock landing while the send run is underway, its first batch sent."""

    def __init__(self, sender: ResendSender, action: Callable[[], None]) -> None:
        self._sender = sender
        self._action: Callable[[], None] | None = action

    def send(self, emails: Sequence[OutgoingEmail], **options: str | None) -> list[SendResult]:
        results = self._sender.send(emails, **options)
        if self._action is not None:
            self._action()
            self._action = None
        return results


class SlowFakeResend(FakeResend):
    """A fake Resend that answers each request `response_delay` seconds after it recorded the
    delivery, like a slow network on the way back.

    With `hold_at_delivered`, the answer to the request that brings the deliveries to that count
    is held until `release` is set, and `holding` is set meanwhile: the emails are accepted, but
    the client has not heard so, which is the moment a crash is most dangerous.
    """

    def __init__(self, response_delay: float = 0.0, hold_at_delivered: int | None = None) -> None:
        super().__init__()
        self.response_delay = response_delay
        self.hold_at_delivered = hold_at_delivered
        self.holding = threading.Event()
        self.release = threading.Event()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        send_response = handler.send_response

        def answer_late(*args: Any, **kwargs: Any) -> None:
            if (
                self.hold_at_delivered is not None
                and self.delivered_count >= self.hold_at_delivered
                and not self.release.is_set()
            ):
                self.holding.set()
                self.release.wait(timeout=60)
            elif self.response_delay:
                time.sleep(self.response_delay)
            send_response(*args, **kwargs)

        handler.send_response = answer_late  # type: ignore[method-assign]
        # The client may have been killed while it waited for the answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super()._handle(handler)


@contextmanager
def serving(fake: FakeResend, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeResend]:
    """Run `fake` with the SDK, and child processes through RESEND_API_URL, pointed at it."""
    fake.start()
    monkeypatch.setattr(resend, "api_url", fake.url)
    monkeypatch.setenv("RESEND_API_URL", fake.url)
    try:
        yield fake
    finally:
        if isinstance(fake, SlowFakeResend):
            fake.release.set()
        fake.close()
