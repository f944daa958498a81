"""Accounts that must never be emailed (`database.tables.users.exclude`): soft-deleted, disabled,
locked, banned, anonymous. They stay out of every read of the users table, an account that
becomes excluded is erased like a deleted one the same day, and one excluded between the
audience and the send is withheld at the batch's start."""

from __future__ import annotations

import copy
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from sqlalchemy import Engine, create_engine, text

from retention_pipeline.cli import main
from retention_pipeline.database.replica import copy_app_reads
from retention_pipeline.defs.audience import AUDIENCE
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.defs.tracking import ROLLUP
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import OutboxEmail
from retention_pipeline.segments.snapshot.build import build_snapshot
from retention_pipeline.segments.snapshot.checks import reconcile_with_users
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.erasure import MassErasure, record_users_gone
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import (
    SHIPPED_DOCUMENT,
    demo_until_yesterday,
    make_config,
    shipped_asset,
    shipped_job,
    treated,
    write_config,
)

# What the apps of issue 16 mark accounts with, on the demo's users table.
ACCOUNT_COLUMNS = """
    ALTER TABLE users
        ADD COLUMN deleted_at timestamptz,
        ADD COLUMN disabled boolean NOT NULL DEFAULT false,
        ADD COLUMN status text,
        ADD COLUMN banned_until timestamp,
        ADD COLUMN raw_app_meta_data jsonb NOT NULL DEFAULT '{}',
        ADD COLUMN is_anonymous boolean NOT NULL DEFAULT false"""
EXCLUDE: list[dict[str, Any]] = [
    {"column": "deleted_at", "is": "set"},
    {"column": "disabled", "is": True},
    {"column": "status", "in": ["LOCKED", "BANNED"]},
    {"column": "banned_until", "is": "future"},
    {"column": "raw_app_meta_data.provider", "equals": "anonymous"},
    {"column": "is_anonymous", "is": True},
]
# One change per exclusion, each of which excludes its user.
EXCLUDING = (
    "deleted_at = now()",
    "disabled = true",
    "status = 'LOCKED'",
    "banned_until = (now() AT TIME ZONE 'UTC') + interval '7 days'",
    """raw_app_meta_data = '{"provider": "anonymous"}'""",
    "is_anonymous = true",
)
# Near misses that exclude nobody.
KEPT = (
    "banned_until = (now() AT TIME ZONE 'UTC') - interval '1 day', status = 'ACTIVE', "
    """raw_app_meta_data = '{"provider": "email"}'"""
)


def tables_excluding() -> dict[str, Any]:
    tables = copy.deepcopy(SHIPPED_DOCUMENT["database"]["tables"])
    tables["users"]["exclude"] = EXCLUDE
    return tables


def mark(engine: Engine, user_ids: list[str], change: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(f"UPDATE users SET {change} WHERE id::text = ANY(:ids)"), {"ids": user_ids}
        )


def user_ids(engine: Engine, sql: str, **parameters: Any) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(text(sql), parameters).scalars())


def snapshot_users(engine: Engine, day: date) -> set[str]:
    return user_ids(
        engine,
        "SELECT user_id FROM retention.user_activity_snapshot WHERE partition_date = :day",
        day=day,
    )


def _app_with_users(url: str, count: int, signed_up: date) -> Engine:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(ACCOUNT_COLUMNS))
        connection.execute(
            text("""
                INSERT INTO users (id, email, name, created_at)
                SELECT n, 'user' || n || '@northwind-notes.com', 'User ' || n, :at
                FROM generate_series(1, :count) AS n"""),
            {"count": count, "at": signed_up},
        )
    return engine


def test_each_exclusion_keeps_its_user_out_of_full_rolled_and_replica_snapshots(app_database_url):
    day = date(2026, 11, 20)
    engine = _app_with_users(app_database_url, 10, day - timedelta(days=30))
    for user, change in enumerate(EXCLUDING, start=1):
        mark(engine, [str(user)], change)
    mark(engine, ["7"], KEPT)
    config = make_config(app_database_url, tables=tables_excluding())
    install(engine, config)
    kept = {"7", "8", "9", "10"}

    with engine.begin() as connection:  # the full build
        assert build_snapshot(connection, config, day - timedelta(days=1)).path == "full"
    assert snapshot_users(engine, day - timedelta(days=1)) == kept
    # The rolled-forward build, with a user new to the day before and excluded.
    with engine.begin() as connection:
        connection.execute(
            text("""INSERT INTO users (id, email, created_at, disabled)
                    VALUES (11, 'user11@northwind-notes.com', :at, true),
                           (12, 'user12@northwind-notes.com', :at, false)"""),
            {"at": day},
        )
        summary = build_snapshot(connection, config, day)
        assert summary.path == "incremental"
        reconciliation = reconcile_with_users(connection, config, day, summary.users)
    assert snapshot_users(engine, day) == kept | {"12"}
    assert (reconciliation.app_users, reconciliation.missing) == (5, 0)

    # Read from a replica: the copy carries the columns the exclusions test.
    with engine.begin() as connection:
        reads = copy_app_reads(connection, engine, config.database.tables)
        connection.execute(
            text("DELETE FROM retention.snapshot_builds WHERE partition_date = :day"),
            {"day": day - timedelta(days=1)},
        )
        assert build_snapshot(connection, config, day, reads.tables).path == "full"
    assert snapshot_users(engine, day) == kept | {"12"}
    engine.dispose()


@pytest.mark.parametrize("tracking", ["triggers", "incremental"])
def test_an_account_that_becomes_excluded_is_erased_by_the_next_drain(app_database_url, tracking):
    day = date(2026, 11, 20)
    engine = _app_with_users(app_database_url, 8, day - timedelta(days=30))
    config = make_config(app_database_url, tracking=tracking, tables=tables_excluding())
    install(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
    assert snapshot_users(engine, day) == {str(user) for user in range(1, 9)}

    for user, change in enumerate(EXCLUDING, start=1):
        mark(engine, [str(user)], change)
    mark(engine, ["7"], KEPT)
    update = update_rollup(engine, config)

    assert update.erased_users == len(EXCLUDING)
    assert snapshot_users(engine, day) == {"7", "8"}
    assert user_ids(engine, "SELECT user_id FROM retention.erased_users") == set()
    # Nothing new is excluded: the next drain erases nobody.
    assert update_rollup(engine, config).erased_users == 0
    engine.dispose()


def test_an_inverted_exclusion_stops_the_drain_before_it_erases_anyone(
    app_database_url, tmp_path: Path, capsys
):
    day = date(2026, 11, 20)
    engine = _app_with_users(app_database_url, 120, day - timedelta(days=30))
    mark(engine, ["1", "2"], "disabled = true")
    tables = copy.deepcopy(SHIPPED_DOCUMENT["database"]["tables"])
    tables["users"]["exclude"] = [{"column": "disabled", "is": True}]
    config = make_config(app_database_url, tables=tables)
    install(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
    everyone = {str(user) for user in range(3, 121)}
    assert snapshot_users(engine, day) == everyone

    inverted_tables = copy.deepcopy(tables)
    inverted_tables["users"]["exclude"] = [{"column": "disabled", "is": False}]  # `true` meant
    inverted = make_config(app_database_url, tables=inverted_tables)
    with pytest.raises(MassErasure) as raised:
        update_rollup(engine, inverted)
    assert str(raised.value) == (
        "database.tables.users: 118 of 118 users the pipeline knows are gone from public.users "
        "or excluded by database.tables.users.exclude at once; erasing them would lose their "
        "history for good, so none is erased: fix the mapping or an inverted exclusion, or, if "
        "they did go, run `retention-pipeline db erase-gone --yes`"
    )
    assert snapshot_users(engine, day) == everyone
    assert user_ids(engine, "SELECT user_id FROM retention.erased_users") == set()

    # Send batches (or a reinstall) record under the same mapping, and commit: once the mapping
    # is fixed, the next drain forgets them rather than erasing them.
    snapshot_of_the_day = "SELECT user_id FROM retention.user_activity_snapshot"
    with engine.begin() as connection:
        assert record_users_gone(connection, inverted, snapshot_of_the_day, probe_key=False) == 118
    with pytest.raises(MassErasure):
        update_rollup(engine, inverted)
    assert update_rollup(engine, config).erased_users == 0
    assert snapshot_users(engine, day) == everyone
    assert user_ids(engine, "SELECT user_id FROM retention.erased_users") == set()

    # They did go (say): erased once said so.
    path = write_config(tmp_path, app_database_url, tables=inverted_tables)
    capsys.readouterr()
    assert main(["--config", str(path), "db", "erase-gone", "--yes"]) == 0
    assert capsys.readouterr().out == (
        "drained, and erased 118 user(s) deleted from the app or now excluded\n"
    )
    assert snapshot_users(engine, day) == set()
    engine.dispose()


def test_a_deletion_the_trigger_saw_is_erased_though_the_id_comes_back(app_database_url):
    day = date(2026, 11, 20)
    engine = _app_with_users(app_database_url, 120, day - timedelta(days=30))
    tables = copy.deepcopy(SHIPPED_DOCUMENT["database"]["tables"])
    tables["users"]["exclude"] = [{"column": "disabled", "is": True}]
    config = make_config(app_database_url, tables=tables)
    install(engine, config)
    # 60 users deleted before the first snapshot: none has a history yet, so no mass erasure.
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM users WHERE id > 60"))
    assert update_rollup(engine, config).erased_users == 60
    with engine.begin() as connection:
        build_snapshot(connection, config, day)
        connection.execute(text("DELETE FROM users WHERE id = 5"))
        # The same id again (an id the app takes from outside: an e-mail, an auth provider's).
        connection.execute(
            text(
                "INSERT INTO users (id, email, name, created_at) VALUES (5, 'new@x.com', 'N', :at)"
            ),
            {"at": day},
        )
    assert update_rollup(engine, config).erased_users == 1
    assert "5" not in snapshot_users(engine, day)
    engine.dispose()


@pytest.fixture
def excluding_morning(create_database, tmp_path: Path):
    url = create_database()
    engine, day = demo_until_yesterday(url)
    with engine.begin() as connection:
        connection.execute(text(ACCOUNT_COLUMNS))
    path = write_config(tmp_path, url, tables=tables_excluding())
    resources = {
        "app_database": AppDatabase(config_path=str(path)),
        "email": OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@acme.test"),
    }
    with dg.instance_for_test() as instance:
        yield engine, instance, resources, day
    engine.dispose()


def test_accounts_excluded_after_the_audience_are_withheld_and_erased_the_same_day(
    excluding_morning,
):
    engine, instance, resources, day = excluding_morning
    daily = [shipped_asset(SNAPSHOT), shipped_asset(SEGMENTS), shipped_asset(AUDIENCE)]
    partition = day.isoformat()
    assert dg.materialize(
        daily, partition_key=partition, instance=instance, resources=resources
    ).success
    audience = sorted(treated(engine, partition), key=int)
    excluded = audience[: len(EXCLUDING)]
    control = audience[len(EXCLUDING)]
    # The app disables them after the audience was built, before the send.
    for user, change in zip(excluded, EXCLUDING, strict=True):
        mark(engine, [user], change)
    mark(engine, [control], KEPT)

    sent = shipped_job("send_re_engagement").execute_in_process(
        partition_key=f"{partition}|0", instance=instance, resources=resources
    )
    assert sent.success
    with engine.connect() as connection:
        statuses = dict(
            connection.execute(
                text(
                    "SELECT user_id, status || ': ' || coalesce(error, '') "
                    "FROM retention.email_send_log"
                )
            ).all()
        )
    assert {user: statuses[user] for user in excluded} == {
        user: "failed: the user was erased after the email was claimed: not sent"
        for user in excluded
    }
    assert statuses[control] == "sent: "
    assert sum(status == "sent: " for status in statuses.values()) == len(audience) - len(excluded)

    # The drain of the same day erases them from every table of the pipeline.
    assert dg.materialize([shipped_asset(ROLLUP)], instance=instance, resources=resources).success
    for table in (
        "user_activity_snapshot",
        "engagement_segments",
        "reengagement_audience",
        "episodes",
        "erased_users",
    ):
        assert (
            user_ids(
                engine,
                f"SELECT user_id FROM retention.{table} WHERE user_id = ANY(:ids)",
                ids=excluded,
            )
            == set()
        ), table
    assert control in snapshot_users(engine, day)

    # Built again, the day's snapshot, segments and audience leave them out.
    assert dg.materialize(
        daily, partition_key=partition, instance=instance, resources=resources
    ).success
    for table in ("user_activity_snapshot", "engagement_segments", "reengagement_audience"):
        assert (
            user_ids(
                engine,
                f"SELECT user_id FROM retention.{table} WHERE user_id = ANY(:ids)",
                ids=excluded,
            )
            == set()
        ), table
    assert control in treated(engine, partition)


def test_check_counts_what_the_exclusions_keep_out(app_database_url, tmp_path: Path, capsys):
    day = date(2026, 11, 20)
    engine = _app_with_users(app_database_url, 9, day)
    for user, change in enumerate(EXCLUDING, start=1):
        mark(engine, [str(user)], change)
    mark(engine, ["1", "7"], "disabled = true")  # one user matching two, one matching one
    engine.dispose()
    config = write_config(tmp_path, app_database_url, tables=tables_excluding())

    assert main(["--config", str(config), "check"]) == 0

    out = capsys.readouterr().out.splitlines()
    start = out.index("the exclusions keep out 7 of 9 users")
    assert out[start + 1 : start + 7] == [
        "  database.tables.users.exclude.0 (deleted_at is set): 1 user",
        "  database.tables.users.exclude.1 (disabled is true): 3 users",
        "  database.tables.users.exclude.2 (status in [LOCKED, BANNED]): 1 user",
        "  database.tables.users.exclude.3 (banned_until is future): 1 user",
        "  database.tables.users.exclude.4 (raw_app_meta_data.provider equals anonymous): 1 user",
        "  database.tables.users.exclude.5 (is_anonymous is true): 1 user",
    ]


def test_each_bad_exclusion_is_one_line_naming_it(app_database_url, tmp_path: Path, capsys):
    engine = _app_with_users(app_database_url, 1, date(2026, 11, 20))
    engine.dispose()
    tables = tables_excluding()
    tables["users"]["exclude"] = [
        {"column": "deletedAt", "is": "set"},
        {"column": "status.provider", "equals": "anonymous"},
        {"column": "status", "is": True},
        {"column": "status", "is": "future"},
        {"column": "disabled", "is": "future"},
        {"column": "disabled", "in": [True, "no"]},  # `no`: a word since YAML 1.2
        {"column": "disabled", "equals": "True"},  # the column reads as `true`
        {"column": "disabled", "equals": False},
        *EXCLUDE,
    ]
    config = write_config(tmp_path, app_database_url, tables=tables)

    assert main(["--config", str(config), "check"]) == 2

    columns = (
        "banned_until, created_at, deleted_at, disabled, email, id, is_anonymous, name, "
        "raw_app_meta_data, status, timezone"
    )
    assert capsys.readouterr().err.splitlines() == [
        f"error: database.tables.users.exclude.0.column: column 'deletedAt' does not exist in "
        f"public.users (it has: {columns})",
        "error: database.tables.users.exclude.1.column: 'status.provider' is a path into "
        "public.users.status, which is text, not json or jsonb",
        "error: database.tables.users.exclude.2.is: public.users.status is text, not a boolean: "
        "compare it with `equals` or `in`",
        "error: database.tables.users.exclude.3.is: public.users.status is text, not a timestamp",
        "error: database.tables.users.exclude.4.is: public.users.disabled is boolean, not a "
        "timestamp",
        "error: database.tables.users.exclude.5.in: public.users.disabled is a boolean, and "
        "'no' is neither true nor false: use `is: true` or `is: false`",
        "error: database.tables.users.exclude.6.equals: public.users.disabled is a boolean, and "
        "'True' is neither true nor false: use `is: true` or `is: false`",
    ]
