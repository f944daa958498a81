"""Activity tracking: the triggers only append to a capture, the drain folds it into the rollup,
an install rebuilds history online, and users deleted from the app are erased.

Every test that counts compares the rollup with the truth computed from the app tables."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.database.app_tables import MappingError
from retention_pipeline.email.message import OutgoingEmail
from retention_pipeline.email.outbox import OutboxSender
from retention_pipeline.segments.rules import build_day_segments
from retention_pipeline.segments.snapshot import build_snapshot
from retention_pipeline.tracking import install as install_module
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install, refresh_from, uninstall
from retention_pipeline.tracking.state import RebuildPending
from retention_pipeline_tests.helpers import insert_sent_email, make_config


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


def truth(engine, timezone="UTC"):
    """The rollup as it should be, computed from the app tables alone."""
    with engine.connect() as connection:
        rows = connection.execute(
            text("""
                WITH e AS (
                    SELECT user_id::text AS user_id, (created_at AT TIME ZONE :tz)::date AS day,
                           count(*) AS n
                    FROM events
                    WHERE user_id IS NOT NULL AND isfinite(created_at) GROUP BY 1, 2),
                s AS (
                    SELECT user_id::text AS user_id, (created_at AT TIME ZONE :tz)::date AS day,
                           count(*) AS n
                    FROM sessions WHERE isfinite(created_at) GROUP BY 1, 2)
                SELECT coalesce(e.user_id, s.user_id), coalesce(e.day, s.day),
                       coalesce(e.n, 0), coalesce(s.n, 0)
                FROM e FULL JOIN s USING (user_id, day)
                ORDER BY 1, 2"""),
            {"tz": timezone},
        ).all()
    return [tuple(row) for row in rows]


def capture_rows(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT (SELECT count(*) FROM retention.activity_capture_0) "
                "+ (SELECT count(*) FROM retention.activity_capture_1)"
            )
        ).scalar_one()


@pytest.fixture
def installed(engine, app_database_url):
    """Two users, and the pipeline installed; returns the configuration."""
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
    install(engine, config)
    return config


def insert_users(connection, count=2):
    for number in range(1, count + 1):
        connection.execute(
            text(
                "INSERT INTO users (id, email, name, created_at) "
                "VALUES (:id, :email, :name, '2026-10-01T00:00Z')"
            ),
            {"id": number, "email": f"user{number}@example.com", "name": f"User {number}"},
        )


def insert_events(engine, rows: list[tuple[int | None, str, str]]) -> None:
    with engine.begin() as connection:
        for user_id, name, at in rows:
            connection.execute(
                text("INSERT INTO events (user_id, name, created_at) VALUES (:u, :n, :at)"),
                {"u": user_id, "n": name, "at": at},
            )


def test_install_backfills_then_the_capture_is_drained_into_the_rollup(engine, app_database_url):
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
    insert_events(
        engine,
        [(1, "report.exported", "2026-11-20T10:00Z"), (1, "report.exported", "2026-11-20T11:00Z")],
    )
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (2, '2026-11-21T08:00Z')")
        )
    report = install(engine, config)
    assert report.rebuilt_chunks == 1 and report.rollup_rows == 2
    assert rollup(engine) == [("1", date(2026, 11, 20), 2, 0), ("2", date(2026, 11, 21), 0, 1)]

    insert_events(
        engine,
        [(1, "project.created", "2026-11-20T12:00Z"), (2, "invite.sent", "2026-11-21T09:00Z")],
    )
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (1, '2026-11-20T07:00Z')")
        )
    # The app's transactions only appended to the capture; the rollup waits for the drain.
    assert capture_rows(engine) == 3
    assert rollup(engine)[0] == ("1", date(2026, 11, 20), 2, 0)
    update = update_rollup(engine, config)
    assert (update.events, update.sessions) == (2, 1)
    assert (
        rollup(engine)
        == truth(engine)
        == [
            ("1", date(2026, 11, 20), 3, 1),
            ("2", date(2026, 11, 21), 1, 1),
        ]
    )
    assert actions(engine) == [
        ("1", date(2026, 11, 20), "project.created", 1),
        ("1", date(2026, 11, 20), "report.exported", 2),
        ("2", date(2026, 11, 21), "invite.sent", 1),
    ]
    assert capture_rows(engine) == 0
    # Draining again, or installing again, counts nothing twice.
    assert update_rollup(engine, config).events == 0
    assert install(engine, config).rebuilt_chunks == 0
    assert rollup(engine) == truth(engine)


def test_the_capture_is_truncated_whole_and_does_not_grow(engine, installed):
    config = installed
    for _round in range(3):
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO events (user_id, name, created_at) "
                    "SELECT 1, 'bulk', '2026-11-22T10:00Z' FROM generate_series(1, 5000)"
                )
            )
        update_rollup(engine, config)
        with engine.connect() as connection:
            sizes = connection.execute(
                text(
                    "SELECT pg_relation_size('retention.activity_capture_0') "
                    "+ pg_relation_size('retention.activity_capture_1')"
                )
            ).scalar_one()
        assert sizes == 0
    assert rollup(engine) == [("1", date(2026, 11, 22), 15000, 0)]


HOSTILE_ROWS = [
    (None, "orphan", "2026-11-20T10:00Z"),  # no user
    (424242, "ghost", "2026-11-20T10:00Z"),  # unknown user
    (1, "time.travel", "2099-01-01T00:00Z"),  # far future
    (1, "ancient", "1901-01-01T00:00Z"),  # far past
    (1, "forever", "infinity"),  # not a finite time
    (1, "never", "-infinity"),
    (1, "", "2026-11-20T10:00Z"),  # empty name
    (2, "x" * 10_000, "2026-11-20T10:00Z"),  # a 10 kB name
    (2, "dup", "2026-11-20T10:00Z"),  # duplicates
    (2, "dup", "2026-11-20T10:00Z"),
]


@pytest.mark.parametrize("path", ["capture", "rebuild"])
def test_hostile_rows_never_fail_the_app_insert(engine, app_database_url, path):
    """The same rows give the same rollup whether captured and drained, or rebuilt."""
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
    if path == "capture":
        install(engine, config)
    insert_events(engine, HOSTILE_ROWS)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "SELECT 1, 'bulk', '2026-11-22T10:00Z' FROM generate_series(1, 500)"
            )
        )
    if path == "rebuild":
        install(engine, config)
    else:
        update_rollup(engine, config)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM events")).scalar() == 510
    assert rollup(engine) == truth(engine)
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


def test_a_broken_rollup_never_fails_an_app_insert(engine, installed):
    config = installed
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE retention.action_daily"))
    insert_events(engine, [(1, "x", "2026-11-20T10:00Z")])
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM events")).scalar() == 1
    assert capture_rows(engine) == 1
    # The drain fails, folds nothing, and keeps the capture for after the repair.
    with pytest.raises(Exception, match="action_daily"):
        update_rollup(engine, config)
    assert capture_rows(engine) == 1


def test_inserts_of_one_hot_user_never_wait_on_each_other(engine, installed):
    """Two open app transactions writing the same user's day: neither waits on the other, and
    both are counted (the old in-transaction upsert made the second wait, then lost it)."""
    config = installed
    holder = engine.connect()
    holder.begin()
    holder.execute(
        text("INSERT INTO events (user_id, name, created_at) VALUES (1, 'a', '2026-11-20T10:00Z')")
    )
    holder.execute(
        text("INSERT INTO sessions (user_id, created_at) VALUES (1, '2026-11-20T10:00Z')")
    )
    try:
        with engine.begin() as connection:
            # Any lock wait at all would fail this transaction.
            connection.execute(text("SET LOCAL lock_timeout = '50ms'"))
            connection.execute(
                text(
                    "INSERT INTO events (user_id, name, created_at) "
                    "VALUES (1, 'b', '2026-11-20T11:00Z')"
                )
            )
            connection.execute(
                text("INSERT INTO sessions (user_id, created_at) VALUES (1, '2026-11-20T11:00Z')")
            )
    finally:
        holder.commit()
        holder.close()
    update_rollup(engine, config)
    assert rollup(engine) == truth(engine) == [("1", date(2026, 11, 20), 2, 2)]


def test_the_app_role_needs_no_rights_on_the_pipeline_schema(engine, app_database_url):
    config = make_config(app_database_url)
    role = f"app_{uuid.uuid4().hex[:8]}"
    with engine.begin() as connection:
        insert_users(connection)
    install(engine, config)
    with engine.begin() as connection:
        connection.execute(text(f"CREATE ROLE {role}"))
        connection.execute(
            text(f"GRANT INSERT, DELETE, SELECT ON events, sessions, users TO {role}")
        )
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
            connection.execute(text("DELETE FROM users WHERE id = 2"))
            connection.execute(text("RESET ROLE"))
        update_rollup(engine, config)
        assert rollup(engine) == [("1", date(2026, 11, 20), 1, 1)]
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"REVOKE ALL ON events, sessions, users FROM {role}"))
            connection.execute(text(f"DROP ROLE {role}"))


def test_days_are_bucketed_in_the_loop_timezone(engine, app_database_url):
    berlin = make_config(app_database_url, timezone="Europe/Berlin")
    with engine.begin() as connection:
        insert_users(connection)
    install(engine, berlin)
    insert_events(
        engine,
        [
            (1, "late", "2026-11-20T22:59Z"),  # 23:59 in Berlin: the 20th
            (1, "early", "2026-11-20T23:01Z"),  # 00:01 in Berlin: the 21st
        ],
    )
    update_rollup(engine, berlin)
    assert rollup(engine) == [("1", date(2026, 11, 20), 1, 0), ("1", date(2026, 11, 21), 1, 0)]

    # Changing the timezone rebuilds the rollup in the new buckets, the capture included.
    insert_events(engine, [(1, "undrained", "2026-11-20T23:30Z")])
    report = install(engine, make_config(app_database_url, timezone="UTC"))
    assert report.rebuilt_chunks == 1
    update_rollup(engine, make_config(app_database_url, timezone="UTC"))
    assert rollup(engine) == truth(engine) == [("1", date(2026, 11, 20), 3, 0)]


def test_bad_mapping_is_one_line_and_installs_nothing(engine, app_database_url):
    tables = {
        "events": {
            "table": "product_events",
            "columns": {"user_id": "user_id", "name": "name", "created_at": "created_at"},
        }
    }
    with pytest.raises(MappingError) as raised:
        install(engine, make_config(app_database_url, tables=tables))
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
    with pytest.raises(
        MappingError,
        match=r"^database.tables.sessions.columns.user_id: column "
        r"'account_id' does not exist in public.sessions",
    ):
        install(engine, make_config(app_database_url, tables=tables))
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
    with pytest.raises(Exception, match="already exists"):
        install(engine, make_config(app_database_url))
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


def test_an_app_transaction_holding_a_table_delays_the_install_not_the_app(
    engine, app_database_url
):
    """While a long app transaction holds the events table, the install gives up its lock
    request every 200 ms instead of queueing every later insert behind it, and goes through
    once the transaction ends."""
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
    holder = engine.connect()
    holder.begin()
    holder.execute(
        text("INSERT INTO events (user_id, name, created_at) VALUES (1, 'a', '2026-11-20T10:00Z')")
    )
    import threading

    installed = threading.Thread(target=install, args=(engine, config))
    installed.start()
    try:
        time.sleep(1.0)
        # Meanwhile other app inserts go through without waiting on the install's request.
        with engine.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '300ms'"))
            connection.execute(
                text(
                    "INSERT INTO events (user_id, name, created_at) "
                    "VALUES (2, 'b', '2026-11-20T10:00Z')"
                )
            )
    finally:
        holder.commit()
        holder.close()
    installed.join(timeout=60)
    assert not installed.is_alive()
    update_rollup(engine, config)
    assert rollup(engine) == truth(engine)
    assert sum(row[2] for row in rollup(engine)) == 2


def test_rows_written_during_a_rebuild_count_once_at_the_seam(
    engine, app_database_url, monkeypatch
):
    """Rows committed while the install rebuilds are in the app tables and in the capture at
    once; whether their day range is already rebuilt or not, each counts exactly once."""
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "SELECT 1 + g % 2, 'history', "
                "       timestamptz '2026-11-01T12:00Z' + g * interval '1 day' "
                "FROM generate_series(0, 19) AS g"
            )
        )
    monkeypatch.setattr(install_module, "REBUILD_CHUNK_ROWS", 4)
    written = []

    def write_during_rebuild(line: str) -> None:
        # After each range: one row in the first (rebuilt) range, one in the last (not yet).
        insert_events(engine, [(1, "seam", "2026-11-01T13:00Z"), (2, "seam", "2026-11-30T13:00Z")])
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO sessions (user_id, created_at) VALUES (1, '2026-11-15T09:00Z')")
            )
        written.append(line)

    report = install(engine, config, progress=write_during_rebuild)
    assert report.rebuilt_chunks == len(written) == 5
    update_rollup(engine, config)
    assert rollup(engine) == truth(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM events")).scalar() == 30


def test_the_drain_waits_for_an_unfinished_rebuild(engine, installed):
    config = installed
    with engine.begin() as connection:
        connection.execute(text("UPDATE retention.tracking_state SET rebuild_pending = true"))
    with pytest.raises(RebuildPending, match="run it again if it stopped"):
        update_rollup(engine, config)
    install(engine, config)
    assert update_rollup(engine, config).events == 0


def wait_for_a_drain_waiting_on(engine, lock: str, drains: int = 1) -> None:
    """Until `drains` sessions wait on a lock of this kind (`relation`, `advisory`)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = :lock"
                ),
                {"lock": lock},
            ).scalar_one()
        if waiting >= drains:
            return
        time.sleep(0.05)
    raise AssertionError(f"no drain waits on a {lock} lock")


def behind_an_open_app_insert(engine, insert: str, work, meanwhile=lambda: None):
    """`work()` in a thread while an app transaction that ran `insert` stays open, until `work`
    waits on a table lock it holds; then `meanwhile()`, the app's commit, and `work`'s result."""
    app = engine.connect()
    try:
        app.execute(text(insert))
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(work)
            wait_for_a_drain_waiting_on(engine, "relation")
            meanwhile()
            app.commit()
            return running.result(timeout=60)
    finally:
        app.close()


HELD_EVENT = "INSERT INTO events (user_id, name, created_at) VALUES (1, 'held', now())"


def test_a_drain_counts_what_its_lock_waited_for_whatever_the_default_isolation(
    engine, installed, app_database_url
):
    # A database whose sessions default to REPEATABLE READ (`default_transaction_isolation`).
    repeatable_read = create_engine(app_database_url, isolation_level="REPEATABLE READ")
    try:
        # It waits to lock the capture table the app's open transaction wrote to.
        behind_an_open_app_insert(
            engine, HELD_EVENT, lambda: update_rollup(repeatable_read, installed)
        )
    finally:
        repeatable_read.dispose()
    assert rollup(engine) == truth(engine)
    assert capture_rows(engine) == 0


def test_a_user_deleted_while_a_drain_runs_is_not_brought_back_by_the_next(engine, installed):
    """User 2 acts and is deleted after the drain switched capture tables, before it erases
    them: the row the capture took must not bring them back into the rollup. It still counts
    for its source (the reconciliation compares the app's rows with the rows counted)."""

    def act_then_leave():
        insert_events(engine, [(2, "last", "2026-11-02T10:00Z")])
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM users WHERE id = 2"))

    # Switched, it waits to lock the capture table the app's open transaction wrote to.
    drained = behind_an_open_app_insert(
        engine, HELD_EVENT, lambda: update_rollup(engine, installed), act_then_leave
    )
    assert drained.erased_users == 1

    update_rollup(engine, installed)

    assert {row[0] for row in rollup(engine)} == {"1"}
    assert capture_rows(engine) == 0
    with engine.connect() as connection:
        counted = connection.execute(
            text("SELECT rows FROM retention.source_day_rows WHERE day = '2026-11-02'")
        ).scalar_one()
    assert counted == 1


def test_two_drains_at_once_take_turns_and_count_everything_once(engine, installed):
    # Every change of the tracking state, with the session that made it.
    with engine.begin() as connection:
        connection.execute(
            text("""
                CREATE TABLE drain_trace (id serial, pid integer);
                CREATE FUNCTION trace_drain() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN INSERT INTO drain_trace (pid) VALUES (pg_backend_pid()); RETURN NULL; END $$;
                CREATE TRIGGER trace_drain AFTER UPDATE ON retention.tracking_state
                FOR EACH ROW EXECUTE FUNCTION trace_drain();""")
        )
        inactive = connection.execute(
            text("SELECT 1 - capture_slot FROM retention.tracking_state")
        ).scalar_one()
    insert_events(engine, [(1, "before", "2026-11-02T10:00Z"), (2, "before", "2026-11-02T11:00Z")])
    # An app transaction that wrote to the other capture table just before a switch: the first
    # drain waits for it in its first fold, holding the lock, and the second drain queues.
    app = engine.connect()
    try:
        app.execute(text(f"LOCK TABLE retention.activity_capture_{inactive} IN ROW EXCLUSIVE MODE"))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(update_rollup, engine, installed)
            wait_for_a_drain_waiting_on(engine, "relation")
            second = pool.submit(update_rollup, engine, installed)
            wait_for_a_drain_waiting_on(engine, "advisory")
            insert_events(engine, [(1, "meanwhile", "2026-11-03T10:00Z")])
            app.commit()
            updates = [first.result(timeout=60), second.result(timeout=60)]
    finally:
        app.close()
    assert sum(update.events for update in updates) == 3
    assert rollup(engine) == truth(engine)
    assert capture_rows(engine) == 0
    # Each drain switches the capture, then records its end: the second only once the first
    # has ended, never between the first's transactions.
    with engine.connect() as connection:
        pids = connection.execute(text("SELECT pid FROM drain_trace ORDER BY id")).scalars().all()
    assert len(pids) == 4
    assert pids[0] == pids[1] != pids[2] == pids[3]


def kill_after(arguments: list[str], until: str | float) -> str:
    """Start the tracking worker; SIGKILL it when it prints `until` (or after `until` s)."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "retention_pipeline_tests.tracking_worker", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    try:
        if isinstance(until, str):
            for line in worker.stdout:
                seen += line
                if until in line:
                    break
        else:
            time.sleep(until)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    return seen


def test_an_install_killed_midway_resumes_and_counts_everything_once(engine, app_database_url):
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection, count=20)
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "SELECT 1 + g % 20, 'e' || g % 3, "
                "       timestamptz '2026-09-01T12:00Z' + (g % 60) * interval '1 day' "
                "FROM generate_series(1, 6000) AS g"
            )
        )
        connection.execute(
            text(
                "INSERT INTO sessions (user_id, created_at) "
                "SELECT 1 + g % 20, timestamptz '2026-09-01T08:00Z' + (g % 60) * interval '1 day' "
                "FROM generate_series(1, 600) AS g"
            )
        )
    seen = kill_after(["install", app_database_url, "1000"], until="rollup rebuild 2/")
    assert "rollup rebuild 2/" in seen
    insert_events(engine, [(3, "meanwhile", "2026-09-02T10:00Z"), (4, "meanwhile", "2026-12-01")])
    with pytest.raises(RebuildPending):
        update_rollup(engine, config)
    report = install(engine, config)
    assert 0 < report.rebuilt_chunks < 7
    update_rollup(engine, config)
    assert rollup(engine) == truth(engine)


def test_a_drain_killed_at_any_point_loses_and_repeats_nothing(engine, app_database_url):
    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection, count=50)
    install(engine, config)
    for delay in (0.0, 0.3, 0.6, 0.9, 1.2, 1.5):
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO events (user_id, name, created_at) "
                    "SELECT 1 + g % 50, 'e' || g % 7, "
                    "       timestamptz '2026-11-01' + (g % 1000) * interval '1 hour' "
                    "FROM generate_series(1, 60000) AS g"
                )
            )
        kill_after(["drain", app_database_url], until=delay)
    update_rollup(engine, config)
    assert rollup(engine) == truth(engine)
    assert capture_rows(engine) == 0


def test_rows_for_a_day_already_snapshotted_are_named_as_late(engine, installed):
    config = installed
    insert_events(engine, [(1, "on time", "2026-11-20T10:00Z")])
    update_rollup(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config, date(2026, 11, 20))
    insert_events(engine, [(1, "late", "2026-11-20T23:00Z"), (2, "today", "2026-11-21T01:00Z")])
    update = update_rollup(engine, config)
    assert update.late_days == (date(2026, 11, 20),)
    assert rollup(engine) == truth(engine)


def every_column(engine) -> tuple[list[tuple], list[tuple]]:
    """Both rollup tables, every column."""
    with engine.connect() as connection:
        daily = connection.execute(
            text(
                "SELECT user_id, day, event_count, session_count, last_event_at, last_session_at,"
                " active_slots, visit_count FROM retention.activity_daily ORDER BY user_id, day"
            )
        ).all()
        per_action = connection.execute(
            text(
                "SELECT user_id, day, event_name, event_count, last_at FROM retention.action_daily"
                " ORDER BY user_id, day, event_name"
            )
        ).all()
    return [tuple(row) for row in daily], [tuple(row) for row in per_action]


def every_column_from_the_app(engine, gap_slots: int = 6) -> tuple[list[tuple], list[tuple]]:
    """Both rollup tables as they should be (in UTC), computed here from the app's rows: a
    day's slots are its 5-minute steps with activity, and a visit starts at a slot with none in
    the `gap_slots` before it."""
    with engine.connect() as connection:
        rows = connection.execute(
            text("""
                SELECT 'e', user_id::text, created_at, name FROM events
                UNION ALL SELECT 's', user_id::text, created_at, NULL FROM sessions""")
        ).all()
    days: dict[tuple[str, date], dict] = {}
    per_action: dict[tuple[str, date, str], list] = {}
    for kind, user_id, at, name in rows:
        at = at.astimezone(UTC)
        day = days.setdefault(
            (user_id, at.date()), {"e": 0, "s": 0, "last_e": None, "last_s": None, "slots": set()}
        )
        day[kind] += 1
        day[f"last_{kind}"] = max(filter(None, (day[f"last_{kind}"], at)))
        day["slots"].add((at.hour * 60 + at.minute) // 5)
        if kind == "e":
            counted = per_action.setdefault((user_id, at.date(), name), [0, at])
            counted[0] += 1
            counted[1] = max(counted[1], at)
    daily = []
    for (user_id, day), figures in sorted(days.items()):
        slots = figures["slots"]
        bits = "".join("1" if slot in slots else "0" for slot in range(300))
        visits = sum(
            1 for slot in slots if not any(slot - back in slots for back in range(1, gap_slots + 1))
        )
        daily.append(
            (
                user_id,
                day,
                figures["e"],
                figures["s"],
                figures["last_e"],
                figures["last_s"],
                bits,
                visits,
            )
        )
    return daily, [(*key, count, last) for key, (count, last) in sorted(per_action.items())]


def test_one_drain_adds_to_a_day_the_rollup_holds_and_inserts_the_days_it_does_not(
    engine, installed
):
    """The fold upserts the keys of the days the rollup holds and inserts the others plainly:
    in one drain, a held day (new keys and keys it has) between two new days, every column of
    both tables as the app's rows make them."""
    config = installed
    insert_events(
        engine,
        [
            (1, "a", "2026-11-20T10:00Z"),
            (1, "b", "2026-11-20T10:20Z"),
            (2, "a", "2026-11-20T23:50Z"),
        ],
    )
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO sessions (user_id, created_at) VALUES (1, '2026-11-20T09:00Z')")
        )
    update_rollup(engine, config)
    insert_events(
        engine,
        [
            (1, "a", "2026-11-20T12:00Z"),  # a key the held day has
            (1, "c", "2026-11-20T10:05Z"),  # a new key of a held user-day
            (2, "a", "2026-11-18T08:00Z"),  # a day before the held one, caught up
            (1, "a", "2026-11-21T00:10Z"),  # the next day's first drain
            (2, "d", "2026-11-21T08:00Z"),
            (2, "d", "2026-11-21T08:40Z"),
        ],
    )
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO sessions (user_id, created_at) VALUES "
                "(2, '2026-11-20T11:00Z'), (2, '2026-11-21T08:30Z'), (1, '2026-11-18T23:59Z')"
            )
        )
    update = update_rollup(engine, config)
    assert update.user_days == 6
    assert every_column(engine) == every_column_from_the_app(engine)


def test_refresh_repairs_days_without_double_counting_the_capture(engine, installed):
    config = installed
    insert_events(engine, [(1, "a", "2026-11-19T10:00Z"), (1, "b", "2026-11-20T10:00Z")])
    update_rollup(engine, config)
    with engine.begin() as connection:
        connection.execute(text("UPDATE retention.activity_daily SET event_count = 99"))
    insert_events(engine, [(1, "c", "2026-11-20T11:00Z")])  # still in the capture
    added = refresh_from(engine, config, date(2026, 11, 20))
    assert added.events == 1
    update_rollup(engine, config)
    assert rollup(engine) == [("1", date(2026, 11, 19), 99, 0), ("1", date(2026, 11, 20), 2, 0)]
    assert ("1", date(2026, 11, 20), "c", 1) in actions(engine)


def test_incremental_mode_installs_no_trigger_and_uses_the_same_fold(engine, app_database_url):
    config = make_config(app_database_url, tracking="incremental")
    with engine.begin() as connection:
        insert_users(connection)
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) "
                "VALUES (1, 'old', now() - interval '5 days')"
            )
        )
    install(engine, config)
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            ).scalar()
            == 0
        )
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (user_id, name, created_at) VALUES (1, 'new', now()), "
                "(2, 'late', now() - interval '20 hours')"
            )
        )
    assert sum(row[2] for row in rollup(engine)) == 1
    update = update_rollup(engine, config)
    assert update.polled_sources == ("events", "sessions")
    assert rollup(engine) == truth(engine)
    update_rollup(engine, config)
    assert rollup(engine) == truth(engine)


def test_switching_from_triggers_to_incremental_keeps_the_undrained_capture(
    engine, app_database_url
):
    with engine.begin() as connection:
        insert_users(connection)
    install(engine, make_config(app_database_url))
    insert_events(engine, [(1, "captured", "2026-11-01T10:00Z")])
    incremental = make_config(app_database_url, tracking="incremental")
    install(engine, incremental)
    update_rollup(engine, incremental)
    assert rollup(engine) == truth(engine) == [("1", date(2026, 11, 1), 1, 0)]


@pytest.mark.parametrize("mode", ["triggers", "incremental"])
def test_a_user_deleted_in_the_app_is_erased_everywhere(engine, app_database_url, tmp_path, mode):
    config = make_config(app_database_url, tracking=mode)
    with engine.begin() as connection:
        insert_users(connection)
    insert_events(engine, [(1, "a", "2026-11-20T10:00Z"), (2, "b", "2026-11-20T10:00Z")])
    install(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config, date(2026, 11, 20))
        build_day_segments(connection, "retention", config.loops, "UTC", date(2026, 11, 20))
        connection.execute(
            text(
                "INSERT INTO retention.email_suppressions (email, user_id, reason) "
                "VALUES ('user1@example.com', '1', 'unsubscribed')"
            )
        )
    insert_sent_email(engine, "1", "sent-1", "sent")
    insert_sent_email(engine, "2", "sent-2", "sent")
    with engine.begin() as connection:
        connection.execute(
            text("""
                INSERT INTO retention.email_events (svix_id, event_type, provider_email_id,
                    send_log_id, occurred_at, detail)
                SELECT 'msg-' || user_id, 'bounced', 're-' || user_id, id, now(),
                       jsonb_build_object('bounce', '550 <' || email || '> unknown')
                FROM retention.email_send_log""")
        )
    outbox = OutboxSender(tmp_path)
    outbox.send(
        [
            OutgoingEmail(key=key, to="x@example.com", subject="s", html="<p>h</p>", text="t")
            for key in ("sent-1", "sent-2")
        ]
    )

    with engine.begin() as connection:
        connection.execute(text("DELETE FROM users WHERE id = 1"))
    update = update_rollup(engine, config)
    assert update.erased_users == 1
    assert update.erased_send_keys == ("sent-1",)

    with engine.connect() as connection:
        for table in (
            "activity_daily",
            "action_daily",
            "user_activity_snapshot",
            "engagement_segments",
        ):
            users = connection.execute(
                text(f"SELECT DISTINCT user_id FROM retention.{table} ORDER BY 1")
            ).scalars()
            assert list(users) == ["2"], table
        logged = connection.execute(
            text(
                "SELECT user_id, email, subject, html, status FROM retention.email_send_log "
                "ORDER BY user_id"
            )
        ).all()
        assert [tuple(row) for row in logged] == [
            ("1", "", "", "", "sent"),
            ("2", "user2@example.com", "We miss you, 2", "<p>Hi 2</p>", "sent"),
        ]
        suppressed = connection.execute(
            text("SELECT email, user_id FROM retention.email_suppressions")
        ).one()
        assert tuple(suppressed) == ("user1@example.com", None)
        details = connection.execute(
            text("SELECT svix_id, detail FROM retention.email_events ORDER BY svix_id")
        ).all()
        assert [tuple(row) for row in details] == [
            ("msg-1", {}),
            ("msg-2", {"bounce": "550 <user2@example.com> unknown"}),
        ]
    from retention_pipeline.email.outbox import remove_from_outbox

    assert remove_from_outbox(tmp_path, update.erased_send_keys) == 2
    remaining = sorted(path.suffix for path in tmp_path.iterdir())
    assert remaining == [".eml", ".html"]


def test_uninstall_removes_everything_the_pipeline_added(engine, installed):
    config = installed
    uninstall(engine, config)
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
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO events (user_id, name, created_at) VALUES (1, 'x', now())")
        )
        connection.execute(text("DELETE FROM users WHERE id = 2"))
        assert connection.execute(text("SELECT count(*) FROM users")).scalar() == 1


def test_upgrading_from_revision_0003_keeps_the_rollup(engine, app_database_url):
    """An install made before the capture existed keeps its rollup: the trigger functions are
    replaced in place, so no row is counted by both the old and the new body."""
    from alembic import command

    from retention_pipeline.database import migrate

    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
    insert_events(engine, [(1, "before", "2026-11-20T10:00Z")])
    install(engine, config)
    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0003")
        assert migrate.current_revision(connection, "retention") == "0003"
    report = install(engine, config)
    assert report.rebuilt_chunks == 0
    assert report.first_data_day == date(2026, 11, 20)
    insert_events(engine, [(1, "after", "2026-11-20T11:00Z")])
    update_rollup(engine, config)
    assert rollup(engine) == truth(engine) == [("1", date(2026, 11, 20), 2, 0)]


def test_the_schedule_day_is_complete_after_the_drain(engine, installed):
    """Rows written up to the drain are in the rollup the snapshot reads."""
    config = installed
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    insert_events(engine, [(1, "late evening", f"{yesterday}T23:59:59Z")])
    update_rollup(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config, yesterday)
        last = connection.execute(
            text(
                "SELECT last_activity_at FROM retention.user_activity_snapshot "
                "WHERE user_id = '1' AND partition_date = :day"
            ),
            {"day": yesterday},
        ).scalar_one()
    assert last == datetime(yesterday.year, yesterday.month, yesterday.day, 23, 59, 59, tzinfo=UTC)


def test_the_triggers_ignore_the_callers_search_path(engine, installed):
    """The trigger functions run as their owner without a search_path of their own (setting
    one costs the app's inserts): a caller who puts look-alike functions and operators first
    must not get them run."""
    config = installed
    with engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA evil"))
        connection.execute(
            text(
                "CREATE FUNCTION evil.left(text, integer) RETURNS text LANGUAGE sql "
                "AS $$ SELECT 'hijacked' $$"
            )
        )
        connection.execute(
            text(
                "CREATE FUNCTION evil.isfinite(timestamptz) RETURNS boolean LANGUAGE plpgsql "
                "AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$"
            )
        )
        connection.execute(
            text(
                "CREATE FUNCTION evil.always(text, text) RETURNS boolean LANGUAGE sql "
                "AS $$ SELECT true $$"
            )
        )
        connection.execute(
            text("CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.always)")
        )
    with engine.begin() as connection:
        connection.execute(text("SET LOCAL search_path = evil, pg_catalog, public"))
        connection.execute(
            text("INSERT INTO events (user_id, name, created_at) VALUES (1, 'real', now())")
        )
        connection.execute(text("DELETE FROM users WHERE id = 2"))
    update_rollup(engine, config)
    assert {name for _user, _day, name, _count in actions(engine)} == {"real"}


def test_upgrading_to_day_partitions_keeps_every_snapshot_and_segment(engine, app_database_url):
    from alembic import command

    from retention_pipeline.database import migrate

    config = make_config(app_database_url)
    with engine.begin() as connection:
        insert_users(connection)
    insert_events(engine, [(1, "a", "2026-11-19T10:00Z"), (2, "b", "2026-11-20T10:00Z")])
    install(engine, config)
    days = (date(2026, 11, 19), date(2026, 11, 20))
    for day in days:
        with engine.begin() as connection:
            build_snapshot(connection, config, day)
            build_day_segments(connection, "retention", config.loops, "UTC", day)

    def contents() -> list[tuple]:
        with engine.connect() as connection:
            return [
                tuple(row)
                for table in ("user_activity_snapshot", "engagement_segments")
                for row in connection.execute(
                    text(f"SELECT * FROM retention.{table} ORDER BY partition_date, user_id")
                )
            ]

    before = contents()
    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0007")
        assert migrate.current_revision(connection, "retention") == "0007"
    install(engine, config)
    assert contents() == before
    with engine.connect() as connection:
        partitions = connection.execute(
            text("""
                SELECT child.relname FROM pg_inherits
                JOIN pg_class AS child ON child.oid = inhrelid
                WHERE inhparent = 'retention.user_activity_snapshot'::regclass
                ORDER BY 1""")
        ).scalars()
        assert list(partitions) == [
            "user_activity_snapshot_20261119",
            "user_activity_snapshot_20261120",
        ]
