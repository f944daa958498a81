"""Local-time delivery against the audience build running beside the hourly sends, and against
a day built again: no member falls behind a claim's mark unread, a rebuild keeps who was
skipped and when each member is due, and a loop back to sending after its run never sends a
member skipped as stale."""

from __future__ import annotations

import copy
import threading
import time as clock
from collections import Counter
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import text

from retention_pipeline.audience.build import build_audiences
from retention_pipeline.config import parse_config
from retention_pipeline.sending import SendRunReport
from retention_pipeline.sending.compose import loop_templates
from retention_pipeline.sending.due import (
    claim_due,
    claim_floor,
    due_hours,
    due_members_sql,
    oldest_due_day,
)
from retention_pipeline.sending.send_log import start_batch
from retention_pipeline.sending.shards import WHOLE_LOOP
from retention_pipeline_tests.sending.local_time_support import (
    HOUR,
    ZONES,
    HourlyTicks,
    build_day,
    build_loop_audience,
    local_time_config,
    local_time_document,
    people_in,
)
from retention_pipeline_tests.sending.support import (
    LOOP,
    SECRET,
    SendingDatabase,
    User,
    add_users,
)
from retention_pipeline_tests.sending.test_local_time import BUILT_AT, DAY, NINE, QUIET


def _audience_snapshot(db: SendingDatabase, people: list[User]) -> None:
    """The users' snapshot of DAY, with no audience built from it yet."""
    add_users(db.engine, people, day=DAY)
    with db.engine.begin() as connection:
        connection.execute(
            text("DELETE FROM retention.reengagement_audience WHERE partition_date = :day"),
            {"day": DAY},
        )


def _waits_for_a_lock(db: SendingDatabase, thread: threading.Thread, seconds: float = 30) -> bool:
    """Whether `thread`, while it runs, comes to wait on an advisory lock within `seconds`."""
    deadline = clock.monotonic() + seconds
    with db.engine.connect() as connection:
        while thread.is_alive() and clock.monotonic() < deadline:
            waiting = connection.execute(
                text("""SELECT count(*) FROM pg_stat_activity
                        WHERE datname = current_database() AND wait_event = 'advisory'""")
            ).scalar_one()
            if waiting:
                return True
            connection.rollback()
            clock.sleep(0.05)
    return False


def test_an_hourly_send_during_a_build_waits_for_its_members(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """The build stamps due times from its start (09:58) and commits minutes later; the 10:00
    send starts in between. It waits for the build, so the members due at 09:58 are read by it,
    not left behind its mark for ever."""
    config = local_time_config(sending_db.url, send_at="after_run", quiet_hours=QUIET)
    people = people_in(ZONES, per_zone=1)
    _audience_snapshot(sending_db, people)
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)
    reports: list[SendRunReport] = []
    with sending_db.engine.connect() as connection, connection.begin() as build:
        build_loop_audience(
            connection, config, people, DAY, datetime(2026, 11, 21, 9, 58, tzinfo=UTC)
        )
        ten = threading.Thread(
            target=lambda: reports.append(ticks.run(datetime(2026, 11, 21, 10, 0, 5, tzinfo=UTC)))
        )
        ten.start()
        assert _waits_for_a_lock(sending_db, ten), "the 10:00 send did not wait for the build"
        assert not reports
        build.commit()
    ten.join(timeout=60)
    (report,) = reports
    assert report.due is not None and report.due.claimed.total() > 0
    ticks.every_hour(datetime(2026, 11, 21, 11, tzinfo=UTC), 24)
    assert Counter(fake_resend.delivered_to()) == Counter(person.email for person in people)


def test_a_build_after_a_later_claim_stamps_due_times_past_its_mark(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """A send committed at 10:00:05 before the build (its `now` of 09:58, taken on a host whose
    clock is behind, or before it got its turn) stamped any due time: they start past the mark."""
    config = local_time_config(sending_db.url, send_at="after_run", quiet_hours=QUIET)
    people = people_in(ZONES, per_zone=1)
    _audience_snapshot(sending_db, people)
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)
    ticks.run(datetime(2026, 11, 21, 10, 0, 5, tzinfo=UTC))
    with sending_db.engine.begin() as connection:
        build_loop_audience(
            connection, config, people, DAY, datetime(2026, 11, 21, 9, 58, tzinfo=UTC)
        )
    ticks.run(datetime(2026, 11, 21, 10, 1, tzinfo=UTC))
    ticks.every_hour(datetime(2026, 11, 21, 11, tzinfo=UTC), 24)
    assert Counter(fake_resend.delivered_to()) == Counter(person.email for person in people)


def _due_fields(db: SendingDatabase) -> dict[str, tuple]:
    with db.engine.connect() as connection:
        rows = connection.execute(
            text("""SELECT email, due_at, first_due_at, stale_at, skipped_at, send_timezone
                    FROM retention.reengagement_audience WHERE partition_date = :day"""),
            {"day": DAY},
        ).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def test_a_rebuilt_day_keeps_who_was_skipped_and_when_each_member_is_due(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """The runs resume a day late: Sao Paulo is skipped as stale, Tokyo waits for the end of
    its quiet hours. The day is built again (still within the send window) with a newcomer:
    Sao Paulo is never sent, Tokyo goes out at the end of its quiet hours, the newcomer at its
    own 09:00 after the rebuild."""
    config = local_time_config(sending_db.url, quiet_hours=QUIET, max_delay="24h")
    people = people_in(["America/Sao_Paulo", "Asia/Tokyo", "UTC"], per_zone=1)
    sao_paulo, tokyo, _utc = (person.email for person in people)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)
    resumed = datetime(2026, 11, 22, 13, tzinfo=UTC)
    report = ticks.run(resumed)
    assert report.due is not None
    assert (report.due.skipped.total(), report.due.deferred.total()) == (1, 1)
    before = _due_fields(sending_db)

    newcomer = User(user_id="u09999", email="newcomer@example.com", timezone="Europe/Berlin")
    add_users(sending_db.engine, [newcomer], day=DAY)
    with sending_db.engine.begin() as connection:
        build_loop_audience(
            connection, config, [*people, newcomer], DAY, resumed + timedelta(minutes=30)
        )
    after = _due_fields(sending_db)
    assert {address: after[address] for address in before} == before
    # 09:00 in Berlin after 13:30 UTC on the 22nd.
    assert after[newcomer.email][0] == datetime(2026, 11, 23, 8, tzinfo=UTC)

    ticks.every_hour(resumed + HOUR, 36)
    assert sao_paulo not in ticks.sent_at
    assert ticks.sent_at[tokyo] == [datetime(2026, 11, 22, 23, tzinfo=UTC)]
    assert ticks.sent_at[newcomer.email] == [datetime(2026, 11, 23, 8, tzinfo=UTC)]
    assert Counter(fake_resend.delivered_to()).most_common(1)[0][1] == 1


def test_a_loop_back_to_sending_after_its_run_never_sends_a_member_skipped_as_stale(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """Quiet hours removed and the loop sending after its run again: its daily send leaves out
    Sao Paulo, skipped as stale, and sends Tokyo, who waited for quiet hours no longer
    configured, with the others."""
    config = local_time_config(sending_db.url, quiet_hours=QUIET, max_delay="24h")
    people = people_in(["America/Sao_Paulo", "Asia/Tokyo", "Pacific/Kiritimati"], per_zone=1)
    sao_paulo, tokyo, kiritimati = (person.email for person in people)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    resumed = datetime(2026, 11, 22, 13, tzinfo=UTC)
    report = HourlyTicks(sending_db, config, fake_resend, DAY).run(resumed)
    assert report.due is not None and report.due.skipped.total() == 1

    after_run = local_time_config(sending_db.url, send_at="after_run", max_delay="24h")
    assert not after_run.sends_on_due_times(after_run.loop(LOOP))
    HourlyTicks(sending_db, after_run, fake_resend, DAY).run(resumed + HOUR)
    assert sorted(fake_resend.delivered_to()) == sorted([tokyo, kiritimati])
    assert sao_paulo not in fake_resend.delivered_to()


def test_the_per_hour_metadata_counts_hours_of_utc_whatever_the_sessions_timezone(
    sending_db: SendingDatabase,
) -> None:
    config = local_time_config(sending_db.url)
    people = people_in(["Pacific/Kiritimati", "Asia/Tokyo", "America/Los_Angeles"], per_zone=2)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    with sending_db.engine.connect() as connection:
        connection.execute(text("SET TimeZone = 'Asia/Kolkata'"))
        hours = due_hours(connection, schema="retention", loop_name=LOOP, day=DAY)
    assert [(hour.hour.astimezone(UTC), hour.waiting) for hour in hours] == [
        (datetime(2026, 11, 21, 17, tzinfo=UTC), 2),
        (datetime(2026, 11, 21, 19, tzinfo=UTC), 2),
        (datetime(2026, 11, 22, 0, tzinfo=UTC), 2),
    ]


def test_a_shards_first_claim_reads_a_range_of_the_due_index(
    sending_db: SendingDatabase,
) -> None:
    """A shard with no mark yet (new, or the shard count changed) reads due times from the
    oldest day its claim considers, not every due time of the loop's history."""
    config = local_time_config(sending_db.url)
    people = people_in(["Asia/Tokyo"], per_zone=2)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    now = datetime(2026, 11, 22, 1, tzinfo=UTC)
    params = {
        "loop": LOOP,
        "now": now,
        "after": claim_floor(config, after=None, now=now),
        "oldest": oldest_due_day(config, now),
        "templates": loop_templates(config.loop(LOOP)),
        **WHOLE_LOOP.params,
    }
    with sending_db.engine.connect() as connection:
        connection.execute(text("SET enable_seqscan = off"))
        (plan,) = connection.execute(
            text(f"EXPLAIN (FORMAT JSON) SELECT a.user_id FROM retention.reengagement_audience "
                 f"AS a WHERE {due_members_sql('retention')}"),
            params,
        ).scalar_one()  # fmt: skip
    scans = [
        node
        for node in _plan_nodes(plan["Plan"])
        if node.get("Relation Name") == "reengagement_audience"
    ]
    assert [scan.get("Index Name") for scan in scans] == ["reengagement_audience_due"]
    condition = scans[0]["Index Cond"]
    assert "(due_at <=" in condition and "(due_at >" in condition, condition


def _plan_nodes(node: dict) -> list[dict]:
    return [node, *(each for child in node.get("Plans", []) for each in _plan_nodes(child))]


def test_a_claimed_batch_never_attempted_is_not_sent_after_its_members_went_stale(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """Tokyo's hour claimed its reader and its run died before sending; Berlin's hour claimed
    its reader and started the batch (its request's outcome unknown). The runs resume a day
    later: Tokyo's batch, never attempted, is withheld as stale; Berlin's, which the provider
    may have, goes out under its key."""
    config = local_time_config(sending_db.url, max_delay="24h")
    loop = config.loop(LOOP)
    people = people_in(["Asia/Tokyo", "Europe/Berlin"], per_zone=1)
    tokyo, berlin = (person.email for person in people)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    # 09:00 in Tokyo is 00:00 UTC on the 22nd, in Berlin 08:00 UTC.
    for hour in (
        datetime(2026, 11, 22, 0, 5, tzinfo=UTC),
        datetime(2026, 11, 22, 8, 5, tzinfo=UTC),
    ):
        claimed = claim_due(
            sending_db.engine, config=config, loop=loop, now=hour, unsubscribe_secret=SECRET
        )
        assert claimed.claimed.total() == 1
    with sending_db.engine.begin() as connection:
        berlin_batch = connection.execute(
            text("SELECT batch_key FROM retention.email_send_log WHERE email = :email"),
            {"email": berlin},
        ).scalar_one()
        started = start_batch(
            connection,
            schema="retention",
            loop_name=LOOP,
            batch_key=berlin_batch,
            loops_configured=[LOOP],
            now=datetime(2026, 11, 22, 8, 5, tzinfo=UTC),
        )
        assert [email.to for email in started.emails] == [berlin]

    report = HourlyTicks(sending_db, config, fake_resend, DAY).run(
        datetime(2026, 11, 23, 9, tzinfo=UTC)
    )
    assert fake_resend.delivered_to() == [berlin]
    assert report.dispatch.stale == 1
    assert report.metadata_for(DAY)["failed_this_run"] == 1
    with sending_db.engine.connect() as connection:
        (status, error) = connection.execute(
            text("SELECT status, error FROM retention.email_send_log WHERE email = :email"),
            {"email": tokyo},
        ).one()
    assert status == "failed" and "email.max_delay" in error


def test_two_local_time_loops_built_together_and_rebuilt_each_keep_their_due_times(
    sending_db: SendingDatabase,
) -> None:
    document = local_time_document(sending_db.url, quiet_hours=QUIET)
    second = copy.deepcopy(document["loops"][0])
    second["name"] = "second_loop"
    second["send_at"] = {"local_time": "10:00"}
    document["loops"].append(second)
    config = parse_config(document, environ={})
    people = people_in(ZONES[:4], per_zone=2)
    _audience_snapshot(sending_db, people)
    # Disjoint candidates: the frequency cap keeps one reader to one loop a day.
    candidates = {
        LOOP: {person.user_id for person in people[0::2]},
        "second_loop": {person.user_id for person in people[1::2]},
    }

    def build(built_at: datetime) -> dict[tuple[str, str], tuple[datetime, str]]:
        with sending_db.engine.begin() as connection:
            build_audiences(
                connection,
                config=config,
                loops=config.loops,
                day=DAY,
                candidates=candidates,
                now=built_at,
            )
        with sending_db.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT loop_name, user_id, due_at, send_timezone "
                    "FROM retention.reengagement_audience "
                    "WHERE partition_date = :day AND arm = 'treatment'"
                ),
                {"day": DAY},
            ).all()
        return {(loop, user): (due_at, zone) for loop, user, due_at, zone in rows}

    due = build(BUILT_AT)
    assert {key for key in due} == {
        (loop, user) for loop, users in candidates.items() for user in users
    }
    for (loop, _), (due_at, zone) in due.items():
        # Each loop's own local time.
        expected = NINE if loop == LOOP else time(10)
        assert due_at.astimezone(ZoneInfo(zone)).time() == expected, (loop, zone, due_at)
    # Built again three hours later, in one transaction as before: nobody's due time moves.
    assert build(BUILT_AT + 3 * HOUR) == due


def test_a_step_taken_out_after_the_build_is_sent_to_nobody_and_the_rest_still_goes_out(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """Members already due at a step the configuration no longer has: each hourly claim read
    them, failed on their template, and rolled back, so nobody of the loop was emailed."""
    people = people_in(ZONES, per_zone=2)
    build_day(sending_db, local_time_config(sending_db.url), people, DAY, BUILT_AT)
    last_call = {person.email for person in people[::3]}
    with sending_db.engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE retention.reengagement_audience "
                "SET step = 2, template = 're_engagement_last_call' "
                "WHERE email = ANY(CAST(:emails AS text[]))"
            ),
            {"emails": sorted(last_call)},
        )
    document = local_time_document(sending_db.url)
    document["loops"][0]["steps"] = document["loops"][0]["steps"][:2]
    ticks = HourlyTicks(sending_db, parse_config(document, environ={}), fake_resend, DAY)

    ticks.every_hour(BUILT_AT.replace(minute=0), 48)

    assert sorted(fake_resend.delivered_to()) == sorted(
        person.email for person in people if person.email not in last_call
    )


def test_a_day_rebuilt_after_its_send_window_gives_its_newcomers_no_due_time(
    sending_db: SendingDatabase, fake_resend
) -> None:
    """Re-materialized days later (late rows), the day stays an experiment, but its newcomers
    are history: they were stamped due at the next 09:00 and emailed days late."""
    config = local_time_config(sending_db.url)
    people = people_in(["Asia/Tokyo", "UTC"], per_zone=1)
    build_day(sending_db, config, people, DAY, BUILT_AT)
    ticks = HourlyTicks(sending_db, config, fake_resend, DAY)
    ticks.every_hour(BUILT_AT.replace(minute=0), 30)
    assert sorted(ticks.sent_at) == sorted(person.email for person in people)
    before = _due_fields(sending_db)

    newcomer = User(user_id="u09999", email="newcomer@example.com", timezone="Europe/Berlin")
    add_users(sending_db.engine, [newcomer], day=DAY)
    rebuilt_at = BUILT_AT + timedelta(days=3)
    with sending_db.engine.begin() as connection:
        build_loop_audience(connection, config, [*people, newcomer], DAY, rebuilt_at)
    after = _due_fields(sending_db)
    assert {address: after[address] for address in before} == before
    assert after[newcomer.email][0] is None

    ticks.every_hour(rebuilt_at.replace(minute=0), 48)
    assert newcomer.email not in ticks.sent_at
    assert Counter(fake_resend.delivered_to()).most_common(1)[0][1] == 1
