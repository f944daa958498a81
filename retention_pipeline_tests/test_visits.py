"""Visits: bursts of activity from any source, separated by `activity.visit_gap` of 5-minute
slots with nothing in them, counted by the real capture, drain, rebuild and repair; and the
session baseline and the drop rules measuring visits where the app records no logins."""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from retention_pipeline.config import ConfigError, parse_config
from retention_pipeline.database.migrate import MIGRATIONS
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.segments.snapshot import build_snapshot
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install, refresh_from
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT, shipped_asset, write_config

NEW_YORK = ZoneInfo("America/New_York")
DAY = date(2026, 11, 18)


def config_for(url: str, timezone: str = "America/New_York", **activity):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    document["activity"] = activity
    for loop in document["loops"]:
        loop["steps"][0]["trigger"]["timezone"] = timezone
    return parse_config(document, environ={})


def at(day: date, clock: str, fold: int = 0) -> datetime:
    """A local time in New York; `fold=1` is the second 01:xx of the day daylight saving ends."""
    hour, minute = map(int, clock.split(":"))
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=NEW_YORK).replace(fold=fold)


def add_user(connection, user_id: int) -> None:
    connection.execute(
        text("INSERT INTO users (id, email, created_at) VALUES (:id, :email, '2026-01-01')"),
        {"id": user_id, "email": f"user{user_id}@example.com"},
    )


def add_events(connection, user_id: int, moments: list[datetime], name: str = "doc.edited"):
    for moment in moments:
        connection.execute(
            text("INSERT INTO events (user_id, name, created_at) VALUES (:user, :name, :at)"),
            {"user": user_id, "name": name, "at": moment},
        )


def add_sessions(connection, user_id: int, moments: list[datetime]) -> None:
    for moment in moments:
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (:user, :at)"),
            {"user": user_id, "at": moment},
        )


def visits(engine, user_id: int, day: date = DAY) -> int | None:
    with engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT visit_count FROM retention.activity_daily "
                "WHERE user_id = :user AND day = :day"
            ),
            {"user": str(user_id), "day": day},
        ).scalar()


def active_slots(engine, user_id: int, day: date) -> list[int]:
    with engine.connect() as connection:
        bits = connection.execute(
            text(
                "SELECT active_slots::text FROM retention.activity_daily "
                "WHERE user_id = :user AND day = :day"
            ),
            {"user": str(user_id), "day": day},
        ).scalar_one()
    return [slot for slot, bit in enumerate(bits) if bit == "1"]


@pytest.fixture
def installed(app_database_url):
    config = config_for(app_database_url)
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        for user_id in range(1, 10):
            add_user(connection, user_id)
    install(engine, config)
    yield engine, config
    engine.dispose()


def test_a_visit_ends_after_the_gap_of_empty_slots_whatever_the_source(installed):
    engine, config = installed
    with engine.begin() as connection:
        # 10:00 and 10:34: five empty slots between them, one visit.
        add_events(connection, 1, [at(DAY, "10:00"), at(DAY, "10:34")])
        # 10:00 and 10:35: six empty slots (30 minutes), two visits.
        add_events(connection, 2, [at(DAY, "10:00"), at(DAY, "10:35")])
        # One burst from both sources (an event, a login, another event): one visit.
        add_events(connection, 3, [at(DAY, "09:00"), at(DAY, "09:12")], name="comment.posted")
        add_sessions(connection, 3, [at(DAY, "09:05")])
        add_events(connection, 3, [at(DAY, "09:20")], name="doc.viewed")
        # Three bursts of a day, the first and last at its edges.
        add_events(connection, 4, [at(DAY, "00:00"), at(DAY, "12:00"), at(DAY, "23:59")])
        # A login alone is a visit.
        add_sessions(connection, 5, [at(DAY, "08:00")])
    update_rollup(engine, config)
    assert [visits(engine, user) for user in (1, 2, 3, 4, 5)] == [1, 2, 1, 3, 1]
    assert active_slots(engine, 4, DAY) == [0, 144, 287]


def test_rows_drained_apart_merge_into_the_visits_they_make_together(installed):
    engine, config = installed
    with engine.begin() as connection:
        add_events(connection, 1, [at(DAY, "10:00"), at(DAY, "10:50")])
    update_rollup(engine, config)
    assert visits(engine, 1) == 2
    with engine.begin() as connection:  # the middle of the two: now one long visit
        add_events(connection, 1, [at(DAY, "10:25")], name="doc.viewed")
    update_rollup(engine, config)
    assert visits(engine, 1) == 1
    with engine.begin() as connection:  # a slot it already has adds nothing
        add_sessions(connection, 1, [at(DAY, "10:26")])
    update_rollup(engine, config)
    assert visits(engine, 1) == 1


def test_a_repair_and_a_rebuild_count_the_visits_the_drain_counted(installed):
    engine, config = installed
    with engine.begin() as connection:
        add_events(connection, 1, [at(DAY, "10:00"), at(DAY, "11:00"), at(DAY, "15:00")])
        add_sessions(connection, 1, [at(DAY, "10:10")])
    update_rollup(engine, config)
    drained = (visits(engine, 1), active_slots(engine, 1, DAY))
    assert drained[0] == 3
    with engine.begin() as connection:  # still in the capture when the repair reads the app
        add_events(connection, 1, [at(DAY, "18:00")])
    refresh_from(engine, config, DAY)  # its rows less the capture's: cancelled rows add no slot
    assert visits(engine, 1) == 4
    update_rollup(engine, config)  # the capture adds slots the repair already has
    assert visits(engine, 1) == 4
    with engine.begin() as connection:  # a new timezone rebuilds the rollup from the app tables
        connection.execute(text("UPDATE retention.tracking_state SET timezone = 'UTC'"))
    install(engine, config)
    assert (visits(engine, 1), active_slots(engine, 1, DAY)) == (4, [*drained[1], 216])


def test_the_day_daylight_saving_ends_has_300_slots(installed):
    engine, config = installed
    fall_back = date(2026, 11, 1)
    with engine.begin() as connection:
        # The same wall-clock time twice, an hour apart: two visits, not one.
        add_events(connection, 1, [at(fall_back, "01:10"), at(fall_back, "01:10", fold=1)])
        # The day's last slot is its 300th (24 hours and 55 minutes after midnight).
        add_events(connection, 2, [at(fall_back, "23:20"), at(fall_back, "23:59")])
    update_rollup(engine, config)
    assert visits(engine, 1, fall_back) == 2
    assert active_slots(engine, 1, fall_back) == [14, 26]
    assert active_slots(engine, 2, fall_back) == [292, 299]
    assert visits(engine, 2, fall_back) == 2


def test_a_visit_across_midnight_counts_on_both_days(installed):
    engine, config = installed
    with engine.begin() as connection:
        add_events(connection, 1, [at(DAY, "23:50"), at(DAY + timedelta(days=1), "00:05")])
    update_rollup(engine, config)
    assert (visits(engine, 1), visits(engine, 1, DAY + timedelta(days=1))) == (1, 1)


def test_a_new_visit_gap_recounts_the_visits_on_upgrade_without_a_rebuild(installed):
    engine, config = installed
    with engine.begin() as connection:
        add_events(connection, 1, [at(DAY, "10:00"), at(DAY, "10:20"), at(DAY, "10:40")])
        add_events(connection, 2, [at(DAY, "10:00"), at(DAY, "11:30")])
    update_rollup(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config_for(config.database.url, baseline="visits"), DAY)
        build_snapshot(connection, config, DAY + timedelta(days=1))
    assert (visits(engine, 1), visits(engine, 2)) == (1, 2)

    report = install(engine, config_for(config.database.url, visit_gap="10m"))
    assert report.rebuilt_chunks == 0
    assert (visits(engine, 1), visits(engine, 2)) == (3, 2)
    with engine.begin() as connection:  # a snapshot that counted visits counted other ones
        built = connection.execute(
            text("SELECT partition_date, counted FROM retention.snapshot_builds")
        ).all()
    assert built == [(DAY + timedelta(days=1), "logins")]
    with engine.begin() as connection:  # the drain counts with the installed gap
        add_events(connection, 2, [at(DAY, "11:40")])
    update_rollup(engine, config)
    assert visits(engine, 2) == 2

    install(engine, config_for(config.database.url, visit_gap="2h"))
    assert (visits(engine, 1), visits(engine, 2)) == (1, 1)


def test_an_installed_rollup_gets_the_slots_of_its_latest_event_and_session(app_database_url):
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA retention"))
        alembic = Config()
        alembic.set_main_option("script_location", str(MIGRATIONS))
        alembic.attributes.update(connection=connection, schema="retention")
        command.upgrade(alembic, "0014")
        connection.execute(
            text(
                "INSERT INTO retention.tracking_state (timezone, mode) "
                "VALUES ('America/New_York', 'triggers')"
            )
        )
        connection.execute(
            text("""
                INSERT INTO retention.activity_daily
                    (user_id, day, event_count, session_count, last_event_at, last_session_at)
                VALUES ('1', :day, 3, 1, :ten, :ten_past_ten),
                       ('2', :day, 2, 1, :nine, :three),
                       ('3', :day, 1, 0, :noon, NULL)"""),
            {
                "day": DAY,
                "ten": at(DAY, "10:00"),
                "ten_past_ten": at(DAY, "10:10"),
                "nine": at(DAY, "09:00"),
                "three": at(DAY, "15:00"),
                "noon": at(DAY, "12:00"),
            },
        )
        command.upgrade(alembic, "head")
    assert [active_slots(engine, user, DAY) for user in (1, 2, 3)] == [
        [120, 122],
        [108, 180],
        [144],
    ]
    assert [visits(engine, user) for user in (1, 2, 3)] == [1, 2, 1]
    engine.dispose()


@pytest.mark.parametrize(
    ("activity", "expected"),
    [
        ({"visit_gap": "7m"}, "activity.visit_gap: '7m' must be a multiple of 5 minutes"),
        ({"visit_gap": "0m"}, "activity.visit_gap: '0m' must be a positive duration"),
        ({"visit_gap": "5h"}, "activity.visit_gap: '5h' must be a multiple of 5 minutes from 5m"),
        ({"visit_gap": "soon"}, "activity.visit_gap: 'soon' is not a duration like"),
        ({"baseline": "sessions"}, "activity.baseline: Input should be 'visits' or 'logins'"),
    ],
)
def test_bad_visit_settings_give_one_line_naming_the_key(activity, expected):
    with pytest.raises(ConfigError) as raised:
        config_for("postgresql://localhost/app", **activity)
    assert "\n" not in str(raised.value)
    assert expected in str(raised.value)


def test_visits_are_counted_unless_told_otherwise_only_without_a_login_source():
    assert config_for("postgresql://localhost/app").counted_use == "logins"
    assert config_for("postgresql://localhost/app", baseline="visits").counted_use == "visits"
    assert config_for("postgresql://localhost/app").activity.visit_gap_minutes == 30


# --- the drop rules on visits, in real Dagster runs ---------------------------------------------

END_DAY = date(2026, 11, 20)
BURSTS = ("09:00", "13:00", "17:00")


def bursts(day: date, clocks: tuple[str, ...]) -> list[datetime]:
    """A few actions 5 minutes apart at each of the clock times: one visit each."""
    return [at(day, clock) + timedelta(minutes=5 * n) for clock in clocks for n in range(3)]


@pytest.fixture
def actions_only(app_database_url, tmp_path):
    """Three users who only ever act (the app records no logins): three visits a day for five
    weeks, then in the last 7 days the same (1), 3 visits (2), 10 visits (3)."""
    engine = create_engine(app_database_url)
    last_week = [END_DAY - timedelta(days=n) for n in range(7)]
    earlier = [END_DAY - timedelta(days=n) for n in range(7, 42)]
    with engine.begin() as connection:
        for user_id in (1, 2, 3):
            add_user(connection, user_id)
            for day in earlier:
                add_events(connection, user_id, bursts(day, BURSTS))
        for day in last_week:
            add_events(connection, 1, bursts(day, BURSTS), name="comment.posted")
        for day in last_week[:5:2]:
            add_events(connection, 2, bursts(day, BURSTS[:1]))
        for day in last_week:
            add_events(connection, 3, bursts(day, BURSTS[:1]))
        for day in last_week[:3]:
            add_events(connection, 3, bursts(day, BURSTS[1:2]))
    yield engine, app_database_url, tmp_path
    engine.dispose()


def segments_in_a_dagster_run(url: str, tmp_path, **activity) -> dict[str, tuple[str, str]]:
    path = write_config(tmp_path, url)
    document = yaml.safe_load(path.read_text())
    document["activity"] = activity
    for loop in document["loops"]:
        loop["steps"][0]["trigger"]["timezone"] = "America/New_York"
    path.write_text(yaml.safe_dump(document))
    app_database = AppDatabase(config_path=str(path))
    install(create_engine(url), app_database.config)
    result = dg.materialize(
        [shipped_asset(SNAPSHOT), shipped_asset(SEGMENTS)],
        partition_key=END_DAY.isoformat(),
        resources={"app_database": app_database},
    )
    assert result.success
    with create_engine(url).connect() as connection:
        rows = connection.execute(
            text(
                "SELECT user_id, segment, reason FROM retention.engagement_segments "
                "WHERE partition_date = :day"
            ),
            {"day": END_DAY},
        ).all()
    return {user: (segment, reason) for user, segment, reason in rows}


def test_use_that_fell_80_percent_is_dormant_on_visits_without_any_login(actions_only):
    _engine, url, tmp_path = actions_only
    segments = segments_in_a_dagster_run(url, tmp_path, baseline="visits")
    assert segments == {
        "1": ("active", "active 28 of the last 28 days"),
        "2": ("dormant", "visits down 86% (3 in the last 7 days vs 21.00 a week before)"),
        "3": ("at_risk", "visits down 52% (10 in the last 7 days vs 21.00 a week before)"),
    }


def test_counting_logins_where_there_are_none_finds_no_drop(actions_only):
    _engine, url, tmp_path = actions_only
    segments = segments_in_a_dagster_run(url, tmp_path)
    assert {user: segment for user, (segment, _reason) in segments.items()} == {
        "1": "active",
        "2": "active",
        "3": "active",
    }
