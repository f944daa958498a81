"""The demo data generator: deterministic, realistic, and safe to point at a database twice."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from retention_pipeline.demo import DemoSummary, seed_demo
from retention_pipeline.demo.seed import HABITS, TABLES

END = datetime(2025, 6, 1, 9, 30, tzinfo=ZoneInfo("Europe/Berlin"))
ARGS = {"users": 500, "days": 60, "seed": 20250601, "end": END}


@pytest.fixture(scope="module")
def make_database(create_database: Callable[[], str]) -> Iterator[Callable[[], sa.Engine]]:
    """Fresh databases on the test server (the conftest drops them at the end of the run)."""
    engines: list[sa.Engine] = []

    def make() -> sa.Engine:
        engine = sa.create_engine(create_database())
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def _seed(engine: sa.Engine, **overrides: object) -> DemoSummary:
    with engine.begin() as connection:
        return seed_demo(connection, **{**ARGS, **overrides})


@pytest.fixture(scope="module")
def seeded(make_database: Callable[[], sa.Engine]) -> tuple[sa.Engine, DemoSummary]:
    engine = make_database()
    return engine, _seed(engine)


def _dump_digests(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return {
            table: connection.execute(
                sa.text(f"SELECT md5(string_agg(t::text, E'\\n' ORDER BY t.id)) FROM {table} t")
            ).scalar_one()
            for table in TABLES
        }


def _scalar(engine: sa.Engine, sql: str, **params: object) -> object:
    with engine.connect() as connection:
        return connection.execute(sa.text(sql), params).scalar_one()


def test_same_arguments_give_identical_rows(
    seeded: tuple[sa.Engine, DemoSummary], make_database: Callable[[], sa.Engine]
) -> None:
    engine, summary = seeded
    again = make_database()

    assert _seed(again) == summary
    assert _dump_digests(again) == _dump_digests(engine)


def test_another_seed_gives_other_rows(
    seeded: tuple[sa.Engine, DemoSummary], make_database: Callable[[], sa.Engine]
) -> None:
    engine, _ = seeded
    other = make_database()
    _seed(other, seed=ARGS["seed"] + 1)

    assert _dump_digests(other)["events"] != _dump_digests(engine)["events"]


def test_summary_counts_the_rows_written(seeded: tuple[sa.Engine, DemoSummary]) -> None:
    engine, summary = seeded

    for table in TABLES:
        assert _scalar(engine, f"SELECT count(*) FROM {table}") == getattr(summary, table)
    assert summary.users == ARGS["users"]
    assert summary.events > 20 * summary.users
    assert summary.subscriptions < summary.users < summary.sessions < summary.events


def test_every_habit_is_present(seeded: tuple[sa.Engine, DemoSummary]) -> None:
    _, summary = seeded

    assert tuple(summary.habits) == HABITS
    assert all(count > 0 for count in summary.habits.values()), summary.habits
    assert sum(summary.habits.values()) == summary.users


def test_activity_lies_between_signup_and_end(seeded: tuple[sa.Engine, DemoSummary]) -> None:
    engine, _ = seeded
    start = END - timedelta(days=ARGS["days"])

    assert (
        _scalar(
            engine,
            "SELECT count(*) FROM users WHERE created_at < :start OR created_at > :end",
            start=start,
            end=END,
        )
        == 0
    )
    for table in ("events", "sessions"):
        outside = _scalar(
            engine,
            f"SELECT count(*) FROM {table} x JOIN users u ON u.id = x.user_id "
            "WHERE x.created_at < u.created_at OR x.created_at > :end",
            end=END,
        )
        assert outside == 0, table
    assert (
        _scalar(engine, "SELECT count(*) FROM events WHERE user_id NOT IN (SELECT id FROM users)")
        == 0
    )


def test_habits_show_in_the_data(seeded: tuple[sa.Engine, DemoSummary]) -> None:
    """The shapes the pipeline has to find are really there, measured from the rows alone."""
    engine, summary = seeded

    dormant_after_activity = _scalar(
        engine,
        """
        SELECT count(*) FROM (
            SELECT user_id, max(created_at) AS last_seen, count(*) AS events
            FROM events GROUP BY user_id
        ) e
        WHERE e.last_seen < CAST(:end AS timestamptz) - interval '7 days'
          AND e.last_seen > CAST(:end AS timestamptz) - interval '21 days'
          AND e.events >= 10
        """,
        end=END,
    )
    # Logged in this week, but at most a fifth of their average week over the four before.
    sessions_dropped = _scalar(
        engine,
        """
        SELECT count(*) FROM (
            SELECT user_id,
                   count(*) FILTER (
                       WHERE created_at > CAST(:end AS timestamptz) - interval '7 days') AS recent,
                   count(*) FILTER (
                       WHERE created_at <= CAST(:end AS timestamptz) - interval '7 days'
                         AND created_at > CAST(:end AS timestamptz) - interval '35 days'
                   ) / 4.0 AS baseline
            FROM sessions GROUP BY user_id
        ) s
        WHERE s.recent > 0 AND s.recent <= 0.2 * s.baseline
        """,
        end=END,
    )
    came_back = _scalar(
        engine,
        """
        SELECT count(DISTINCT user_id) FROM (
            SELECT user_id, created_at,
                   lag(created_at) OVER (PARTITION BY user_id ORDER BY created_at) AS previous
            FROM events
        ) e
        WHERE e.created_at > CAST(:end AS timestamptz) - interval '3 days'
          AND e.created_at - e.previous >= interval '10 days'
        """,
        end=END,
    )
    without_events = _scalar(
        engine,
        "SELECT count(*) FROM users u "
        "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.user_id = u.id)",
    )
    churned_and_canceled = _scalar(
        engine,
        """
        SELECT count(*) FROM subscriptions s
        WHERE s.status = 'canceled'
          AND NOT EXISTS (
              SELECT 1 FROM events e
              WHERE e.user_id = s.user_id
                AND e.created_at > CAST(:end AS timestamptz) - interval '30 days')
        """,
        end=END,
    )

    assert dormant_after_activity > 0
    assert sessions_dropped > 0
    assert came_back > 0
    assert without_events >= summary.habits["never_activated"]
    assert churned_and_canceled > 0


def test_events_are_named_and_carry_properties(seeded: tuple[sa.Engine, DemoSummary]) -> None:
    engine, _ = seeded
    with engine.connect() as connection:
        names = set(connection.execute(sa.text("SELECT DISTINCT name FROM events")).scalars())
        exported = connection.execute(
            sa.text(
                "SELECT properties FROM events WHERE name = 'report.exported' ORDER BY id LIMIT 1"
            )
        ).scalar_one()

    assert {"project.created", "report.exported", "dashboard.viewed", "invite.sent"} <= names
    assert exported["format"] in {"csv", "pdf", "xlsx"}


def test_subscriptions_look_like_stripe(seeded: tuple[sa.Engine, DemoSummary]) -> None:
    engine, _ = seeded
    with engine.connect() as connection:
        statuses = set(
            connection.execute(sa.text("SELECT DISTINCT status FROM subscriptions")).scalars()
        )
        amounts = {
            tuple(row)
            for row in connection.execute(
                sa.text("SELECT DISTINCT plan, billing_interval, amount_cents FROM subscriptions")
            )
        }
        inconsistent = connection.execute(
            sa.text(
                "SELECT count(*) FROM subscriptions "
                "WHERE (status = 'canceled') <> (canceled_at IS NOT NULL) "
                "OR created_at > updated_at OR updated_at > :end "
                "OR stripe_subscription_id NOT LIKE 'sub\\_%'"
            ),
            {"end": END},
        ).scalar_one()

    assert statuses == {"trialing", "active", "past_due", "canceled"}
    assert amounts <= {
        ("starter", "month", 1900),
        ("pro", "month", 4900),
        ("business", "month", 19900),
        ("starter", "year", 19000),
        ("pro", "year", 49000),
        ("business", "year", 199000),
    }
    assert inconsistent == 0


def test_app_inserts_continue_after_the_seeded_ids(
    make_database: Callable[[], sa.Engine],
) -> None:
    engine = make_database()
    summary = _seed(engine, users=50)
    with engine.begin() as connection:
        new_id = connection.execute(
            sa.text(
                "INSERT INTO events (user_id, name) VALUES (1, 'dashboard.viewed') RETURNING id"
            )
        ).scalar_one()

    assert new_id == summary.events + 1


def test_refuses_to_seed_twice(seeded: tuple[sa.Engine, DemoSummary]) -> None:
    engine, _ = seeded
    before = _dump_digests(engine)

    with pytest.raises(ValueError, match=r"public\.users already holds rows"):
        _seed(engine)
    assert _dump_digests(engine) == before


def test_events_per_slot_makes_bursts_of_the_events_drawn_without_it(
    seeded: tuple[sa.Engine, DemoSummary], make_database: Callable[[], sa.Engine]
) -> None:
    engine, summary = seeded
    deep = make_database()
    deep_summary = _seed(deep, events_per_slot=3)
    # Per user: events drawn by the habits (not the email's comebacks).
    per_user = sa.text(
        "SELECT user_id, count(*) FROM events "
        "WHERE properties <> CAST(:tag AS jsonb) GROUP BY user_id ORDER BY user_id"
    )
    tag = '{"utm_source": "re_engagement"}'
    with engine.connect() as connection:
        drawn = connection.execute(per_user, {"tag": tag}).all()
    with deep.connect() as connection:
        bursts = connection.execute(per_user, {"tag": tag}).all()

    assert (deep_summary.users, deep_summary.sessions) == (summary.users, summary.sessions)
    assert [(user, 3 * n) for user, n in drawn] == [tuple(row) for row in bursts]


def test_seeds_a_schema_whose_name_needs_quoting(make_database: Callable[[], sa.Engine]) -> None:
    engine = make_database()
    summary = _seed(engine, users=50, schema="Demo App")

    assert _scalar(engine, 'SELECT count(*) FROM "Demo App".users') == summary.users == 50
    assert _scalar(engine, "SELECT to_regclass('public.users') IS NULL") is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"end": datetime(2025, 6, 1)}, "timezone-aware"),
        ({"days": 7}, "days must be between"),
        ({"users": 0}, "users must be between"),
        ({"events_per_slot": 0}, "events_per_slot must be between"),
    ],
)
def test_rejects_bad_arguments(
    seeded: tuple[sa.Engine, DemoSummary], overrides: dict[str, object], message: str
) -> None:
    engine, _ = seeded

    with pytest.raises(ValueError, match=message):
        _seed(engine, **overrides)
