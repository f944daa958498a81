"""Send-time learning: each reader's hour from when they used to be active (the rollup's
5-minute slots), a random share at the fixed local time, and the learned-against-fixed
comparison of their return rates."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import yaml
from sqlalchemy import text

from retention_pipeline.defs.outcomes import PERFORMANCE
from retention_pipeline.outcomes.evaluate import evaluate_outcomes
from retention_pipeline.outcomes.send_time import send_time_markdown, send_time_rows
from retention_pipeline.outcomes.stats import newcombe_difference
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline_tests.helpers import shipped_asset
from retention_pipeline_tests.sending.local_time_support import (
    build_day,
    build_loop_audience,
    local_time_config,
    local_time_document,
)
from retention_pipeline_tests.sending.support import LOOP, SendingDatabase, User

DAY = date(2026, 11, 20)
BUILT_AT = datetime(2026, 11, 21, 9, 4, tzinfo=UTC)
LEARN = {"learn": True, "fixed_share": 0.3, "weeks": 2}
SLOTS = 300


def active(hours: list[int]) -> str:
    """The rollup's slots of a day with activity in the first 5 minutes of each of `hours`."""
    bits = ["0"] * SLOTS
    for hour in hours:
        bits[hour * 12] = "1"
    return "".join(bits)


def add_activity(db: SendingDatabase, user_ids: list[str], day: date, hours: list[int]) -> None:
    with db.engine.begin() as connection:
        connection.execute(
            text("""
                INSERT INTO retention.activity_daily (user_id, day, event_count, session_count,
                    active_slots, visit_count)
                VALUES (:user, :day, 1, 0, CAST(:slots AS bit(300)), 1)"""),
            [{"user": user, "day": day, "slots": active(hours)} for user in user_ids],
        )


def arms_and_due(db: SendingDatabase) -> dict[str, tuple[str, datetime]]:
    with db.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT user_id, send_time_arm, due_at FROM retention.reengagement_audience")
        ).all()
    return {row.user_id: (row.send_time_arm, row.due_at) for row in rows}


def test_a_readers_hour_is_the_one_they_were_most_often_active_in_a_share_at_the_fixed_time(
    sending_db: SendingDatabase,
) -> None:
    config = local_time_config(sending_db.url, send_at=LEARN)
    people = [
        User(user_id=f"u{n:05d}", email=f"user{n}@example.com", timezone="Asia/Tokyo")
        for n in range(300)
    ]
    usual, tied, never = people[:200], people[200:250], people[250:]
    # Active at 14:00 (UTC, the loops' timezone) on 5 days of the last two weeks, at 03:00 on 2.
    for back in range(5):
        add_activity(sending_db, [p.user_id for p in usual], DAY - timedelta(days=back), [14])
    for back in range(5, 7):
        add_activity(sending_db, [p.user_id for p in usual], DAY - timedelta(days=back), [3])
    # Three weeks ago: older than `weeks`, not counted.
    for back in range(15, 21):
        add_activity(sending_db, [p.user_id for p in usual], DAY - timedelta(days=back), [22])
    # As often at 05:00 as at 20:00: the earlier hour.
    add_activity(sending_db, [p.user_id for p in tied], DAY, [5, 20])
    build_day(sending_db, config, people, DAY, BUILT_AT)

    drawn = arms_and_due(sending_db)
    fixed = {user for user, (arm, _due) in drawn.items() if arm == "fixed"}
    assert 0.2 < len(fixed) / len(people) < 0.4
    tokyo_nine = datetime(2026, 11, 22, 0, tzinfo=UTC)  # 09:00 in Tokyo, after the build
    for person in people:
        arm, due_at = drawn[person.user_id]
        if arm == "fixed" or person in never:
            expected = tokyo_nine
        elif person in usual:
            expected = datetime(2026, 11, 21, 14, tzinfo=UTC)
        else:
            expected = datetime(2026, 11, 22, 5, tzinfo=UTC)
        assert due_at == expected, (person.user_id, arm)
    # The draw is the user's: building the day again draws everyone alike.
    with sending_db.engine.begin() as connection:
        build_loop_audience(connection, config, people, DAY, BUILT_AT + timedelta(minutes=5))
    assert {user for user, (arm, _due) in arms_and_due(sending_db).items() if arm == "fixed"} == (
        fixed
    )


def test_the_learned_and_the_fixed_readers_return_rates_are_compared_with_an_interval(
    sending_db: SendingDatabase,
) -> None:
    config = local_time_config(sending_db.url, send_at=LEARN)
    people = [
        User(user_id=f"u{n:05d}", email=f"user{n}@example.com", timezone="UTC") for n in range(300)
    ]
    build_day(sending_db, config, people, DAY, BUILT_AT)
    drawn = arms_and_due(sending_db)
    learned = sorted(user for user, (arm, _due) in drawn.items() if arm == "learned")
    fixed = sorted(user for user, (arm, _due) in drawn.items() if arm == "fixed")
    # Half the learned readers come back three days after the build, a tenth of the fixed ones.
    back_learned, back_fixed = learned[::2], fixed[::10]
    add_activity(sending_db, back_learned + back_fixed, DAY + timedelta(days=3), [12])
    with sending_db.engine.begin() as connection:
        evaluate_outcomes(
            connection, config=config, loop=config.loop(LOOP), day=DAY + timedelta(days=9)
        )
        # Read as of the build's own day, nothing is over yet: a day built again later does
        # not count what it could not have known.
        assert send_time_rows(connection, schema="retention", loop_name=LOOP, day=DAY) == []
        rows = send_time_rows(
            connection, schema="retention", loop_name=LOOP, day=DAY + timedelta(days=9)
        )

    seven = next(row for row in rows if row.window_days == 7)
    assert (seven.learned_finished, seven.learned_returned) == (len(learned), len(back_learned))
    assert (seven.fixed_finished, seven.fixed_returned) == (len(fixed), len(back_fixed))
    expected = newcombe_difference(len(back_learned), len(learned), len(back_fixed), len(fixed))
    assert np.allclose(seven.difference, [float(value) for value in expected])
    assert seven.difference[1] > 0
    assert seven.verdict == "learned times bring more users back"
    table = send_time_markdown(rows)
    assert f"| 7d | {len(back_learned)} / {len(learned)} | {len(back_fixed)} / {len(fixed)} |" in (
        table
    )
    # The 14- and 30-day windows are not over: their early returns are not compared yet.
    assert [row.window_days for row in rows] == [7]


def test_the_performance_asset_shows_the_send_time_comparison(
    sending_db: SendingDatabase, tmp_path: Path
) -> None:
    document = local_time_document(sending_db.url, send_at=LEARN)
    config_path = tmp_path / "retention.yaml"
    config_path.write_text(yaml.safe_dump(document))
    config = local_time_config(sending_db.url, send_at=LEARN)
    people = [
        User(user_id=f"u{n:05d}", email=f"user{n}@example.com", timezone="UTC") for n in range(40)
    ]
    build_day(sending_db, config, people, DAY, BUILT_AT)
    with sending_db.engine.begin() as connection:
        evaluate_outcomes(
            connection, config=config, loop=config.loop(LOOP), day=DAY + timedelta(days=9)
        )

    result = dg.materialize(
        [shipped_asset(PERFORMANCE)],
        partition_key=(DAY + timedelta(days=9)).isoformat(),
        resources={"app_database": AppDatabase(config_path=str(config_path))},
    )
    (materialization,) = result.asset_materializations_for_node("retention__campaign_performance")
    table = materialization.metadata[f"{LOOP}/send_time"]
    assert isinstance(table, dg.MarkdownMetadataValue)
    learned = sum(1 for arm, _due in arms_and_due(sending_db).values() if arm == "learned")
    assert f"| 7d | 0 / {learned} | 0 / {len(people) - learned} | " in table.value
