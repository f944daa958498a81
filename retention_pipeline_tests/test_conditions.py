"""Loop conditions: built-in segments, and custom SQL as in the seed, read-only, with a timeout,
over the pipeline's as-of views."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.config import parse_config
from retention_pipeline.demo import seed_demo
from retention_pipeline.segments.conditions import ConditionError, condition_user_ids
from retention_pipeline.segments.rules import build_day_segments
from retention_pipeline.segments.snapshot import build_snapshot
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT

SEED_QUERY = SHIPPED_DOCUMENT["loops"][0]["steps"][0]["condition"]["query"]


def loop_with(condition: dict, url: str):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    document["loops"][0]["steps"][0]["condition"] = condition
    config = parse_config(document, environ={})
    return config, config.loops[0]


@pytest.fixture(scope="module")
def demo(create_database):
    """Demo data ending at the start of today (UTC), segmented for yesterday."""
    url = create_database()
    engine = create_engine(url)
    day = datetime.now(UTC).date() - timedelta(days=1)
    config, _ = loop_with({"type": "segment", "segment": "dormant"}, url)
    with engine.begin() as connection:
        seed_demo(
            connection,
            users=600,
            days=90,
            seed=7,
            end=datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC),
        )
    install(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
        build_day_segments(connection, "retention", config.loops, "UTC", day)
    yield engine, url, day
    engine.dispose()


def test_the_seed_query_as_written_runs_on_the_views(demo):
    engine, url, day = demo
    _, loop = loop_with({"type": "query", "query": SEED_QUERY, "timeout": "10m"}, url)
    selected = condition_user_ids(engine, "retention", loop, day)
    assert selected


def test_the_seed_query_and_the_dormant_rule_differ_only_as_documented(demo):
    engine, url, day = demo
    _, dormant_loop = loop_with({"type": "segment", "segment": "dormant"}, url)
    dormant = condition_user_ids(engine, "retention", dormant_loop, day)
    as_of_query = SEED_QUERY.replace("NOW()", "as_of()")
    _, seed_loop = loop_with({"type": "query", "query": as_of_query, "timeout": "1m"}, url)
    seed_as_of = condition_user_ids(engine, "retention", seed_loop, day)
    _, written_loop = loop_with({"type": "query", "query": SEED_QUERY, "timeout": "1m"}, url)
    seed_as_written = condition_user_ids(engine, "retention", written_loop, day)
    with engine.connect() as connection:
        segment_of = dict(
            connection.execute(
                text(
                    "SELECT user_id, segment FROM retention.engagement_segments "
                    "WHERE partition_date = :day"
                ),
                {"day": day},
            ).all()
        )
        reason_of = dict(
            connection.execute(
                text(
                    "SELECT user_id, reason FROM retention.engagement_segments "
                    "WHERE partition_date = :day"
                ),
                {"day": day},
            ).all()
        )
    # The seed's query looks at inactivity only: it also picks churned users (canceled and
    # away 30+ days), and misses users dormant by their auth-session drop.
    assert {segment_of[user] for user in seed_as_of - dormant} <= {"churned"}
    assert all(reason_of[user].startswith("auth sessions down") for user in dormant - seed_as_of)
    assert dormant & seed_as_of
    # NOW() is later than the end of the partition day, so as written it selects a superset.
    assert seed_as_of <= seed_as_written


def test_a_query_without_a_user_id_column_is_one_line(demo):
    engine, url, day = demo
    _, loop = loop_with({"type": "query", "query": "SELECT email FROM users", "timeout": "1m"}, url)
    with pytest.raises(ConditionError) as raised:
        condition_user_ids(engine, "retention", loop, day)
    assert str(raised.value) == (
        "loops.re_engagement.condition.query: returns no user id column "
        "(expected one of user_id, id; got email)"
    )


def test_a_failing_query_is_one_line_naming_the_loop(demo):
    engine, url, day = demo
    _, loop = loop_with(
        {"type": "query", "query": "SELECT id FROM no_such_table", "timeout": "1m"}, url
    )
    with pytest.raises(
        ConditionError,
        match=r"^loops.re_engagement.condition.query: relation "
        r'"no_such_table" does not exist$',
    ):
        condition_user_ids(engine, "retention", loop, day)


def test_a_slow_query_times_out(demo):
    engine, url, day = demo
    _, loop = loop_with(
        {"type": "query", "query": "SELECT id FROM users, pg_sleep(5)", "timeout": "200ms"}, url
    )
    with pytest.raises(ConditionError, match="timed out"):
        condition_user_ids(engine, "retention", loop, day)


def test_a_query_cannot_write(demo):
    engine, url, day = demo
    query = "SELECT id FROM users WHERE nextval('retention.email_send_log_id_seq') > 0"
    _, loop = loop_with({"type": "query", "query": query, "timeout": "1m"}, url)
    with pytest.raises(ConditionError, match="read-only transaction"):
        condition_user_ids(engine, "retention", loop, day)


def test_valid_sql_that_text_rules_refused_runs(demo):
    engine, url, day = demo
    _, plain = loop_with({"type": "query", "query": "SELECT id FROM users", "timeout": "1m"}, url)
    everyone = condition_user_ids(engine, "retention", plain, day)
    assert everyone
    for query in (
        "SELECT id FROM users -- every user",
        "SELECT id FROM users; -- every user",
        "SELECT id FROM users WHERE email <> ';' /* not a separator */;",
        "-- leading comment\nSELECT id FROM users WHERE name IS DISTINCT FROM 'é;'",
    ):
        _, loop = loop_with({"type": "query", "query": query, "timeout": "1m"}, url)
        assert condition_user_ids(engine, "retention", loop, day) == everyone, query


@pytest.mark.parametrize(
    ("query", "got"),
    [
        ("SELECT id FROM users; DROP TABLE users", "2 statements"),
        ("DELETE FROM users WHERE id = 1", "DELETE"),
        ("UPDATE users SET email = NULL", "UPDATE"),
        (
            "WITH gone AS (DELETE FROM users RETURNING id) SELECT id FROM gone",
            "DELETE inside a WITH",
        ),
        ("SELECT id INTO kept FROM users", "SELECT INTO"),
        ("SELECT id FROM users FOR UPDATE", "a row-locking SELECT (FOR UPDATE/SHARE)"),
        ("-- nothing here", "0 statements"),
    ],
)
def test_anything_but_one_select_is_refused_plainly(demo, query, got):
    engine, url, day = demo
    _, loop = loop_with({"type": "query", "query": query, "timeout": "1m"}, url)
    with pytest.raises(ConditionError) as raised:
        condition_user_ids(engine, "retention", loop, day)
    assert str(raised.value) == (
        f"loops.re_engagement.condition.query: a condition must be a single SELECT (got {got})"
    )


def test_a_syntax_error_is_postgresqls_own_message(demo):
    engine, url, day = demo
    _, loop = loop_with({"type": "query", "query": "SELECT id FORM users", "timeout": "1m"}, url)
    with pytest.raises(ConditionError) as raised:
        condition_user_ids(engine, "retention", loop, day)
    assert str(raised.value) == (
        'loops.re_engagement.condition.query: syntax error at or near "users" (at character 16)'
    )


def test_connection_is_usable_after_a_failed_query(demo):
    engine, url, day = demo
    _, bad = loop_with({"type": "query", "query": "SELECT 1/0 AS id", "timeout": "1m"}, url)
    with pytest.raises(ConditionError, match="division by zero"):
        condition_user_ids(engine, "retention", bad, day)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
        assert connection.execute(text("SHOW transaction_read_only")).scalar() == "off"
