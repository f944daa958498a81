"""Snapshots and segments on hand-made histories: each boundary gives exactly the expected
segment, nothing after the partition's end leaks in, and a backfill equals the original run."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.segments.rules import build_day_segments
from retention_pipeline.segments.snapshot import build_snapshot
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config

BERLIN = ZoneInfo("Europe/Berlin")
DAY = date(2026, 11, 20)
DAY_END = datetime(2026, 11, 21, tzinfo=BERLIN)  # 23:00 UTC on the 20th


@pytest.fixture
def world(app_database_url):
    config = make_config(app_database_url, timezone="Europe/Berlin")
    engine = create_engine(app_database_url)
    install(engine, config)
    yield engine, config
    engine.dispose()


def add_user(connection, user_id: int, signed_up: datetime, name: str | None = None) -> None:
    connection.execute(
        text("INSERT INTO users (id, email, name, created_at) VALUES (:id, :email, :name, :at)"),
        {"id": user_id, "email": f"user{user_id}@example.com", "name": name, "at": signed_up},
    )


def add_sessions(connection, user_id: int, moments: list[datetime]) -> None:
    for moment in moments:
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (:user, :at)"),
            {"user": user_id, "at": moment},
        )


def add_event(connection, user_id: int, name: str, moment: datetime) -> None:
    connection.execute(
        text("INSERT INTO events (user_id, name, created_at) VALUES (:user, :name, :at)"),
        {"user": user_id, "name": name, "at": moment},
    )


def weekly_sessions(per_week: int, weeks: int = 4) -> list[datetime]:
    """`per_week` sessions in each of the `weeks` weeks before the last 7 days."""
    start = DAY_END - timedelta(days=7 + 7 * weeks)
    spacing = timedelta(days=7) / per_week
    return [
        start + timedelta(days=7 * week) + spacing * n + timedelta(minutes=1)
        for week in range(weeks)
        for n in range(per_week)
    ]


def segments_of(engine, config, day: date = DAY) -> dict[int, tuple[str, str]]:
    update_rollup(engine, config)  # as the daily run does before the snapshot
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
        build_day_segments(connection, config.database.schema_, config.loops, config.timezone, day)
        rows = connection.execute(
            text(
                "SELECT user_id, segment, reason FROM retention.engagement_segments "
                "WHERE partition_date = :day"
            ),
            {"day": day},
        ).all()
    return {int(user_id): (segment, reason) for user_id, segment, reason in rows}


LONG_AGO = datetime(2026, 6, 1, tzinfo=BERLIN)


def test_each_boundary_gives_exactly_the_expected_segment(world):
    engine, config = world
    with engine.begin() as connection:
        add_user(connection, 1, LONG_AGO)  # exactly 7 days inactive
        add_sessions(connection, 1, [DAY_END - timedelta(days=7)])
        add_user(connection, 2, LONG_AGO)  # 6 days 23 hours inactive
        add_sessions(connection, 2, [DAY_END - timedelta(days=6, hours=23)])
        add_user(connection, 3, LONG_AGO)  # exactly an 80% drop: 5 a week, then 1
        add_sessions(connection, 3, weekly_sessions(5) + [DAY_END - timedelta(days=2)])
        add_user(connection, 4, LONG_AGO)  # a 79% drop: 100 a week, then 21
        add_sessions(
            connection,
            4,
            weekly_sessions(100) + [DAY_END - timedelta(days=2, minutes=n) for n in range(21)],
        )
        add_user(connection, 5, LONG_AGO)  # baseline below 3 a week: 2, then none
        add_sessions(connection, 5, weekly_sessions(2))
        add_event(connection, 5, "report.exported", DAY_END - timedelta(days=3))
        add_user(connection, 6, DAY_END - timedelta(hours=5))  # signed up today
        add_user(connection, 7, LONG_AGO)  # canceled and away 40 days
        add_sessions(connection, 7, [DAY_END - timedelta(days=40)])
        connection.execute(
            text(
                "INSERT INTO subscriptions (user_id, status, plan, amount_cents, billing_interval) "
                "VALUES (7, 'canceled', 'pro', 4900, 'month'), (3, 'active', 'pro', 58800, 'year')"
            )
        )
        add_user(connection, 8, DAY_END - timedelta(days=20))  # never did anything
        add_user(connection, 9, LONG_AGO)  # back today after 10 days away
        add_sessions(connection, 9, [DAY_END - timedelta(days=11), DAY_END - timedelta(hours=2)])
        add_user(connection, 10, LONG_AGO)  # same 40 days away, still paying: dormant
        add_sessions(connection, 10, [DAY_END - timedelta(days=40)])
        add_user(connection, 11, LONG_AGO)  # 50% drop: 4 a week, then 2
        add_sessions(
            connection,
            11,
            weekly_sessions(4) + [DAY_END - timedelta(days=1, hours=n) for n in range(2)],
        )
    segments = segments_of(engine, config)
    assert segments[1] == ("dormant", "no activity for 7 days (threshold 7)")
    assert segments[2][0] == "active"
    assert segments[3] == (
        "dormant",
        "auth sessions down 80% (1 in the last 7 days vs 5.00 a week before)",
    )
    assert segments[4] == (
        "at_risk",
        "auth sessions down 79% (21 in the last 7 days vs 100.00 a week before)",
    )
    assert segments[5][0] == "active"
    assert segments[6] == ("new", "signed up 0 day(s) ago")
    assert segments[7] == ("churned", "subscription canceled; no activity for 40 days")
    assert segments[8] == ("never_activated", "signed up 19 days ago; no activity yet")
    assert segments[9] == ("resurrected", "active today after 10 days away")
    assert segments[10] == ("dormant", "no activity for 40 days (threshold 7)")
    assert segments[11][0] == "at_risk"
    assert len(segments) == 11

    with engine.connect() as connection:
        amount = connection.execute(
            text(
                "SELECT monthly_amount_cents FROM retention.user_activity_snapshot "
                "WHERE user_id = '3'"
            )
        ).scalar()
    assert amount == 4900


def test_no_sessions_against_no_baseline_is_no_drop_even_without_a_minimum(world):
    engine, config = world
    without_minimum = {"minimum_baseline_sessions_per_week": 0}
    config = config.model_copy(
        update={
            "loops": [
                loop.model_copy(
                    update={"segments": loop.segments.model_copy(update=without_minimum)}
                )
                for loop in config.loops
            ]
        }
    )
    with engine.begin() as connection:
        add_user(connection, 1, LONG_AGO)  # events every day, never a session
        for back in range(30):
            add_event(connection, 1, "report.exported", DAY_END - timedelta(days=back, hours=3))
        add_user(connection, 2, LONG_AGO)  # a baseline under the shipped minimum, then none
        add_sessions(connection, 2, weekly_sessions(1))
        add_event(connection, 2, "report.exported", DAY_END - timedelta(days=2))
    segments = segments_of(engine, config)
    assert segments[1][0] == "active"
    assert segments[2] == (
        "dormant",
        "auth sessions down 100% (0 in the last 7 days vs 1.00 a week before)",
    )


def test_the_partition_boundary_is_local_midnight(world):
    engine, config = world
    with engine.begin() as connection:
        add_user(connection, 1, LONG_AGO)
        add_user(connection, 2, LONG_AGO)
        add_event(connection, 1, "report.exported", datetime(2026, 11, 20, 23, 59, tzinfo=BERLIN))
        add_event(connection, 2, "report.exported", datetime(2026, 11, 21, 0, 1, tzinfo=BERLIN))
    segments_of(engine, config)
    with engine.connect() as connection:
        rows = dict(
            connection.execute(
                text(
                    "SELECT user_id, active_today FROM retention.user_activity_snapshot "
                    "WHERE partition_date = :day"
                ),
                {"day": DAY},
            ).all()
        )
        later = connection.execute(
            text(
                "SELECT count(*) FROM retention.user_activity_snapshot "
                "WHERE partition_date = :day AND last_activity_at >= :end"
            ),
            {"day": DAY, "end": DAY_END},
        ).scalar()
    assert rows == {"1": True, "2": False}
    assert later == 0


def test_a_daylight_saving_day_has_25_hours(world):
    engine, config = world
    dst_day = date(2026, 10, 25)  # Berlin falls back from CEST to CET
    with engine.begin() as connection:
        add_user(connection, 1, LONG_AGO)
        add_user(connection, 2, LONG_AGO)
        add_user(connection, 3, LONG_AGO)
        add_event(connection, 1, "early", datetime(2026, 10, 24, 22, 30, tzinfo=ZoneInfo("UTC")))
        add_event(connection, 2, "late", datetime(2026, 10, 25, 22, 30, tzinfo=ZoneInfo("UTC")))
        add_event(connection, 3, "next", datetime(2026, 10, 25, 23, 30, tzinfo=ZoneInfo("UTC")))
    segments_of(engine, config, dst_day)
    with engine.connect() as connection:
        rows = dict(
            connection.execute(
                text(
                    "SELECT user_id, active_today FROM retention.user_activity_snapshot "
                    "WHERE partition_date = :day"
                ),
                {"day": dst_day},
            ).all()
        )
    # 00:30 CEST and 23:30 CET are both on the 25th; 00:30 CET on the 26th is not.
    assert rows == {"1": True, "2": True, "3": False}


def test_snapshot_measures_and_last_actions(world):
    engine, config = world
    with engine.begin() as connection:
        add_user(connection, 1, datetime(2026, 11, 1, tzinfo=BERLIN), name="Ada")
        for hours, name in [
            (50, "project.created"),
            (30, "report.exported"),
            (20, "invite.sent"),
            (10, "report.exported"),
        ]:
            add_event(connection, 1, name, DAY_END - timedelta(hours=hours))
        add_event(connection, 1, "future.thing", DAY_END + timedelta(hours=1))
        add_sessions(connection, 1, [DAY_END - timedelta(days=2), DAY_END - timedelta(days=9)])
    segments_of(engine, config)
    with engine.connect() as connection:
        snap = (
            connection.execute(
                text("SELECT * FROM retention.user_activity_snapshot WHERE user_id = '1'")
            )
            .mappings()
            .one()
        )
    assert [action["name"] for action in snap["last_actions"]] == [
        "report.exported",
        "invite.sent",
        "project.created",
    ]
    assert snap["events_7d"] == 4
    assert snap["sessions_7d"] == 1
    assert float(snap["baseline_sessions_per_week"]) == 0.25
    assert snap["active_days_28d"] == 4
    assert snap["account_age_days"] == 19
    assert snap["last_activity_at"] == DAY_END - timedelta(hours=10)


def test_backfilling_a_past_day_gives_the_rows_of_the_original_run(world):
    engine, config = world
    with engine.begin() as connection:
        for user in range(1, 6):
            add_user(connection, user, LONG_AGO)
            add_sessions(connection, user, [DAY_END - timedelta(days=user * 2)])
            add_event(connection, user, f"action.{user}", DAY_END - timedelta(days=user * 2))
    columns = "user_id, segment, reason, entered_on"
    query = text(
        f"SELECT {columns} FROM retention.engagement_segments WHERE partition_date = :d "
        "ORDER BY user_id"
    )
    snapshot = text(
        "SELECT * FROM retention.user_activity_snapshot WHERE partition_date = :d ORDER BY user_id"
    )
    previous = DAY - timedelta(days=1)
    segments_of(engine, config, previous)
    segments_of(engine, config, DAY)
    with engine.connect() as connection:
        original = connection.execute(query, {"d": DAY}).all()
        original_snapshot = connection.execute(snapshot, {"d": DAY}).all()
    # Life goes on: new activity arrives after the day ended.
    with engine.begin() as connection:
        for user in range(1, 6):
            add_sessions(connection, user, [DAY_END + timedelta(hours=user)])
            add_event(connection, user, "later.action", DAY_END + timedelta(days=1))
    segments_of(engine, config, previous)
    segments_of(engine, config, DAY)
    with engine.connect() as connection:
        assert connection.execute(query, {"d": DAY}).all() == original
        assert connection.execute(snapshot, {"d": DAY}).all() == original_snapshot


def test_entered_on_carries_over_while_the_segment_holds(world):
    engine, config = world
    with engine.begin() as connection:
        add_user(connection, 1, LONG_AGO)
        add_sessions(connection, 1, [DAY_END - timedelta(days=12)])
    for offset in (3, 2, 1, 0):
        segments_of(engine, config, DAY - timedelta(days=offset))
    with engine.connect() as connection:
        entered = connection.execute(
            text("SELECT entered_on FROM retention.engagement_segments WHERE partition_date = :d"),
            {"d": DAY},
        ).scalar()
    assert entered == DAY - timedelta(days=3)
