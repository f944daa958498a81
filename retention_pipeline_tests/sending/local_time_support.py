"""Helpers of the local-time sending tests: a loop sending at a local time, its audience built by
the real audience build from snapshot rows, and an hourly tick driven through the send run's
`now`."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, text

from retention_pipeline.audience.build import build_audience
from retention_pipeline.config import RetentionConfig, parse_config
from retention_pipeline.sending import SendRunReport, send_loop_day
from retention_pipeline.sending.shards import WHOLE_LOOP, Shard
from retention_pipeline_tests.email.fake_resend import FakeResend
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT
from retention_pipeline_tests.sending.support import (
    LOOP,
    SECRET,
    SendingDatabase,
    User,
    add_users,
    make_sender,
)

# The zones of the proof: the earliest and latest on Earth, two off by 45 and 30 minutes, and
# some ordinary ones, the loops' own (UTC) included.
ZONES = (
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "Asia/Kathmandu",
    "America/St_Johns",
    "Asia/Tokyo",
    "Europe/Berlin",
    "America/Los_Angeles",
    "UTC",
)
HOUR = timedelta(hours=1)


def local_time_config(
    url: str, *, send_at: Any = None, quiet_hours: dict | None = None, max_delay: str = "24h"
) -> RetentionConfig:
    """The shipped loop, sending at `send_at` (default: 09:00 local), nobody held out."""
    return parse_config(
        local_time_document(url, send_at=send_at, quiet_hours=quiet_hours, max_delay=max_delay),
        environ={},
    )


def local_time_document(
    url: str, *, send_at: Any = None, quiet_hours: dict | None = None, max_delay: str = "24h"
) -> dict[str, Any]:
    """The configuration document of `local_time_config`."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    loop = document["loops"][0]
    loop["send_at"] = send_at if send_at is not None else {"local_time": "09:00"}
    loop["holdout"] = {"fraction": 0.0}
    if quiet_hours is not None:
        document["email"]["quiet_hours"] = quiet_hours
    document["email"]["max_delay"] = max_delay
    return document


def people_in(zones: Iterable[str | None], *, per_zone: int = 3) -> list[User]:
    """`per_zone` users in each zone, ids zero-padded in zone order."""
    people = []
    for zone_number, zone in enumerate(zones):
        for n in range(per_zone):
            number = zone_number * per_zone + n
            people.append(
                User(user_id=f"u{number:05d}", email=f"user{number}@example.com", timezone=zone)
            )
    return people


def build_day(
    db: SendingDatabase, config: RetentionConfig, people: list[User], day: date, built_at: datetime
) -> None:
    """The users' snapshot of `day`, then the loop's audience of `day` built by the real build
    at `built_at` (each user a candidate)."""
    add_users(db.engine, people, day=day)
    with db.engine.begin() as connection:
        # `add_users` writes the audience rows as an older build would: the build makes its own.
        connection.execute(
            text("DELETE FROM retention.reengagement_audience WHERE partition_date = :day"),
            {"day": day},
        )
        build_loop_audience(connection, config, people, day, built_at)


def build_loop_audience(
    connection: Connection,
    config: RetentionConfig,
    people: list[User],
    day: date,
    built_at: datetime,
) -> None:
    """The loop's audience of `day` built by the real build at `built_at`, in the caller's
    transaction, each of `people` a candidate."""
    build_audience(
        connection,
        config=config,
        loop=config.loop(LOOP),
        day=day,
        candidates={person.user_id for person in people},
        now=built_at,
    )


def first_local_time_after(instant: datetime, zone: str, at: time) -> datetime:
    """The oracle: the first `at` in `zone` after `instant`, by Python's zoneinfo (a doubled
    time's first occurrence, a skipped one read with the offset before the change)."""
    tz = ZoneInfo(zone)
    local_day = instant.astimezone(tz).date()
    for offset in range(3):
        candidate = datetime.combine(local_day + timedelta(days=offset), at, tzinfo=tz)
        if candidate.astimezone(UTC) > instant:
            return candidate.astimezone(UTC)
    raise AssertionError("no local time within three days")


@dataclass
class HourlyTicks:
    """Send runs of the loop at given instants, as the hourly schedule launches them, with the
    instant each delivered address went out at."""

    db: SendingDatabase
    config: RetentionConfig
    fake: FakeResend
    day: date

    def __post_init__(self) -> None:
        self.sent_at: dict[str, list[datetime]] = {}
        self.reports: list[SendRunReport] = []

    def run(self, now: datetime, shard: Shard = WHOLE_LOOP) -> SendRunReport:
        before = len(self.fake.delivered)
        report = send_loop_day(
            self.db.engine,
            config=self.config,
            loop=self.config.loop(LOOP),
            day=self.day,
            now=now,
            sender=make_sender(),
            provider="resend",
            unsubscribe_secret=SECRET,
            holder="hourly test sender",
            shard=shard,
        )
        for email in self.fake.delivered[before:]:
            for address in email["to"]:
                self.sent_at.setdefault(address, []).append(now)
        self.reports.append(report)
        return report

    def every_hour(self, first: datetime, hours: int) -> None:
        for hour in range(hours):
            self.run(first + hour * HOUR)


def due_times(db: SendingDatabase, day: date) -> dict[str, tuple[datetime, str]]:
    """Each treated member's stored due time and timezone, by address."""
    with db.engine.connect() as connection:
        rows = connection.execute(
            text("""SELECT email, due_at, send_timezone FROM retention.reengagement_audience
                    WHERE partition_date = :day AND arm = 'treatment'"""),
            {"day": day},
        ).all()
    return {row.email: (row.due_at, row.send_timezone) for row in rows}


def in_quiet_hours(instant: datetime, zone: str, start: time, end: time) -> bool:
    local = instant.astimezone(ZoneInfo(zone)).time()
    return (start <= local < end) if start < end else (local >= start or local < end)
