"""The activity rollup: backfill at install, triggers on every insert, and hostile rows that
must never make the app's insert fail."""

from __future__ import annotations

import time
import uuid
from datetime import date

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.database.app_tables import MappingError
from retention_pipeline.tracking.install import (
    install,
    refresh_from,
    refresh_incremental,
    uninstall,
)
from retention_pipeline_tests.helpers import make_config


@pytest.fixture
def engine(app_database_url):
    engine = create_engine(app_database_url)
    yield engine
    engine.dispose()


def rollup(engine, schema="retention"):
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                f"SELECT user_id, day, event_count, session_count FROM {schema}.activity_daily "
                "ORDER BY user_id, day"
            )
        ).all()
    return [tuple(row) for row in rows]


def actions(engine):
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT user_id, day, event_name, event_count FROM retention.action_daily "
                "ORDER BY user_id, day, event_name"
            )
        ).all()
    return [tuple(row) for row in rows]


def insert_users(connection, count=2):
    for number in range(1, count + 1):
        connection.execute(
            text(
                "INSERT INTO users (id, email, name, created_at) "
                "VALUES (:id, :email, :name, '2026-10-01T00:00Z')"
            ),
            {"id": number, "email": f"user{number}@example.com", "name": f"User {number}"},
        )


def test_install_backfills_existing_rows_then_triggers_keep_it_current(engine, app_database_url):
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) VALUES "
                "(1, 'report.exported', '2026-11-20T10:00Z'), "
                "(1, 'report.exported', '2026-11-20T11:00Z')"
            )
        )
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (2, '2026-11-21T08:00Z')")
        )
    with engine.begin() as connection:
        report = install(connection, config)
    assert report.backfilled and report.rollup_rows == 2
    assert rollup(engine) == [("1", date(2026, 11, 20), 2, 0), ("2", date(2026, 11, 21), 0, 1)]

    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) VALUES "
                "(1, 'project.created', '2026-11-20T12:00Z'), "
                "(2, 'invite.sent', '2026-11-21T09:00Z')"
            )
        )
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (1, '2026-11-20T07:00Z')")
        )
    assert rollup(engine) == [("1", date(2026, 11, 20), 3, 1), ("2", date(2026, 11, 21), 1, 1)]
    assert actions(engine) == [
        ("1", date(2026, 11, 20), "project.created", 1),
        ("1", date(2026, 11, 20), "report.exported", 2),
        ("2", date(2026, 11, 21), "invite.sent", 1),
    ]
    with engine.begin() as connection:
        again = install(connection, config)
    assert not again.backfilled
    assert rollup(engine)[0] == ("1", date(2026, 11, 20), 3, 1)


@pytest.mark.parametrize("path", ["triggers", "backfill"])
def test_hostile_rows_never_fail_the_app_insert(engine, app_database_url, path):
    """The same rows give the same rollup whether triggers see them or the install backfills."""
    with engine.begin() as connection:
        insert_users(connection)
        if path == "triggers":
            install(connection, make_config(app_database_url))
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) VALUES "
                "(NULL, 'orphan', '2026-11-20T10:00Z'),"  # no user
                "(424242, 'ghost', '2026-11-20T10:00Z'),"  # unknown user
                "(1, 'time.travel', '2099-01-01T00:00Z'),"  # far future
                "(1, 'ancient', '1901-01-01T00:00Z'),"  # far past
                "(1, 'forever', 'infinity'),"  # not a finite time
                "(1, '', '2026-11-20T10:00Z'),"  # empty name
                "(2, repeat('x', 5000), '2026-11-20T10:00Z'),"  # absurd name
                "(2, 'dup', '2026-11-20T10:00Z'), (2, 'dup', '2026-11-20T10:00Z')"  # duplicates
            )
        )
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "SELECT 1, 'bulk', '2026-11-22T10:00Z' FROM generate_series(1, 500)"
            )
        )
    if path == "backfill":
        with engine.begin() as connection:
            install(connection, make_config(app_database_url))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM events")).scalar() == 509
    assert rollup(engine) == [
        ("1", date(1901, 1, 1), 1, 0),
        ("1", date(2026, 11, 20), 1, 0),
        ("1", date(2026, 11, 22), 500, 0),
        ("1", date(2099, 1, 1), 1, 0),
        ("2", date(2026, 11, 20), 3, 0),
        ("424242", date(2026, 11, 20), 1, 0),
    ]
    names = {name for _user, _day, name, _count in actions(engine)}
    assert "(unnamed)" in names
    assert max(len(name) for name in names) == 200
    assert ("2", date(2026, 11, 20), "dup", 2) in actions(engine)


def test_a_broken_rollup_is_a_warning_and_a_logged_error_not_a_failed_insert(
    engine, app_database_url
):
    with engine.begin() as connection:
        insert_users(connection)
        install(connection, make_config(app_database_url))
        connection.execute(text("DROP TABLE retention.action_daily"))
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "VALUES (1, 'x', '2026-11-20T10:00Z')"
            )
        )
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM events")).scalar() == 1
        ((source, sqlstate, message),) = connection.execute(
            text("SELECT source_table, sqlstate, message FROM retention.tracking_errors")
        ).all()
    assert source == "public.events"
    assert sqlstate == "42P01"
    assert "action_daily" in message


def test_the_app_role_needs_no_rights_on_the_pipeline_schema(engine, app_database_url):
    role = f"app_{uuid.uuid4().hex[:8]}"
    with engine.begin() as connection:
        insert_users(connection)
        install(connection, make_config(app_database_url))
        connection.execute(text(f"CREATE ROLE {role}"))
        connection.execute(text(f"GRANT INSERT ON events, sessions TO {role}"))
    try:
        with engine.begin() as connection:
            connection.execute(text(f"SET ROLE {role}"))
            connection.execute(
                text(
                    "INSERT INTO events (user_id, name, created_at) "
                    "VALUES (1, 'x', '2026-11-20T10:00Z')"
                )
            )
            connection.execute(
                text("INSERT INTO sessions (user_id, created_at) VALUES (1, '2026-11-20T10:00Z')")
            )
            connection.execute(text("RESET ROLE"))
        assert rollup(engine) == [("1", date(2026, 11, 20), 1, 1)]
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"REVOKE ALL ON events, sessions FROM {role}"))
            connection.execute(text(f"DROP ROLE {role}"))


def test_days_are_bucketed_in_the_loop_timezone(engine, app_database_url):
    with engine.begin() as connection:
        insert_users(connection)
        install(connection, make_config(app_database_url, timezone="Europe/Berlin"))
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) VALUES "
                "(1, 'late', '2026-11-20T22:59Z'),"  # 23:59 in Berlin: the 20th
                "(1, 'early', '2026-11-20T23:01Z')"  # 00:01 in Berlin: the 21st
            )
        )
    assert rollup(engine) == [("1", date(2026, 11, 20), 1, 0), ("1", date(2026, 11, 21), 1, 0)]

    # Changing the timezone rebuilds the rollup in the new buckets.
    with engine.begin() as connection:
        report = install(connection, make_config(app_database_url, timezone="UTC"))
    assert report.backfilled
    assert rollup(engine) == [("1", date(2026, 11, 20), 2, 0)]


def test_bad_mapping_is_one_line_and_installs_nothing(engine, app_database_url):
    tables = {
        "events": {
            "table": "product_events",
            "columns": {"user_id": "user_id", "name": "name", "created_at": "created_at"},
        }
    }
    with pytest.raises(MappingError) as raised, engine.begin() as connection:
        install(connection, make_config(app_database_url, tables=tables))
    assert str(raised.value) == (
        "database.tables.events.table: app table public.product_events does not exist "
        "in the app database"
    )
    tables = {
        "sessions": {
            "table": "sessions",
            "columns": {"user_id": "account_id", "created_at": "created_at"},
        }
    }
    with (
        pytest.raises(
            MappingError,
            match=r"^database.tables.sessions.columns.user_id: column "
            r"'account_id' does not exist in public.sessions",
        ),
        engine.begin() as connection,
    ):
        install(connection, make_config(app_database_url, tables=tables))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT to_regnamespace('retention')")).scalar() is None
        assert (
            connection.execute(
                text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            ).scalar()
            == 0
        )


def test_a_failure_midway_leaves_nothing_half_installed(engine, app_database_url):
    with engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA retention"))
        # An object in the way of the first migration makes it fail after the schema step.
        connection.execute(text("CREATE TABLE retention.activity_daily (x int)"))
    with pytest.raises(Exception, match="already exists"), engine.begin() as connection:
        install(connection, make_config(app_database_url))
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            ).scalar()
            == 0
        )
        assert (
            connection.execute(text("SELECT to_regclass('retention.tracking_state')")).scalar()
            is None
        )


def test_uninstall_removes_everything_the_pipeline_added(engine, app_database_url):
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
        install(connection, config)
    with engine.begin() as connection:
        uninstall(connection, config)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT to_regnamespace('retention')")).scalar() is None
        assert (
            connection.execute(
                text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            ).scalar()
            == 0
        )
        assert (
            connection.execute(
                text("SELECT count(*) FROM pg_proc WHERE proname LIKE 'track_%'")
            ).scalar()
            == 0
        )
        connection.execute(
            text("INSERT INTO events (user_id, name, created_at) VALUES (1, 'x', now())")
        )
        assert connection.execute(text("SELECT count(*) FROM users")).scalar() == 2


def test_incremental_mode_installs_no_trigger_and_refreshes_recent_days(engine, app_database_url):
    config = make_config(app_database_url, tracking="incremental")
    with engine.begin() as connection:
        insert_users(connection)
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "VALUES (1, 'old', now() - interval '5 days')"
            )
        )
        install(connection, config)
        assert (
            connection.execute(
                text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            ).scalar()
            == 0
        )
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) VALUES (1, 'new', now()), "
                "(2, 'late', now() - interval '20 hours')"
            )
        )
    assert sum(row[2] for row in rollup(engine)) == 1
    with engine.begin() as connection:
        since = refresh_incremental(connection, config)
    assert since is not None
    assert sum(row[2] for row in rollup(engine)) == 3
    with engine.begin() as connection:
        refresh_incremental(connection, config)
    assert sum(row[2] for row in rollup(engine)) == 3


def test_an_insert_never_waits_long_on_another_transaction_of_the_same_user(
    engine, app_database_url
):
    """Two app transactions touching one user's day: the second waits at most the trigger's lock
    timeout, then goes through with its rollup update skipped and logged."""
    with engine.begin() as connection:
        insert_users(connection)
        install(connection, make_config(app_database_url))
    holder = engine.connect()
    holder.begin()
    holder.execute(
        text("INSERT INTO events (user_id, name, created_at) VALUES (1, 'a', '2026-11-20T10:00Z')")
    )
    try:
        started = time.monotonic()
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO events (user_id, name, created_at) "
                    "VALUES (1, 'b', '2026-11-20T11:00Z')"
                )
            )
        waited = time.monotonic() - started
    finally:
        holder.commit()
        holder.close()
    assert waited < 10
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM events")).scalar() == 2
        sqlstate = connection.execute(
            text("SELECT sqlstate FROM retention.tracking_errors")
        ).scalar()
    assert sqlstate == "55P03"
    assert rollup(engine) == [("1", date(2026, 11, 20), 1, 0)]


def test_refresh_repairs_days_the_triggers_skipped(engine, app_database_url):
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
        install(connection, config)
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "VALUES (1, 'a', '2026-11-19T10:00Z')"
            )
        )
        connection.execute(text("ALTER TABLE retention.action_daily RENAME TO broken"))
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "VALUES (1, 'b', '2026-11-20T10:00Z')"
            )
        )
        connection.execute(text("ALTER TABLE retention.broken RENAME TO action_daily"))
    assert rollup(engine) == [("1", date(2026, 11, 19), 1, 0)]
    with engine.begin() as connection:
        refresh_from(connection, config, date(2026, 11, 20))
    assert rollup(engine) == [("1", date(2026, 11, 19), 1, 0), ("1", date(2026, 11, 20), 1, 0)]
    assert ("1", date(2026, 11, 20), "b", 1) in actions(engine)
