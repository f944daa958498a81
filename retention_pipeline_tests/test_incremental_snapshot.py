"""A day's snapshot rolled forward from the day before's equals the one built from the whole
rollup, over a generated month that crosses a daylight-saving change, with signups, a deleted
user, late activity and last actions that age out of the lookback."""

from __future__ import annotations

import re
import threading
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.demo import seed_demo
from retention_pipeline.segments.snapshot import (
    Reconciliation,
    build_snapshot,
    reconcile_with_users,
)
from retention_pipeline.segments.snapshot.rolled import (
    rolled_forward_sql,
    users_new_to_the_day_before_sql,
)
from retention_pipeline.segments.snapshot.statement import (
    LAST_ACTIONS_LOOKBACK_DAYS,
    snapshot_parameters,
)
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline.tracking.state import holding_lock
from retention_pipeline_tests.helpers import make_config

TIMEZONE = "America/New_York"  # daylight saving ends on 2026-11-01: a 25-hour day
FIRST = date(2026, 10, 18)
LAST = date(2026, 11, 14)


@pytest.fixture
def month(create_database):
    url = create_database()
    engine = create_engine(url)
    with engine.begin() as connection:
        seed_demo(
            connection,
            users=300,
            # Longer than the last actions' lookback, so some users' actions age out of it.
            days=LAST_ACTIONS_LOOKBACK_DAYS + 30,
            seed=7,
            end=datetime(2026, 11, 15, tzinfo=ZoneInfo(TIMEZONE)),
        )
    config = make_config(url, timezone=TIMEZONE)
    install(engine, config)
    yield engine, config
    engine.dispose()


def snapshot_rows(engine, day: date) -> list[tuple]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT * FROM retention.user_activity_snapshot WHERE partition_date = :day "
                "ORDER BY user_id"
            ),
            {"day": day},
        ).all()
    return [tuple(row) for row in rows]


def build(engine, config, day: date):
    with engine.begin() as connection:
        return build_snapshot(connection, config, day)


def build_in_full(engine, config, day: date):
    with engine.begin() as connection:
        connection.execute(
            text("DELETE FROM retention.snapshot_builds WHERE partition_date = :before"),
            {"before": day - timedelta(days=1)},
        )
    summary = build(engine, config, day)
    assert summary.path == "full"
    return snapshot_rows(engine, day)


def differences(full: list[tuple], rolled: list[tuple]) -> list[str]:
    """Each (user, column) whose value differs, the full build's first."""
    if [row[1] for row in full] != [row[1] for row in rolled]:
        users = {row[1] for row in full}, {row[1] for row in rolled}
        return [
            f"users only in the full build: {sorted(users[0] - users[1])}, only in the "
            f"rolled-forward one: {sorted(users[1] - users[0])}"
        ]
    return [
        f"user {a[1]} column {index}: {a[index]!r} != {b[index]!r}"
        for a, b in zip(full, rolled, strict=True)
        for index in range(len(a))
        if a[index] != b[index]
    ]


def days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def counting(config, counted: str):
    """The configuration with `activity.baseline: counted`."""
    return config.model_copy(
        update={"activity": config.activity.model_copy(update={"baseline": counted})}
    )


@pytest.mark.parametrize("counted", ["logins", "visits"])
def test_rolled_forward_snapshots_equal_full_builds_over_a_month(month, counted):
    engine, config = month
    config = counting(config, counted)
    rolled: dict[date, list[tuple]] = {}
    paths = []
    for day in days(FIRST, LAST):
        if day == date(2026, 11, 5):  # a user leaves the app; the drain erases them
            with engine.begin() as connection:
                connection.execute(text("DELETE FROM events WHERE user_id = 42"))
                connection.execute(text("DELETE FROM sessions WHERE user_id = 42"))
                connection.execute(text("DELETE FROM subscriptions WHERE user_id = 42"))
                connection.execute(text("DELETE FROM users WHERE id = 42"))
            update_rollup(engine, config)
        summary = build(engine, config, day)
        paths.append(summary.path)
        rolled[day] = snapshot_rows(engine, day)

    assert paths == ["full"] + ["incremental"] * (len(paths) - 1)
    signups = {row[1] for row in rolled[LAST]} - {row[1] for row in rolled[FIRST]}
    assert signups, "the month has signups, built in full by the rolled-forward days"
    assert "42" not in {row[1] for row in rolled[LAST]}
    assert any(row[10] != [] for row in rolled[LAST])  # last actions carried forward
    actions = {day: {row[1]: row[10] for row in rows} for day, rows in rolled.items()}
    assert any(
        len(actions[day + timedelta(days=1)].get(user, [])) < len(listed)
        for day in days(FIRST, LAST - timedelta(days=1))
        for user, listed in actions[day].items()
    ), "some user's oldest action ages out of the lookback during the month"
    for day in days(FIRST + timedelta(days=1), LAST):
        # Built now, in full: the user who left is in no day's snapshot any more.
        full = build_in_full(engine, config, day)
        still_in_the_app = [row for row in rolled[day] if row[1] != "42"]
        assert differences(full, still_in_the_app) == [], day


def add_event_at_noon(engine, day: date) -> None:
    """An event of user 7 at noon of `day`, inserted now."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) VALUES (7, 'report.exported', :at)"
            ),
            {
                "at": datetime.combine(day, datetime.min.time(), ZoneInfo(TIMEZONE))
                + timedelta(hours=12)
            },
        )


def test_late_activity_and_a_changed_configuration_build_in_full(month):
    engine, config = month
    for day in days(LAST - timedelta(days=3), LAST - timedelta(days=1)):
        build(engine, config, day)

    # An event of three days back arrives after that day's snapshot.
    late_day = LAST - timedelta(days=3)
    add_event_at_noon(engine, late_day)
    assert update_rollup(engine, config).late_days == (late_day,)
    summary = build(engine, config, LAST)
    assert summary.path == "full"
    assert summary.path_reason == (
        f"activity of {late_day} arrived after the snapshot of {LAST - timedelta(days=1)} was built"
    )
    with_late_event = snapshot_rows(engine, LAST)
    assert build_in_full(engine, config, LAST) == with_late_event

    # The day after rolls forward again; other settings build in full.
    assert build(engine, config, LAST + timedelta(days=1)).path == "incremental"
    wider = config.model_copy(
        update={"activity": config.activity.model_copy(update={"baseline_weeks": 6})}
    )
    changed = build(engine, wider, LAST + timedelta(days=2))
    assert (changed.path, changed.path_reason) == (
        "full",
        f"the snapshot of {LAST + timedelta(days=1)} was built with another timezone, "
        "activity.baseline_weeks or activity.last_actions",
    )
    on_visits = build(engine, counting(wider, "visits"), LAST + timedelta(days=3))
    assert (on_visits.path, on_visits.path_reason) == (
        "full",
        f"the snapshot of {LAST + timedelta(days=2)} counted logins, and activity.baseline now "
        "counts visits",
    )


def test_late_activity_of_a_day_never_built_before_a_built_one_builds_in_full(month):
    engine, config = month
    # The daemon was down: the day before last was never built, the last one was, in full.
    build(engine, config, LAST - timedelta(days=1))
    late_day = LAST - timedelta(days=2)
    add_event_at_noon(engine, late_day)
    assert update_rollup(engine, config).late_days == (late_day,)
    summary = build(engine, config, LAST)
    before = LAST - timedelta(days=1)
    assert (summary.path, summary.path_reason) == (
        "full",
        f"activity of {late_day} arrived after the snapshot of {before} was built",
    )


def test_a_snapshot_build_waits_for_a_drain_under_way(month):
    engine, config = month
    build(engine, config, LAST - timedelta(days=1))
    finished = threading.Event()

    def build_last_day() -> None:
        build(engine, config, LAST)
        finished.set()

    with engine.connect() as draining, holding_lock(draining, "retention"):
        builder = threading.Thread(target=build_last_day)
        builder.start()
        # What the drain folds meanwhile is in the build, or noted late after it: never lost.
        assert not finished.wait(3)
    builder.join(60)
    assert finished.is_set()


def test_reconciliation_names_the_users_a_snapshot_lost(month):
    engine, config = month
    summary = build(engine, config, LAST)
    with engine.begin() as connection:
        assert reconcile_with_users(connection, config, LAST, summary.users) == Reconciliation(
            summary.users, summary.users, 0
        )
        connection.execute(
            text(
                "DELETE FROM retention.user_activity_snapshot "
                "WHERE partition_date = :day AND user_id IN ('5', '6')"
            ),
            {"day": LAST},
        )
        assert reconcile_with_users(connection, config, LAST, summary.users - 2) == Reconciliation(
            summary.users, summary.users - 2, 2
        )


def test_a_rolled_forward_day_reads_the_day_before_alone(month):
    """Its plan names the day before's partition and no other: a day's cost must not grow with
    the days already built (a backfill of 30 days once read every day before each)."""
    engine, config = month
    for day in days(LAST - timedelta(days=5), LAST - timedelta(days=1)):
        build(engine, config, day)
    before = (LAST - timedelta(days=1)).strftime("%Y%m%d")
    with engine.connect() as connection:
        statements = {
            "rolled forward": rolled_forward_sql(connection, config),
            "users new to the day before": users_new_to_the_day_before_sql(connection, config),
        }
        for what, sql in statements.items():
            plan = "\n".join(
                connection.execute(
                    text(f"EXPLAIN {sql}"), snapshot_parameters(config, LAST)
                ).scalars()
            )
            read = set(re.findall(r"user_activity_snapshot_(\d{8})", plan))
            assert read == {before}, (what, read)
