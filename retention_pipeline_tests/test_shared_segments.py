"""Loops with the same segment thresholds share one classification: each day's users are written
once per set of thresholds, and every loop still reads one row per user and day, the row it
would get classified alone. Installed databases move to it in place and back."""

from __future__ import annotations

import copy
import uuid
from datetime import date, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from retention_pipeline.config import parse_config
from retention_pipeline.database import migrate
from retention_pipeline.segments.rules import build_day_segments, segment_examples
from retention_pipeline.segments.snapshot import build_snapshot
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT

DAY = date(2026, 11, 20)
DAY_END = datetime.fromisoformat("2026-11-21T00:00:00+00:00")


SOONER = {"dormant_after_days": 3}


def loops_config(url: str, loops=(("first", {}), ("second", {}), ("third", SOONER))):
    """Loops of the shipped one's steps with these names and segment thresholds: by default
    `first` and `second` with the shipped thresholds, `third` dormant after 3 days."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    (shipped,) = document["loops"]
    configured = []
    for name, segments in loops:
        loop = copy.deepcopy(shipped)
        loop["name"] = name
        loop["segments"] = segments
        configured.append(loop)
    document["loops"] = configured
    return parse_config(document, environ={})


@pytest.fixture
def world(app_database_url):
    config = loops_config(app_database_url)
    engine = create_engine(app_database_url)
    install(engine, config)
    with engine.begin() as connection:
        # Away 4 days (dormant for `third` only), away 12 days (dormant for all), active today.
        for user, away in ((1, timedelta(days=4)), (2, timedelta(days=12)), (3, timedelta())):
            connection.execute(
                text("INSERT INTO users (id, email, created_at) VALUES (:id, :email, :at)"),
                {"id": user, "email": f"user{user}@example.com", "at": DAY_END - timedelta(90)},
            )
            connection.execute(
                text("INSERT INTO sessions (user_id, created_at) VALUES (:user, :at)"),
                {"user": user, "at": DAY_END - away - timedelta(hours=1)},
            )
    update_rollup(engine, config)
    yield engine, config
    engine.dispose()


def build(engine, config, day: date, loops=None) -> None:
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
        build_day_segments(connection, "retention", loops or config.loops, "UTC", day)


def segments(engine, day: date) -> dict[tuple[str, str], tuple]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT loop_name, user_id, segment, reason, entered_on "
                "FROM retention.engagement_segments WHERE partition_date = :day"
            ),
            {"day": day},
        ).all()
    return {(loop, user): tuple(rest) for loop, user, *rest in rows}


def stored(engine, day: date) -> tuple[dict[str, int], set[tuple[str, str]]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT rules_loop, count(*) FROM retention.classified_segments "
                "WHERE partition_date = :day GROUP BY 1"
            ),
            {"day": day},
        ).all()
        used = connection.execute(
            text(
                "SELECT loop_name, rules_loop FROM retention.segment_rules_used "
                "WHERE partition_date = :day"
            ),
            {"day": day},
        ).all()
    return dict(rows), {tuple(row) for row in used}


def test_loops_with_the_same_thresholds_are_classified_once(world):
    engine, config = world
    build(engine, config, DAY - timedelta(days=1))
    build(engine, config, DAY)

    assert stored(engine, DAY) == (
        {"first": 3, "third": 3},
        {("first", "first"), ("second", "first"), ("third", "third")},
    )
    shared = segments(engine, DAY)
    assert len(shared) == 9
    assert shared[("first", "1")][0] == shared[("second", "1")][0] == "active"
    assert shared[("third", "1")][:2] == ("dormant", "no activity for 4 days (threshold 3)")
    # Dormant since the day before, in every loop.
    assert {shared[(loop, "2")] for loop in ("first", "second", "third")} == {
        ("dormant", "no activity for 12 days (threshold 7)", DAY - timedelta(days=1)),
        ("dormant", "no activity for 12 days (threshold 3)", DAY - timedelta(days=1)),
    }

    # The preview shows every loop's segments, each user with the row the loop reads.
    with engine.connect() as connection:
        examples = segment_examples(connection, "retention", DAY, per_segment=1)
    assert len(examples) == 6
    for loop, segment, user, reason, entered_on in examples.itertuples(index=False):
        assert shared[(loop, user)] == (segment, reason, entered_on)
    assert sorted(examples["loop"] + "/" + examples["segment"]) == [
        "first/active",
        "first/dormant",
        "second/active",
        "second/dormant",
        "third/active",
        "third/dormant",
    ]

    # Each loop's rows are those it gets classified alone, the day before included.
    for loop in config.loops:
        build(engine, config, DAY - timedelta(days=1), [loop])
        build(engine, config, DAY, [loop])
        alone = segments(engine, DAY)
        assert alone == {key: row for key, row in shared.items() if key[0] == loop.name}
        assert stored(engine, DAY) == ({loop.name: 3}, {(loop.name, loop.name)})


def test_an_installed_database_moves_to_shared_segments_and_back(world):
    engine, config = world
    build(engine, config, DAY - timedelta(days=1))
    build(engine, config, DAY)
    before = segments(engine, DAY)

    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0018")
    with engine.connect() as connection:
        per_loop = connection.execute(
            text(
                "SELECT loop_name, user_id, segment, reason, entered_on "
                "FROM retention.engagement_segments WHERE partition_date = :day"
            ),
            {"day": DAY},
        ).all()
    # Every loop has rows of its own again.
    assert {(loop, user): tuple(rest) for loop, user, *rest in per_loop} == before
    assert len(per_loop) == 9

    install(engine, config)
    assert segments(engine, DAY) == before
    assert stored(engine, DAY) == (
        {"first": 3, "second": 3, "third": 3},
        {("first", "first"), ("second", "second"), ("third", "third")},
    )
    # The next day shares again, and carries `entered_on` over from the rows each loop had.
    build(engine, config, DAY + timedelta(days=1))
    after = segments(engine, DAY + timedelta(days=1))
    assert {after[(loop, "2")][2] for loop in ("first", "second", "third")} == {
        DAY - timedelta(days=1)
    }
    assert stored(engine, DAY + timedelta(days=1))[0] == {"first": 3, "third": 3}


def test_entered_on_follows_the_loops_that_kept_their_thresholds(world, app_database_url):
    engine, config = world
    two_days_before, day_before = DAY - timedelta(days=2), DAY - timedelta(days=1)
    build(engine, config, two_days_before)
    build(engine, config, day_before)
    # User 1, away 3 days then, became dormant for `third` only.
    assert segments(engine, day_before)[("third", "1")][0] == "dormant"
    assert segments(engine, day_before)[("first", "1")] == (
        "active",
        "active 1 of the last 28 days",
        two_days_before,
    )

    # `third` now keeps the shipped thresholds and is listed first, behind a loop that is new:
    # the three share the history of `first`, which had those thresholds the day before.
    changed = loops_config(app_database_url, (("zeroth", {}), ("third", {}), ("first", {})))
    build(engine, changed, DAY)
    assert stored(engine, DAY)[0] == {"zeroth": 3}
    today = segments(engine, DAY)
    for loop in ("zeroth", "third", "first"):
        assert today[(loop, "1")][0] == "active"
        assert today[(loop, "1")][2] == two_days_before, loop
        assert today[(loop, "2")][2] == two_days_before, loop


def test_an_upgrade_keeps_the_readers_grants_and_stops_at_views_of_others(world):
    engine, config = world
    reader = f"segments_reader_{uuid.uuid4().hex[:8]}"
    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0018")
        connection.execute(text(f"CREATE ROLE {reader}"))
        connection.execute(text(f"GRANT USAGE ON SCHEMA retention TO {reader}"))
        connection.execute(text(f"GRANT SELECT ON retention.engagement_segments TO {reader}"))
        connection.execute(
            text(
                "CREATE VIEW public.dormant_by_loop AS SELECT loop_name, count(*) "
                "FROM retention.engagement_segments WHERE segment = 'dormant' GROUP BY 1"
            )
        )
    try:
        with pytest.raises(ValueError) as refused:
            install(engine, config)
        assert str(refused.value) == (
            "revision 0019 makes retention.engagement_segments a view: drop dormant_by_loop "
            "(which reads it), upgrade, then create it again over the view"
        )
        with engine.begin() as connection:
            connection.execute(text("DROP VIEW public.dormant_by_loop"))
        install(engine, config)
        build(engine, config, DAY)
        with engine.begin() as connection:
            connection.execute(text(f"SET LOCAL ROLE {reader}"))
            read = connection.execute(
                text(
                    "SELECT count(*) FROM retention.engagement_segments WHERE partition_date = :d"
                ),
                {"d": DAY},
            ).scalar_one()
            assert read == 9
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"DROP OWNED BY {reader}"))
            connection.execute(text(f"DROP ROLE {reader}"))
