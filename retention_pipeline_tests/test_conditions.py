"""Loop conditions: built-in segments, and custom SQL as in the seed, read-only, with a timeout,
over the pipeline's as-of views."""

from __future__ import annotations

import copy
import importlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.config import parse_config
from retention_pipeline.database.batch import BATCH_WORK_MEM
from retention_pipeline.demo import seed_demo
from retention_pipeline.segments.conditions import (
    ConditionError,
    as_of_day_end,
    condition_user_ids,
)
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
    """Demo data ending ten days ago (UTC), segmented for its last day: a day the real clock is
    not at, so a read of the clock left as written shows."""
    url = create_database()
    engine = create_engine(url)
    day = datetime.now(UTC).date() - timedelta(days=11)
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
    # NOW() means the end of the partition day, as as_of() does.
    assert seed_as_of == seed_as_written


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


def test_a_query_runs_as_a_batch_statement_and_its_settings_end_with_it(demo):
    engine, url, day = demo
    query = (
        "SELECT id FROM users WHERE current_setting('jit') = 'off' "
        f"AND current_setting('work_mem') = '{BATCH_WORK_MEM}'"
    )
    _, loop = loop_with({"type": "query", "query": query, "timeout": "1m"}, url)
    with engine.connect() as connection:
        everyone = set(
            connection.execute(
                text(
                    "SELECT user_id FROM retention.user_activity_snapshot WHERE partition_date = :d"
                ),
                {"d": day},
            ).scalars()
        )
    assert everyone and condition_user_ids(engine, "retention", loop, day) == everyone
    with engine.connect() as connection:
        assert connection.execute(text("SHOW work_mem")).scalar_one() != BATCH_WORK_MEM


def test_the_users_view_reads_as_it_did_before_revision_0021(demo):
    """Same rows and values as the view 0008 made, over emails of every kind: sent after the
    last activity or before it, failed, another loop's, after the day's end, and twice."""
    engine, url, day = demo
    before = importlib.import_module(
        "retention_pipeline.database.migrations.versions.0008_day_partitions"
    ).USERS_VIEW
    with engine.connect() as connection, connection.begin():
        connection.execute(
            text(
                before.replace("CREATE VIEW {q}.users", "CREATE TEMP VIEW users_before").format(
                    q="retention"
                )
            )
        )
        connection.execute(
            text("""SELECT set_config('retention.partition_date', :day, true),
                           set_config('retention.loop', 're_engagement', true)"""),
            {"day": day.isoformat()},
        )
        connection.execute(
            text("""
                INSERT INTO retention.email_send_log (send_key, loop_name, user_id,
                    episode_start, step, partition_date, email, template, variant, batch_key,
                    subject, html, body_text, status, sent_at)
                SELECT snap.user_id || '/' || email.step, email.loop, snap.user_id, :day,
                       email.step, :day, snap.email, 're_engagement', 'a', 'batch', 's', 'h',
                       't', email.status, email.sent_at
                FROM (SELECT *, row_number() OVER (ORDER BY user_id) % 6 AS kind
                      FROM retention.user_activity_snapshot WHERE partition_date = :day
                     ) AS snap
                CROSS JOIN LATERAL (VALUES
                    (0, 0, 're_engagement', 'sent', snap.last_activity_at + interval '1 hour'),
                    (1, 0, 're_engagement', 'sent', snap.last_activity_at - interval '1 hour'),
                    (2, 0, 're_engagement', 'failed', snap.last_activity_at + interval '1 hour'),
                    (3, 0, 'other_loop', 'sent', snap.last_activity_at + interval '1 hour'),
                    (4, 0, 're_engagement', 'sent', retention.as_of() + interval '1 hour'),
                    (5, 0, 're_engagement', 'sent', snap.last_activity_at - interval '1 hour'),
                    (5, 1, 're_engagement', 'sent', snap.signed_up_at + interval '1 hour')
                ) AS email(kind, step, loop, status, sent_at)
                WHERE email.kind = snap.kind"""),
            {"day": day},
        )
        rows = connection.execute(text("SELECT * FROM retention.users ORDER BY id")).all()
        rows_before = connection.execute(text("SELECT * FROM users_before ORDER BY id")).all()
    assert rows == rows_before
    assert {row.re_engagement_sent for row in rows} == {True, False}
    assert {row.segment for row in rows} >= {"dormant", "active"}


def test_a_condition_joins_only_what_it_reads(demo):
    engine, url, day = demo
    plans = {}
    for name, query in {
        "activity": "SELECT id FROM users WHERE last_activity_at < as_of() - interval '7 days'",
        "segment": "SELECT id FROM users WHERE segment = 'dormant'",
        "sent": "SELECT id FROM users WHERE NOT re_engagement_sent",
    }.items():
        with engine.connect() as connection, connection.begin():
            connection.execute(
                text("""SELECT set_config('retention.partition_date', :day, true),
                               set_config('retention.loop', 're_engagement', true),
                               set_config('search_path', 'retention', true)"""),
                {"day": day.isoformat()},
            )
            plans[name] = "\n".join(connection.execute(text(f"EXPLAIN {query}")).scalars())
    assert "classified_segments" not in plans["activity"]
    assert "email_send_log" not in plans["activity"]
    assert "classified_segments" in plans["segment"]
    assert "email_send_log" not in plans["segment"]
    assert "email_send_log" in plans["sent"]
    assert "classified_segments" not in plans["sent"]
    # The day's end is worked out once, not once per email of the send log.
    assert "InitPlan" in plans["sent"]
    assert "as_of()" not in plans["sent"]


def test_re_engagement_sent_can_read_the_send_log_from_its_index(demo):
    """The emails' rendered bodies need not be read: an index holds all the view reads of the
    loop's sent emails (a plan allowed no scan that reads the table takes it)."""
    engine, url, day = demo
    with engine.connect() as connection, connection.begin():
        connection.execute(
            text("""SELECT set_config('retention.partition_date', :day, true),
                           set_config('retention.loop', 're_engagement', true),
                           set_config('search_path', 'retention', true),
                           set_config('enable_seqscan', 'off', true),
                           set_config('enable_bitmapscan', 'off', true),
                           set_config('enable_indexscan', 'off', true)"""),
            {"day": day.isoformat()},
        )
        plan = "\n".join(
            connection.execute(
                text("EXPLAIN SELECT id FROM users WHERE NOT re_engagement_sent")
            ).scalars()
        )
    assert "Index Only Scan using email_send_log_sent_by_loop_user" in plan


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
        f"loops.re_engagement.condition.query: the query must be a single SELECT (got {got})"
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


@pytest.mark.parametrize(
    ("clock", "as_day_end"),
    [
        ("now()", "CAST($1 AS timestamp with time zone)"),
        ("NOW()", "CAST($1 AS timestamp with time zone)"),
        ("pg_catalog.now()", "CAST($1 AS timestamp with time zone)"),
        ("transaction_timestamp()", "CAST($1 AS timestamp with time zone)"),
        ("statement_timestamp()", "CAST($1 AS timestamp with time zone)"),
        ("clock_timestamp()", "CAST($1 AS timestamp with time zone)"),
        ("timeofday()", "CAST($1 AS pg_catalog.text)"),
        ("current_timestamp", "CAST($1 AS timestamp with time zone)"),
        ("current_timestamp(3)", "CAST($1 AS timestamp with time zone)"),
        ("current_date", "CAST($1 AS pg_catalog.date)"),
        ("current_time", "CAST($1 AS time with time zone)"),
        ("current_time(0)", "CAST($1 AS time with time zone)"),
        ("localtimestamp", "CAST($1 AS timestamp)"),
        ("localtimestamp(2)", "CAST($1 AS timestamp)"),
        ("localtime", "CAST($1 AS time)"),
        ("localtime(1)", "CAST($1 AS time)"),
        ("'now'::timestamptz", "CAST($1 AS timestamp with time zone)"),
        ("timestamp 'now'", "CAST($1 AS timestamp)"),
        ("CAST('today' AS date)", "CAST($1 AS pg_catalog.date)"),
        ("date 'today'", "CAST($1 AS pg_catalog.date)"),
        ("'today'::date", "CAST($1 AS pg_catalog.date)"),
        ("'today'::timestamptz", "CAST($1 AS timestamp with time zone)"),
        ("timestamp 'today'", "CAST($1 AS timestamp)"),
        ("date 'yesterday'", "CAST(CAST($1 AS pg_catalog.date) - 1 AS pg_catalog.date)"),
        ("'tomorrow'::date", "CAST(CAST($1 AS pg_catalog.date) + 1 AS pg_catalog.date)"),
        ("CAST(' Tomorrow' AS date)", "CAST(CAST($1 AS pg_catalog.date) + 1 AS pg_catalog.date)"),
        ("timestamp 'yesterday'", "CAST(CAST($1 AS pg_catalog.date) - 1 AS timestamp)"),
        (
            "'yesterday'::timestamptz",
            "CAST(CAST($1 AS pg_catalog.date) - 1 AS timestamp with time zone)",
        ),
        (
            "'tomorrow'::timestamp with time zone",
            "CAST(CAST($1 AS pg_catalog.date) + 1 AS timestamp with time zone)",
        ),
        ("'yesterday'::time", "CAST($1 AS time)"),
        ("age(created_at)", "age(CAST(CAST($1 AS pg_catalog.date) AS timestamp), created_at)"),
        (
            "pg_catalog.age(now())",
            "pg_catalog.age(CAST(CAST($1 AS pg_catalog.date) AS timestamp), "
            "CAST($1 AS timestamp with time zone))",
        ),
    ],
)
def test_every_read_of_the_clock_becomes_the_bound_day_end(clock, as_day_end):
    rewritten = as_of_day_end(f"SELECT id FROM users WHERE created_at < {clock}", "here")
    assert rewritten == f"SELECT id FROM users WHERE created_at < {as_day_end}"


def test_the_seed_query_reads_the_day_end_and_nothing_else_changes():
    assert as_of_day_end(SEED_QUERY, "here") == (
        "SELECT * FROM users WHERE last_activity_at < CAST($1 AS timestamp with time zone) "
        "- CAST('7 days' AS interval) AND re_engagement_sent = FALSE"
    )


@pytest.mark.parametrize(
    "query",
    [
        "SELECT id FROM users WHERE email LIKE '%now()%' -- current_date in a comment",
        "SELECT id, 'now'::text AS word FROM users",
        "SELECT id FROM users WHERE now_ish(created_at)",
        "SELECT id FROM users WHERE elsewhere.now() > created_at",
        "SELECT id FROM users WHERE age(created_at, TIMESTAMP '2026-01-01') > interval '1 day'",
        "SELECT id, 'epoch'::timestamptz, 'infinity'::date, 'yesterday'::text FROM users",
    ],
)
def test_a_query_that_reads_no_clock_runs_as_written(query):
    assert as_of_day_end(query, "here") is None


def test_a_query_with_parameters_of_its_own_is_refused():
    with pytest.raises(ConditionError) as raised:
        as_of_day_end("SELECT id FROM users WHERE created_at < $1", "loops.x.condition.query")
    assert str(raised.value) == (
        "loops.x.condition.query: a condition takes no parameters ($1, $2, ...)"
    )


@pytest.mark.parametrize(
    "clock_at_day_end",
    [
        "now() = TIMESTAMPTZ '{end} 00:00+00'",
        "current_timestamp = TIMESTAMPTZ '{end} 00:00+00'",
        "clock_timestamp() = as_of()",
        "statement_timestamp() = as_of() AND transaction_timestamp() = as_of()",
        "timeofday()::timestamptz = as_of()",
        "current_date = DATE '{end}'",
        "current_date - 7 = (now() - interval '7 days')::date",
        "localtimestamp = TIMESTAMP '{end} 00:00'",
        "localtime = TIME '00:00' AND current_time = TIMETZ '00:00+00'",
        "'now'::timestamptz = as_of() AND date 'today' = DATE '{end}'",
        "'today'::date = DATE '{end}' AND CAST('today' AS date) = DATE '{end}'",
        "'today'::timestamptz = as_of() AND timestamp 'today' = TIMESTAMP '{end} 00:00'",
        "date 'yesterday' = DATE '{day}' AND 'yesterday'::date = DATE '{day}'",
        "timestamp 'yesterday' = TIMESTAMP '{day} 00:00'",
        "'yesterday'::timestamptz = TIMESTAMPTZ '{day} 00:00+00'",
        "CAST('tomorrow' AS date) = DATE '{after}' AND date 'tomorrow' = DATE '{after}'",
        "'tomorrow'::timestamp = TIMESTAMP '{after} 00:00'",
        "'tomorrow'::timestamptz = TIMESTAMPTZ '{after} 00:00+00'",
        "age(TIMESTAMP '{day} 00:00') = interval '1 day'",
        "age(TIMESTAMPTZ '{day} 12:00+00') = interval '12 hours'",
    ],
)
def test_the_clock_reads_as_the_end_of_the_partition_day(demo, clock_at_day_end):
    engine, url, day = demo
    _, plain = loop_with({"type": "query", "query": "SELECT id FROM users", "timeout": "1m"}, url)
    everyone = condition_user_ids(engine, "retention", plain, day)
    assert everyone
    condition = clock_at_day_end.format(
        day=day, end=day + timedelta(days=1), after=day + timedelta(days=2)
    )
    query = f"SELECT id FROM users WHERE {condition} AND email <> '%s' -- literal %"
    _, loop = loop_with({"type": "query", "query": query, "timeout": "1m"}, url)
    assert condition_user_ids(engine, "retention", loop, day) == everyone


def test_the_clock_reads_the_day_end_in_the_loops_timezone(demo):
    engine, url, day = demo
    end = day + timedelta(days=1)
    query = (
        f"SELECT id FROM users WHERE now() = TIMESTAMPTZ '{end} 00:00+09' "
        f"AND current_date = DATE '{end}' AND localtimestamp = TIMESTAMP '{end} 00:00' "
        f"AND 'yesterday'::timestamptz = TIMESTAMPTZ '{day} 00:00+09'"
    )
    _, loop = loop_with({"type": "query", "query": query, "timeout": "1m"}, url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE retention.tracking_state SET timezone = 'Asia/Tokyo'"))
    try:
        selected = condition_user_ids(engine, "retention", loop, day)
    finally:
        with engine.begin() as connection:
            connection.execute(text("UPDATE retention.tracking_state SET timezone = 'UTC'"))
    assert selected
