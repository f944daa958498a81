"""The daily audience on real PostgreSQL: episodes and step delays, the exit rule and cooldown,
exclusions, the frequency cap across loops, a stable holdout, and one person per mailbox."""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from retention_pipeline.audience.build import build_audience, build_audiences
from retention_pipeline.config import parse_config
from retention_pipeline.database import migrate
from retention_pipeline.recipients.suppressions import suppress, unsubscribe_user
from retention_pipeline.segments.conditions import condition_user_ids
from retention_pipeline.segments.rules import build_day_segments
from retention_pipeline.segments.snapshot import build_snapshot
from retention_pipeline.sending import send_loop_day
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.email.fake_resend import serve_fake_resend
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT
from retention_pipeline_tests.sending.support import make_sender

UTC = ZoneInfo("UTC")
D = date(2026, 11, 10)


def config_for(
    url: str, *, holdout: float = 0.0, cooldown: int = 30, loops: int = 1, segment="dormant"
):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    loop = document["loops"][0]
    loop["steps"][0]["condition"] = {"type": "segment", "segment": segment}
    loop["holdout"] = {"fraction": holdout}
    loop["cooldown_days"] = cooldown
    document["loops"] = [dict(copy.deepcopy(loop), name=f"loop_{n}") for n in range(loops)]
    return parse_config(document, environ={})


@pytest.fixture
def world(app_database_url):
    engine = create_engine(app_database_url)
    install(engine, config_for(app_database_url))
    yield engine, app_database_url
    engine.dispose()


def add_users(engine, ids, *, last_seen: datetime, email=None):
    with engine.begin() as connection:
        for user in ids:
            connection.execute(
                text("INSERT INTO users (id, email, created_at) VALUES (:id, :email, :at)"),
                {
                    "id": user,
                    "email": email or f"user{user}@example.com",
                    "at": datetime(2026, 6, 1, tzinfo=UTC),
                },
            )
            connection.execute(
                text("INSERT INTO sessions (user_id, created_at) VALUES (:id, :at)"),
                {"id": user, "at": last_seen},
            )


def run_day(engine, config, day: date, loop_index: int = 0):
    loop = config.loops[loop_index]
    update_rollup(engine, config)  # as the daily run does before the snapshot
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
        build_day_segments(connection, "retention", config.loops, config.timezone, day)
    candidates = condition_user_ids(engine, "retention", loop, day)
    with engine.begin() as connection:
        return build_audience(connection, config=config, loop=loop, day=day, candidates=candidates)


def audience(engine, day: date, loop: str = "loop_0"):
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT user_id, step, template, arm, variant, episode_start "
                "FROM retention.reengagement_audience "
                "WHERE partition_date = :day AND loop_name = :loop "
                "ORDER BY user_id"
            ),
            {"day": day, "loop": loop},
        ).all()
    return [tuple(row) for row in rows]


def test_a_sequence_follows_the_step_delays_once_per_episode(world):
    engine, url = world
    config = config_for(url)
    add_users(engine, [1], last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    steps = {}
    for offset in range(0, 10):
        summary = run_day(engine, config, D + timedelta(days=offset))
        steps[offset] = [(row[1], row[2]) for row in audience(engine, D + timedelta(days=offset))]
        if offset == 1:
            assert summary.excluded["no_step_due"] == 1
    assert steps == {
        0: [(0, "re_engagement")],
        1: [],
        2: [],
        3: [(1, "re_engagement_follow_up")],
        4: [],
        5: [],
        6: [],
        7: [(2, "re_engagement_last_call")],
        8: [],
        9: [],
    }
    assert {
        row[5] for offset in (0, 3, 7) for row in audience(engine, D + timedelta(days=offset))
    } == {D}


def test_running_a_day_again_gives_the_same_audience(world):
    engine, url = world
    config = config_for(url, holdout=0.5)
    add_users(engine, range(1, 41), last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    first = run_day(engine, config, D)
    rows = audience(engine, D)
    again = run_day(engine, config, D)
    assert audience(engine, D) == rows
    assert first == again
    assert first.treatment + first.holdout == 40


def next_steps(engine) -> set:
    with engine.connect() as connection:
        return set(
            connection.execute(
                text("SELECT next_step_on::text FROM retention.episodes WHERE ended_on IS NULL")
            ).scalars()
        )


def test_episodes_remember_their_next_step_and_rebuilds_and_upgrades_recompute_it(world):
    engine, url = world
    config = config_for(url)
    add_users(engine, range(1, 7), last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    built = {}
    for offset in range(10):
        day = D + timedelta(days=offset)
        built[day] = (run_day(engine, config, day), audience(engine, day))
        if offset in (0, 3, 7):
            later = {0: D + timedelta(days=3), 3: D + timedelta(days=7), 7: "infinity"}[offset]
            assert next_steps(engine) == {str(later)}
    # Episodes that had every step are not read again, and still counted as having none due.
    assert built[D + timedelta(days=9)][0].excluded["no_step_due"] == 6

    # A day taken back and built again, with later days built, gives its steps again.
    rebuilt = D + timedelta(days=3)
    assert (run_day(engine, config, rebuilt), audience(engine, rebuilt)) == built[rebuilt]
    assert next_steps(engine) == {"infinity"}

    # As the upgrade leaves them: not known, read and worked out again.
    with engine.begin() as connection:
        connection.execute(text("UPDATE retention.episodes SET next_step_on = NULL"))
    last = D + timedelta(days=9)
    assert (run_day(engine, config, last), audience(engine, last)) == built[last]
    assert next_steps(engine) == {"infinity"}


def test_a_period_that_takes_new_delays_works_its_episodes_next_steps_out_again(world):
    engine, url = world
    add_users(engine, [1, 2], last_seen=datetime(2026, 10, 1, tzinfo=UTC))

    def first_step_after(days: int):
        document = copy.deepcopy(SHIPPED_DOCUMENT)
        document["database"]["url"] = url
        loop = document["loops"][0]
        loop.update(name="loop_0", holdout={"fraction": 0.0})
        # User 2 matches from the day after D on.
        loop["steps"][0]["condition"] = {
            "type": "query",
            "query": "SELECT id FROM users WHERE id = '1' OR "
            f"current_setting('retention.partition_date')::date > DATE '{D}'",
            "timeout": "1m",
        }
        loop["steps"][0]["delay"] = f"{days}d"
        return parse_config(document, environ={})

    run_day(engine, first_step_after(2), D)
    run_day(engine, first_step_after(2), D + timedelta(days=1))
    assert audience(engine, D) == audience(engine, D + timedelta(days=1)) == []
    # Nobody assigned yet: rebuilding the period's first day gives it the new delay.
    shorter = first_step_after(0)
    run_day(engine, shorter, D)
    run_day(engine, shorter, D + timedelta(days=2))
    assert [row[:3] for row in audience(engine, D)] == [("1", 0, "re_engagement")]
    assert [row[:3] for row in audience(engine, D + timedelta(days=2))] == [
        ("2", 0, "re_engagement")
    ]


def test_a_user_who_comes_back_leaves_the_episode_and_reenters_after_the_cooldown(world):
    engine, url = world
    add_users(engine, [1], last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    config = config_for(url, cooldown=30)
    run_day(engine, config, D)
    with engine.begin() as connection:  # back on D+1
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (1, :at)"),
            {"at": datetime(2026, 11, 11, 15, tzinfo=UTC)},
        )
    summary = run_day(engine, config, D + timedelta(days=1))
    assert summary.returned == 1
    assert run_day(engine, config, D + timedelta(days=3)).treatment == 0  # no follow-up
    # Away again: dormant on D+8, but within the 30-day cooldown.
    later = run_day(engine, config, D + timedelta(days=8))
    assert later.candidates == 1 and later.excluded["cooldown"] == 1 and later.treatment == 0
    # With no cooldown the user starts a new episode at step 0.
    run_day(engine, config_for(url, cooldown=0), D + timedelta(days=9))
    assert audience(engine, D + timedelta(days=9)) == [
        ("1", 0, "re_engagement", "treatment", audience(engine, D)[0][4], D + timedelta(days=9))
    ]


def test_exclusions_are_counted_and_never_make_the_audience(world):
    engine, url = world
    config = config_for(url)
    add_users(engine, [1], last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    add_users(engine, [2], last_seen=datetime(2026, 10, 1, tzinfo=UTC), email="not an address")
    add_users(engine, [3], last_seen=datetime(2026, 10, 1, tzinfo=UTC), email="Gone@Example.com")
    add_users(engine, [4], last_seen=datetime(2026, 11, 9, tzinfo=UTC))  # active: no candidate
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO retention.email_suppressions (email, reason) "
                "VALUES ('gone@example.com', 'unsubscribed')"
            )
        )
    summary = run_day(engine, config, D)
    assert [row[0] for row in audience(engine, D)] == ["1"]
    assert summary.excluded["no_email"] == 1
    assert summary.excluded["suppressed"] == 1
    assert summary.candidates == 3


def test_the_frequency_cap_holds_across_loops(world):
    engine, url = world
    config = config_for(url, loops=2)
    add_users(engine, [1], last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    assert run_day(engine, config, D, loop_index=0).treatment == 1
    second = run_day(engine, config, D, loop_index=1)
    assert second.treatment == 0 and second.excluded["frequency_cap"] == 1
    # Three days later the cap has passed: the second loop's first step goes out.
    assert run_day(engine, config, D + timedelta(days=3), loop_index=1).treatment == 1


def test_the_frequency_cap_holds_across_loops_built_in_one_run_and_rebuilt(world):
    engine, url = world
    config = config_for(url, loops=2)
    add_users(engine, [1, 2], last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    update_rollup(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config, D)
        build_day_segments(connection, "retention", config.loops, config.timezone, D)

    def build_both() -> dict:
        candidates = {
            loop.name: condition_user_ids(engine, "retention", loop, D) for loop in config.loops
        }
        with engine.begin() as connection:
            return build_audiences(
                connection, config=config, loops=config.loops, day=D, candidates=candidates
            )

    first = build_both()
    assert first["loop_0"].treatment == 2
    assert first["loop_1"].treatment == 0 and first["loop_1"].excluded["frequency_cap"] == 2
    # Built again, each loop judges by the day as the other left it, not by its own rows.
    assert build_both() == first
    assert [row[0] for row in audience(engine, D)] == ["1", "2"]
    assert audience(engine, D, "loop_1") == []


def test_the_holdout_is_stable_and_about_the_configured_share(world):
    engine, url = world
    add_users(engine, range(1, 1001), last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    summary = run_day(engine, config_for(url, holdout=0.1), D)
    assert summary.treatment + summary.holdout == 1000
    assert 60 <= summary.holdout <= 140
    arms = {row[0]: row[3] for row in audience(engine, D)}
    variants = {row[4] for row in audience(engine, D)}
    assert variants == {"a", "b"}
    run_day(engine, config_for(url, holdout=0.1), D)
    assert {row[0]: row[3] for row in audience(engine, D)} == arms


def add_user(engine, user: int, email: str, *, last_seen: datetime) -> None:
    add_users(engine, [user], last_seen=last_seen, email=email)


def come_back(engine, users, at: datetime) -> None:
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (:id, :at)"),
            [{"id": user, "at": at} for user in users],
        )


def with_frequency_cap(config, days: int):
    return config.model_copy(
        update={"email": config.email.model_copy(update={"frequency_cap_days": days})}
    )


LONG_AGO = datetime(2026, 10, 1, tzinfo=UTC)
# Dormant from D + 1 (seven days without activity by the end of the day), not on D.
DORMANT_FROM_TOMORROW = datetime(2026, 11, 4, 12, tzinfo=UTC)


def test_users_sharing_a_mailbox_are_one_person_and_it_gets_one_email_each_step(world):
    engine, url = world
    config = config_for(url, holdout=0.0)
    # One mailbox, three spellings: blanks around it, any case.
    add_user(engine, 1, "DUP@Example.COM ", last_seen=LONG_AGO)
    add_user(engine, 2, "dup@example.com", last_seen=LONG_AGO)
    add_user(engine, 3, "Dup@example.com", last_seen=LONG_AGO)
    add_user(engine, 4, "solo@example.com", last_seen=LONG_AGO)

    summary = run_day(engine, config, D)

    assert [row[0] for row in audience(engine, D)] == ["1", "4"]
    assert summary.excluded["shared_address"] == 2 and summary.treatment == 2
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT email FROM retention.reengagement_audience WHERE user_id = '1'")
            ).scalar_one()
            == "DUP@Example.COM"
        )
        assert connection.execute(
            text("SELECT user_id FROM retention.episodes ORDER BY user_id")
        ).scalars().all() == ["1", "4"]

    with serve_fake_resend() as fake:
        report = send_day(engine, config, D)
        assert sorted(fake.delivered_to()) == ["DUP@Example.COM", "solo@example.com"]
        assert report.ledger[D] == {"claimed": 0, "sent": 2, "failed": 0}
        # The follow-up, three days on, again reaches the mailbox once, as the same user.
        follow_up = run_day(engine, config, D + timedelta(days=3))
        assert follow_up.excluded["shared_address"] == 2
        assert [row[:2] for row in audience(engine, D + timedelta(days=3))] == [
            ("1", 1),
            ("4", 1),
        ]
        send_day(engine, config, D + timedelta(days=3))
        assert sorted(fake.delivered_to()) == sorted(["DUP@Example.COM", "solo@example.com"] * 2)


def send_day(engine, config, day: date):
    return send_loop_day(
        engine,
        config=config,
        loop=config.loops[0],
        day=day,
        now=datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
        + timedelta(hours=9),
        sender=make_sender(),
        provider="resend",
        unsubscribe_secret="unsubscribe-secret-for-tests",
        holder="test sender",
    )


def test_users_sharing_a_mailbox_are_in_the_mailboxs_arm(world):
    engine, url = world
    config = with_frequency_cap(config_for(url, holdout=0.5, cooldown=0), 0)
    pairs = range(1, 41)
    for n in pairs:
        add_user(engine, n, f"pair{n}@example.com", last_seen=LONG_AGO)
        add_user(engine, 100 + n, f"Pair{n}@Example.com", last_seen=DORMANT_FROM_TOMORROW)
    run_day(engine, config, D)
    first = {row[0]: row[3] for row in audience(engine, D)}
    assert sorted(first) == sorted(str(n) for n in pairs)
    assert set(first.values()) == {"treatment", "holdout"}
    # The first users come back; the others, dormant now, start their own episodes.
    come_back(engine, pairs, datetime(2026, 11, 11, 15, tzinfo=UTC))

    summary = run_day(engine, config, D + timedelta(days=1))

    assert summary.returned == 40
    second = {row[0]: row[3] for row in audience(engine, D + timedelta(days=1))}
    assert sorted(second) == sorted(str(100 + n) for n in pairs)
    assert {n: second[str(100 + n)] for n in pairs} == {n: first[str(n)] for n in pairs}


def test_the_frequency_cap_and_the_cooldown_count_the_mailbox(world):
    engine, url = world
    add_user(engine, 1, "cap@example.com", last_seen=LONG_AGO)
    add_user(engine, 2, "CAP@example.com", last_seen=DORMANT_FROM_TOMORROW)
    run_day(engine, config_for(url, cooldown=0), D)
    come_back(engine, [1], datetime(2026, 11, 11, 15, tzinfo=UTC))

    # Emailed as user 1 yesterday: capped as user 2 today.
    capped = run_day(engine, config_for(url, cooldown=0), D + timedelta(days=1))
    assert capped.excluded["frequency_cap"] == 1 and capped.treatment == 0
    # The person came back as user 1: user 2 is in the mailbox's cooldown.
    cooling = run_day(engine, config_for(url, cooldown=30), D + timedelta(days=1))
    assert cooling.excluded["cooldown"] == 1 and cooling.treatment == 0
    # Without a cooldown, once the cap has passed, the mailbox hears again, as user 2.
    assert run_day(engine, config_for(url, cooldown=0), D + timedelta(days=3)).treatment == 1
    assert audience(engine, D + timedelta(days=3))[0][:2] == ("2", 0)


def test_an_installed_database_keeps_episodes_in_their_arms_and_one_twin_a_day(world):
    """Before mailboxes, arms were drawn from user ids and twins had episodes of their own."""
    engine, url = world
    config = config_for(url, holdout=0.5)
    add_user(engine, 1, "old@example.com", last_seen=LONG_AGO)
    run_day(engine, config, D)
    add_user(engine, 2, "OLD@example.com", last_seen=LONG_AGO)
    [(_, _, _, arm, *_)] = audience(engine, D)
    other_arm = {"treatment": "holdout", "holdout": "treatment"}[arm]
    with engine.begin() as connection:  # user 1 drawn into the other arm, user 2 emailed too
        connection.execute(
            text("UPDATE retention.reengagement_audience SET arm = :arm"), {"arm": other_arm}
        )
        connection.execute(
            text(
                "INSERT INTO retention.episodes (loop_name, user_id, started_on) "
                "VALUES ('loop_0', '2', :day)"
            ),
            {"day": D},
        )
        connection.execute(
            text("""
                INSERT INTO retention.reengagement_audience (partition_date, loop_name, user_id,
                    email, episode_start, step, template, arm, variant)
                VALUES (:day, 'loop_0', '2', 'OLD@example.com', :day, 0, 're_engagement',
                        :arm, 'a')"""),
            {"day": D, "arm": arm},
        )

    follow_up = run_day(engine, config, D + timedelta(days=3))

    assert [row[:4] for row in audience(engine, D + timedelta(days=3))] == [
        ("1", 1, "re_engagement_follow_up", other_arm)
    ]
    assert follow_up.excluded["shared_address"] == 1


def test_an_unsubscribe_after_the_user_was_erased_keeps_their_mailbox_from_the_next_account(
    world,
):
    """Ada is emailed, deletes her account (erased: her address is gone from the send log), then
    clicks unsubscribe in that email, and signs up again with the same address. Neither the
    audience nor the send may reach her again."""
    engine, url = world
    config = config_for(url, cooldown=0)
    add_user(engine, 1, "Ada@Example.com", last_seen=LONG_AGO)
    run_day(engine, config, D)
    with serve_fake_resend() as fake:
        send_day(engine, config, D)
        assert fake.delivered_to() == ["Ada@Example.com"]
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM users WHERE id = 1"))
    update_rollup(engine, config)  # the drain erases her
    with engine.connect() as connection:
        assert connection.execute(
            text("SELECT email, erased_mailbox_sha256 IS NOT NULL FROM retention.email_send_log")
        ).all() == [("", True)]

    with engine.begin() as connection:
        assert unsubscribe_user(connection, schema="retention", user_id="1", loop_name=None) is None
    with engine.connect() as connection:  # the list holds her mailbox's hash, not her address
        assert connection.execute(
            text(
                "SELECT email, mailbox_sha256 = sha256(convert_to('ada@example.com', 'UTF8')) "
                "FROM retention.email_suppressions"
            )
        ).all() == [(None, True)]
    add_user(engine, 2, " ADA@example.com", last_seen=LONG_AGO)  # signed up again

    summary = run_day(engine, config, D + timedelta(days=3))

    assert summary.candidates == 1 and summary.excluded["suppressed"] == 1
    assert audience(engine, D + timedelta(days=3)) == []


def test_a_user_who_unsubscribed_is_not_emailed_at_the_address_they_changed_to(world):
    """Ada unsubscribes from every email, then changes her address in the app: her follow-up
    must not go to the new one. A bounce is the old mailbox's alone (Bob's new one works)."""
    engine, url = world
    config = config_for(url, cooldown=0)
    add_user(engine, 1, "ada@example.com", last_seen=LONG_AGO)
    add_user(engine, 2, "bob@example.com", last_seen=LONG_AGO)
    run_day(engine, config, D)
    with serve_fake_resend() as fake:
        send_day(engine, config, D)
    with engine.begin() as connection:
        unsubscribe_user(connection, schema="retention", user_id="1", loop_name=None)
        connection.execute(
            text(
                "INSERT INTO retention.email_suppressions (email, user_id, reason, source) "
                "VALUES ('bob@example.com', '2', 'bounced', 'resend_webhook:bounced')"
            )
        )
        connection.execute(text("UPDATE users SET email = 'new.' || email WHERE id IN (1, 2)"))

    follow_up = run_day(engine, config, D + timedelta(days=3))

    assert [row[:2] for row in audience(engine, D + timedelta(days=3))] == [("2", 1)]
    assert follow_up.excluded["suppressed"] == 1
    with serve_fake_resend() as fake:
        send_day(engine, config, D + timedelta(days=3))
        assert fake.delivered_to() == ["new.bob@example.com"]


def test_an_unsubscribe_from_a_loop_no_longer_configured_holds_for_every_loop(world):
    """A loop renamed keeps its readers' unsubscribes under its old name: read as the new
    loop's, or any loop's, they would hold back nobody."""
    engine, url = world
    config = config_for(url, cooldown=0)
    add_user(engine, 1, "ada@example.com", last_seen=LONG_AGO)
    add_user(engine, 2, "bob@example.com", last_seen=LONG_AGO)
    with engine.begin() as connection:
        suppress(
            connection,
            schema="retention",
            email="ada@example.com",
            reason="unsubscribed",
            source="unsubscribe_link:old_name",
            user_id="1",
            loop_name="old_name",
        )

    summary = run_day(engine, config, D)

    assert [row[:2] for row in audience(engine, D)] == [("2", 0)]
    assert summary.excluded["suppressed"] == 1


def email_user_1_from_loop_0(engine, config) -> None:
    """User 1, away for weeks, gets loop_0's email of D."""
    add_users(engine, [1], last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    assert run_day(engine, config, D, loop_index=0).treatment == 1
    with serve_fake_resend() as fake:
        send_day(engine, config, D)
        assert fake.delivered_to() == ["user1@example.com"]


def days_rebuilt(engine) -> list[tuple[str, date]]:
    with engine.connect() as connection:
        return connection.execute(
            text("SELECT loop_name, partition_date FROM retention.audience_days_rebuilt")
        ).all()


def loop_1_is_capped_on(engine, config, day: date) -> bool:
    """Whether loop_1's audience of `day` leaves user 1 out by the frequency cap alone."""
    summary = run_day(engine, config, day, loop_index=1)
    return summary.treatment == 0 and summary.excluded["frequency_cap"] == 1


def test_a_day_built_late_is_capped_by_the_emails_of_the_days_after_it(world):
    """D's run was missed; D + 1's ran and loop_0 emailed user 1. D, launched now, sends
    today: loop_1 must not email them again."""
    engine, url = world
    config = config_for(url, loops=2)
    add_users(engine, [1], last_seen=datetime(2026, 10, 1, tzinfo=UTC))
    assert run_day(engine, config, D + timedelta(days=1), loop_index=0).treatment == 1
    with serve_fake_resend() as fake:
        send_day(engine, config, D + timedelta(days=1))
        assert fake.delivered_to() == ["user1@example.com"]

    assert loop_1_is_capped_on(engine, config, D)
    # A backfill of D once it is past the send window sends nothing: it gives what D's own run
    # would have, uncapped by the days after it.
    loop = config.loops[1]
    candidates = condition_user_ids(engine, "retention", loop, D)
    with engine.begin() as connection:
        simulated = build_audience(
            connection,
            config=config,
            loop=loop,
            day=D,
            candidates=candidates,
            now=datetime(2026, 12, 1, 9, tzinfo=UTC),
        )
    assert simulated.simulated and simulated.treatment == 1


def test_a_rebuild_of_an_emailed_day_keeps_its_rows_and_the_frequency_cap(world):
    """Loop_0 emails user 1 on D, who then unsubscribes from loop_0 alone, and D is built
    again: the day's emails began going out, so its assignments stay (intention to treat) and
    keep capping loop_1, on D and on the cap's days after."""
    engine, url = world
    config = config_for(url, loops=2)
    email_user_1_from_loop_0(engine, config)
    sent = audience(engine, D)
    with engine.begin() as connection:
        unsubscribe_user(connection, schema="retention", user_id="1", loop_name="loop_0")
    candidates = {
        loop.name: condition_user_ids(engine, "retention", loop, D) for loop in config.loops
    }

    with engine.begin() as connection:
        rebuilt = build_audiences(
            connection, config=config, loops=config.loops, day=D, candidates=candidates
        )

    assert rebuilt["loop_0"].treatment == 1 and audience(engine, D) == sent
    assert rebuilt["loop_1"].treatment == 0 and rebuilt["loop_1"].excluded["frequency_cap"] == 1
    assert audience(engine, D, "loop_1") == [] and days_rebuilt(engine) == []
    assert loop_1_is_capped_on(engine, config, D + timedelta(days=1))
    # Past the cap (3 days), loop_1, which never emailed them, may.
    assert run_day(engine, config, D + timedelta(days=3), loop_index=1).treatment == 1


def test_a_rebuild_of_an_emailed_day_keeps_both_arms_of_those_who_came_back_since(world):
    """Users of both arms come back the day after D and D + 1 ends their episodes; then D is
    re-materialized (late rows, say). Taking its rows back dropped the emailed ones who came
    back (their episode, kept for the email, ended: a cooldown), and no held-out one: the
    treatment lost its successes. Users new to D are added."""
    engine, url = world
    config = config_for(url, holdout=0.5)
    add_users(engine, range(1, 41), last_seen=LONG_AGO)
    run_day(engine, config, D)
    with serve_fake_resend():
        send_day(engine, config, D)
    before = audience(engine, D)
    arms = {row[3] for row in before}
    assert arms == {"treatment", "holdout"}
    come_back(engine, range(1, 21), datetime(2026, 11, 11, 12, tzinfo=UTC))
    run_day(engine, config, D + timedelta(days=1))
    add_users(engine, [41], last_seen=LONG_AGO)  # a user the first build of D did not have

    again = run_day(engine, config, D)

    after = audience(engine, D)
    assert [row for row in after if row[0] != "41"] == before
    assert [row[:2] for row in after if row[0] == "41"] == [("41", 0)]
    assert again.treatment + again.holdout == 41


def test_upgrading_to_recorded_rebuilds_records_every_day_that_has_emails(world):
    """Days built again before revision 0027 were not recorded, so the upgrade records every
    day with emails, and the cap reads them from the send log while they last; it drops the
    index 0025 made for reading every email, and a downgrade makes it again."""
    engine, url = world
    config = config_for(url, loops=2)
    email_user_1_from_loop_0(engine, config)

    def mailed_by_day_index() -> int:
        with engine.connect() as connection:
            return connection.execute(
                text("SELECT count(*) FROM pg_indexes WHERE indexname = :name"),
                {"name": "email_send_log_mailed_by_day"},
            ).scalar_one()

    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0026")
    assert mailed_by_day_index() == 1
    with engine.begin() as connection:  # rebuilt before the upgrade: nothing records it
        connection.execute(text("DELETE FROM retention.reengagement_audience"))

    with engine.begin() as connection:
        migrate.upgrade(connection, "retention")

    assert mailed_by_day_index() == 0
    assert days_rebuilt(engine) == [("loop_0", D)]
    assert loop_1_is_capped_on(engine, config, D + timedelta(days=1))


def add_never_activated_ada(engine) -> None:
    """User 1, signed up long ago and never active since."""
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (id, email, created_at) VALUES (1, 'ada@example.com', :at)"),
            {"at": datetime(2026, 6, 1, tzinfo=UTC)},
        )


def test_an_erased_users_email_that_may_have_been_delivered_keeps_the_frequency_cap(world):
    """User 1 is emailed by loop_0, whose request went unanswered (failed, may have been
    delivered), then erased and back the next day: the cap still holds loop_1 off them."""
    engine, url = world
    config = config_for(url, loops=2, segment="never_activated")
    add_never_activated_ada(engine)
    assert run_day(engine, config, D, loop_index=0).treatment == 1
    with serve_fake_resend():
        send_day(engine, config, D)
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE retention.email_send_log SET status = 'failed', sent_at = NULL, "
                "error = 'no answer: may have been delivered'"
            )
        )
        connection.execute(text("INSERT INTO retention.erased_users (user_id) VALUES ('1')"))
    update_rollup(engine, config)
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM retention.reengagement_audience")
            ).scalar_one()
            == 0
        )

    assert loop_1_is_capped_on(engine, config, D + timedelta(days=1))


def test_a_user_erased_for_a_while_keeps_the_cooldown_and_the_frequency_cap(world):
    """User 1, who never used the product, is emailed step 0 by loop_0, then erased (an account
    banned for a day, say: the exclusion erases it) and back the next day with no episode left.
    Neither loop may start on them again while the cooldown and the frequency cap last."""
    engine, url = world
    config = config_for(url, loops=2, segment="never_activated")
    add_never_activated_ada(engine)
    assert run_day(engine, config, D, loop_index=0).treatment == 1
    with serve_fake_resend() as fake:
        send_day(engine, config, D)
        assert fake.delivered_to() == ["ada@example.com"]
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO retention.erased_users (user_id) VALUES ('1')"))
    update_rollup(engine, config)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM retention.episodes")).scalar() == 0
    # D built again, both loops in one build: loop_0 takes back its audience rows of D, not the
    # record of the email it sent, which still caps loop_1.
    with engine.begin() as connection:
        build_snapshot(connection, config, D)
        build_day_segments(connection, "retention", config.loops, config.timezone, D)
    candidates = {
        loop.name: condition_user_ids(engine, "retention", loop, D) for loop in config.loops
    }
    with engine.begin() as connection:
        rebuilt = build_audiences(
            connection, config=config, loops=config.loops, day=D, candidates=candidates
        )
    assert rebuilt["loop_0"].excluded["cooldown"] == 1
    assert rebuilt["loop_1"].excluded["frequency_cap"] == 1
    assert audience(engine, D) == audience(engine, D, "loop_1") == []

    later = D + timedelta(days=2)
    again = run_day(engine, config, later, loop_index=0)
    other = run_day(engine, config, later, loop_index=1)

    assert (again.candidates, again.excluded["cooldown"], again.treatment) == (1, 1, 0)
    assert (other.candidates, other.excluded["frequency_cap"], other.treatment) == (1, 1, 0)
    # Past the frequency cap, the other loop, which never emailed them, may.
    assert run_day(engine, config, D + timedelta(days=4), loop_index=1).treatment == 1
