"""Local-time delivery on real PostgreSQL and a local stand-in for Resend: each member is due at
the first local send time after the audience was built, in their own timezone; the hourly send
claims exactly the members due since the previous one; quiet hours hold emails back across
loops; an email that cannot go out within `email.max_delay` is skipped, never sent late."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import text

from retention_pipeline.sending.due import due_hours, due_preview
from retention_pipeline.sending.shards import Shard
from retention_pipeline_tests.sending.local_time_support import (
    HOUR,
    ZONES,
    HourlyTicks,
    build_day,
    due_times,
    first_local_time_after,
    in_quiet_hours,
    local_time_config,
    people_in,
)
from retention_pipeline_tests.sending.support import LOOP, SendingDatabase, statuses

DAY = date(2026, 11, 20)
# The daily run of the morning after DAY, a few minutes after its 09:00 tick (UTC).
BUILT_AT = datetime(2026, 11, 21, 9, 4, tzinfo=UTC)
NINE = time(9)
QUIET = {"from": "21:00", "to": "08:00"}
QUIET_START, QUIET_END = time(21), time(8)


def test_each_email_goes_out_in_the_hour_after_its_readers_nine_oclock_once(
    sending_db: SendingDatabase, fake_resend
) -> None:
    config = local_time_config(sending_db.url, quiet_hours=QUIET)
    # Unknown and missing timezones are the loops' (UTC); a zone in other case is PostgreSQL's.
    people = people_in([*ZONES, "Mars/Olympus_Mons", None, "europe/berlin"])
    build_day(sending_db, config, people, DAY, BUILT_AT)
    zone_of = {person.email: person.timezone for person in people}
    spelled = {zone.lower(): zone for zone in ZONES}

    # Stored due times: the oracle's (Python's zoneinfo), in the member's zone or the loops'.
    stored = due_times(sending_db, DAY)
    assert sorted(stored) == sorted(zone_of)
    for address, (due_at, zone) in stored.items():
        expected_zone = spelled.get((zone_of[address] or "").lower(), "UTC")
        assert zone == expected_zone
        assert due_at == first_local_time_after(BUILT_AT, expected_zone, NINE), address

    # The hourly tick, from the top of the build's hour for two days.
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)
    first = BUILT_AT.replace(minute=0)
    ticks.every_hour(first, 48)

    assert Counter(fake_resend.delivered_to()) == Counter(list(zone_of))  # everyone, once
    for address, (due_at, zone) in stored.items():
        (sent_at,) = ticks.sent_at[address]
        assert timedelta(0) <= sent_at - due_at < HOUR, (address, zone, due_at, sent_at)
        assert not in_quiet_hours(sent_at, zone, QUIET_START, QUIET_END)
    # The loops' own zone was built after its 09:00: its readers wait for the next one.
    assert max(stored.values()) == (datetime(2026, 11, 22, 9, tzinfo=UTC), "UTC")
    assert statuses(sending_db.engine) == {"sent": len(people)}

    # Each run claimed only the members due in its hour: the per-hour counts add up.
    claimed = Counter(
        report.due.by for report in ticks.reports for _ in range(report.due.claimed.total())
    )
    assert claimed == Counter(ticks.sent_at[address][0] for address in stored)

    # A re-run of every hour of the day sends nobody again.
    requests = len(fake_resend.requests)
    ticks.every_hour(first, 48)
    assert len(fake_resend.requests) == requests
    assert all(report.due.claimed.total() == 0 for report in ticks.reports[48:])


def test_each_shard_claims_its_own_members_due_in_the_hour(
    sending_db: SendingDatabase, fake_resend
) -> None:
    config = local_time_config(sending_db.url)
    people = people_in(ZONES, per_zone=6)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    stored = due_times(sending_db, DAY)
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)
    claimed_by_shard: Counter[int] = Counter()
    for hour in range(48):
        now = BUILT_AT.replace(minute=0) + hour * HOUR
        for shard in (Shard(1, 2), Shard(0, 2)):
            report = ticks.run(now, shard=shard)
            claimed_by_shard[shard.index] += report.due.claimed.total()
    assert Counter(fake_resend.delivered_to()) == Counter(person.email for person in people)
    # Both shards sent, each only its own users, and each email in its hour.
    assert claimed_by_shard[0] and claimed_by_shard[1]
    assert claimed_by_shard.total() == len(people)
    with sending_db.engine.connect() as connection:
        shards = connection.execute(
            text("SELECT DISTINCT send_shard, mod(mod(hashtextextended(user_id, 0), 2) + 2, 2) "
                 "FROM retention.email_send_log")
        ).all()  # fmt: skip
    assert sorted(shards) == [(0, 0), (1, 1)]
    for address, (due_at, _zone) in stored.items():
        (sent_at,) = ticks.sent_at[address]
        assert timedelta(0) <= sent_at - due_at < HOUR


def test_the_send_runs_metadata_shows_per_hour_who_was_sent_and_who_waits(
    sending_db: SendingDatabase, fake_resend
) -> None:
    config = local_time_config(sending_db.url)
    people = people_in(["Pacific/Kiritimati", "Asia/Tokyo", "America/Los_Angeles"], per_zone=2)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)
    # The next 09:00 is 17:00 UTC in Los Angeles, 19:00 UTC in Kiritimati, midnight in Tokyo.
    report = ticks.run(datetime(2026, 11, 21, 18, tzinfo=UTC))

    assert report.due is not None and report.due.claimed == Counter({DAY: 2})
    metadata = report.metadata_for(DAY)
    assert metadata["claimed_this_run"] == metadata["sent_this_run"] == 2
    assert metadata[f"{LOOP}/due/waiting"] == 4
    assert metadata[f"{LOOP}/due/hours"].splitlines()[2:] == [
        "| 2026-11-21 17:00 | 2 | 0 | 0 | 0 | 0 |",
        "| 2026-11-21 19:00 | 0 | 0 | 0 | 2 | 0 |",
        "| 2026-11-22 00:00 | 0 | 0 | 0 | 2 | 0 |",
    ]
    assert str(report).startswith(
        f"{LOOP} {DAY}: members due after ever and by 2026-11-21T18:00:00+00:00: 2 claimed; "
        "2 sent, 0 failed"
    )

    # The audience's preview: each member's due time in UTC and in their own time.
    with sending_db.engine.connect() as connection:
        preview = due_preview(connection, schema="retention", loop_name=LOOP, day=DAY)
        hours = due_hours(connection, schema="retention", loop_name=LOOP, day=DAY)
    assert preview.splitlines()[2:5] == [
        "| u00004 | America/Los_Angeles | 2026-11-21 17:00 | 2026-11-21 09:00 | 2026-11-22 17:00 |",
        "| u00000 | Pacific/Kiritimati | 2026-11-21 19:00 | 2026-11-22 09:00 | 2026-11-22 19:00 |",
        "| u00002 | Asia/Tokyo | 2026-11-22 00:00 | 2026-11-22 09:00 | 2026-11-23 00:00 |",
    ]
    assert [hour.sent for hour in hours] == [2, 0, 0]


def test_a_local_time_a_clock_change_skips_or_doubles_goes_out_once_at_its_defined_instant(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """No zone skips or doubles 09:00, so these loops send at the night times that the US and EU
    changes skip (02:30 on 8 March 2026 in New York) and double (01:30 on 1 November in New
    York, 25 October in London): a skipped time is read with the offset before the change (one
    hour later on the wall clock), a doubled one is its first occurrence."""
    cases = [
        # (local time, audience day, built at, zone, expected instant in UTC), in day order
        ("02:30", date(2026, 3, 6), datetime(2026, 3, 7, 9, 4, tzinfo=UTC), "America/New_York",
         datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),
        ("01:30", date(2026, 10, 23), datetime(2026, 10, 24, 9, 4, tzinfo=UTC), "Europe/London",
         datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
        ("01:30", date(2026, 10, 30), datetime(2026, 10, 31, 9, 4, tzinfo=UTC),
         "America/New_York", datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
    ]  # fmt: skip
    for number, (at, day, built_at, zone, expected) in enumerate(cases):
        config = local_time_config(sending_db.url, send_at={"local_time": at})
        people = [
            replace(
                person, user_id=f"d{number}-{person.user_id}", email=f"d{number}-{person.email}"
            )
            for person in people_in([zone], per_zone=2)
        ]
        build_day(sending_db, config, people, day, built_at)
        stored = due_times(sending_db, day)
        assert {due_at for due_at, _zone in stored.values()} == {expected}, (zone, at)
        # The oracle agrees, and the instant reads back as the local time on the wall (the
        # skipped one an hour on).
        hour, minute = map(int, at.split(":"))
        assert first_local_time_after(built_at, zone, time(hour, minute)) == expected

        ticks = HourlyTicks(sending_db, config, fake_resend, day)
        ticks.every_hour(built_at.replace(minute=0), 48)
        ticks.every_hour(built_at.replace(minute=0), 48)  # every hour again
        for person in people:
            (sent_at,) = ticks.sent_at[person.email]
            assert timedelta(0) <= sent_at - expected < HOUR
    assert Counter(fake_resend.delivered_to()).most_common(1)[0][1] == 1


def test_a_late_send_keeps_quiet_hours_and_skips_what_is_too_late(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """The hourly runs stop after the build and resume at 13:00 UTC the next day: an email due
    since more than `max_delay` is skipped and counted; one whose reader is now in quiet hours
    waits for their end; the others go out at once."""
    config = local_time_config(sending_db.url, quiet_hours=QUIET, max_delay="24h")
    zones = ["America/Sao_Paulo", "Asia/Tokyo", "Pacific/Kiritimati", "Asia/Kathmandu", "UTC"]
    people = people_in(zones, per_zone=1)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    address = {person.timezone: person.email for person in people}
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)

    resumed = datetime(2026, 11, 22, 13, tzinfo=UTC)
    report = ticks.run(resumed)
    assert report.due is not None
    # Sao Paulo's 09:00 was 12:00 UTC yesterday: more than 24 hours ago.
    assert report.due.skipped == Counter({DAY: 1})
    # 22:00 in Tokyo, 03:00 in Kiritimati: quiet.
    assert report.due.deferred == Counter({DAY: 2})
    assert sorted(fake_resend.delivered_to()) == sorted([address["Asia/Kathmandu"], address["UTC"]])
    metadata = report.metadata_for(DAY)
    assert (metadata["skipped_this_run"], metadata["deferred_this_run"]) == (1, 2)
    # The due time moved to the end of Tokyo's quiet hours; the build's stays for the outcomes.
    with sending_db.engine.connect() as connection:
        tokyo = connection.execute(
            text("SELECT due_at, first_due_at FROM retention.reengagement_audience "
                 "WHERE email = :email"),
            {"email": address["Asia/Tokyo"]},
        ).one()  # fmt: skip
    assert tokyo == (
        datetime(2026, 11, 22, 23, tzinfo=UTC),
        datetime(2026, 11, 22, 0, tzinfo=UTC),
    )
    assert metadata[f"{LOOP}/due/skipped"] == 1

    ticks.every_hour(resumed + HOUR, 36)
    # Kiritimati's quiet hours end at 08:00 there (18:00 UTC), Tokyo's at 23:00 UTC.
    assert ticks.sent_at[address["Pacific/Kiritimati"]] == [datetime(2026, 11, 22, 18, tzinfo=UTC)]
    assert ticks.sent_at[address["Asia/Tokyo"]] == [datetime(2026, 11, 22, 23, tzinfo=UTC)]
    assert address["America/Sao_Paulo"] not in ticks.sent_at
    assert Counter(fake_resend.delivered_to()).most_common(1)[0][1] == 1
    for zone, email in address.items():
        for sent_at in ticks.sent_at.get(email, []):
            assert not in_quiet_hours(sent_at, zone, QUIET_START, QUIET_END)
    with sending_db.engine.connect() as connection:
        skipped = (
            connection.execute(
                text(
                    "SELECT email FROM retention.reengagement_audience WHERE skipped_at IS NOT NULL"
                )
            )
            .scalars()
            .all()
        )
    assert skipped == [address["America/Sao_Paulo"]]


def test_a_loop_sending_after_its_run_holds_back_only_the_readers_in_quiet_hours(
    sending_db: SendingDatabase, fake_resend
) -> None:
    config = local_time_config(sending_db.url, send_at="after_run", quiet_hours=QUIET)
    people = people_in(ZONES, per_zone=1)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)
    # The run the sensor launches right after the build.
    ticks.run(BUILT_AT + timedelta(minutes=1))
    by_zone = {person.timezone: person.email for person in people}
    # 09:04 UTC: 18:04 in Tokyo, 14:49 in Kathmandu, 10:04 in Berlin, 05:34 in St John's (quiet),
    # 23:04 in Kiritimati (quiet), 22:04 the day before in Pago Pago (quiet), 01:04 in LA (quiet).
    assert sorted(fake_resend.delivered_to()) == sorted(
        by_zone[zone] for zone in ("Asia/Tokyo", "Asia/Kathmandu", "Europe/Berlin", "UTC")
    )
    ticks.every_hour(BUILT_AT.replace(minute=0) + HOUR, 24)
    assert Counter(fake_resend.delivered_to()) == Counter(by_zone.values())
    expected_end = {
        "America/St_Johns": datetime(2026, 11, 21, 11, 30, tzinfo=UTC),
        "America/Los_Angeles": datetime(2026, 11, 21, 16, tzinfo=UTC),
        "Pacific/Kiritimati": datetime(2026, 11, 21, 18, tzinfo=UTC),
        "Pacific/Pago_Pago": datetime(2026, 11, 21, 19, tzinfo=UTC),
    }
    for zone, end in expected_end.items():
        (sent_at,) = ticks.sent_at[by_zone[zone]]
        assert timedelta(0) <= sent_at - end < HOUR, zone
        assert not in_quiet_hours(sent_at, zone, QUIET_START, QUIET_END)
