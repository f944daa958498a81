"""Activity sources: any number of app tables feed the rollup, each captured by inserts, by
changes of a time updated in place, or by polls; the capture and the rebuild agree row for row,
installed databases upgrade in place, and every bad key is one line naming it."""

from __future__ import annotations

import copy
from datetime import date

import pytest
import yaml
from sqlalchemy import create_engine, text

from retention_pipeline.config.loader import ConfigError, parse_config
from retention_pipeline.database.app_tables import MappingError
from retention_pipeline.preflight import preflight
from retention_pipeline.tracking import source_checks
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install, refresh_from, uninstall
from retention_pipeline.tracking.state import TrackingError
from retention_pipeline.tracking.status import reconcile_last_day
from retention_pipeline_tests.helpers import (
    SHIPPED_DOCUMENT,
    kill_mid_poll,
    make_config,
    write_config,
)
from retention_pipeline_tests.test_tracking import behind_an_open_app_insert, insert_users

APP_TABLES = """
    CREATE TABLE audit_log (
        id bigserial PRIMARY KEY, actor_id integer, kind text, payload jsonb,
        created_at timestamptz NOT NULL);
    CREATE TABLE comments (id bigserial PRIMARY KEY, author integer, body text,
        created_at timestamp NOT NULL);
    CREATE TABLE "Session" (id bigserial PRIMARY KEY, "userId" integer, token text,
        "updatedAt" timestamp NOT NULL);
    CREATE VIEW recent_comments AS SELECT * FROM comments;
"""
AUDIT = {
    "table": "audit_log",
    "user": "actor_id",
    "at": "created_at",
    "action": {"column": "kind", "prefix": "audit."},
    "where": [{"column": "kind", "in": ["DOCUMENT_CREATED", "DOCUMENT_SENT"]}],
}
AUDIT_JSON = {
    "name": "audit_json",
    "table": "audit_log",
    "user": "actor_id",
    "at": "created_at",
    "action": {"column": "payload.type"},
    "where": [{"column": "payload.flag", "equals": True}],
}
COMMENTS = {"table": "comments", "user": "author", "at": "created_at", "action": "comment.posted"}
SESSIONS = {"table": "Session", "user": "userId", "at": "updatedAt", "login": True}


def sources_config(url, activity, schema="retention", timezone="UTC", **database):
    """The shipped configuration with `activity` as its only sources (no shorthand), its loops
    in `timezone`."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["tables"].pop("events")
    document["database"]["tables"].pop("sessions")
    document["database"].update(activity=activity, schema=schema, url=url, **database)
    for loop in document["loops"]:
        loop["steps"][0]["trigger"]["timezone"] = timezone
    from retention_pipeline.config.loader import parse_config

    return parse_config(document, environ={})


@pytest.fixture
def engine(app_database_url):
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(APP_TABLES)
        insert_users(connection, count=3)
    yield engine
    engine.dispose()


def run(engine, statement, **parameters):
    with engine.begin() as connection:
        connection.execute(text(statement), parameters)


def rollup(engine, schema="retention"):
    with engine.connect() as connection:
        daily = connection.execute(
            text(
                f"SELECT user_id, day, event_count, session_count FROM {schema}.activity_daily "
                "ORDER BY 1, 2"
            )
        ).all()
        actions = connection.execute(
            text(
                f"SELECT user_id, day, event_name, event_count FROM {schema}.action_daily "
                "ORDER BY 1, 2, 3"
            )
        ).all()
    return [tuple(row) for row in daily], [tuple(row) for row in actions]


def insert_audit(engine, rows):
    for actor, kind, payload, at in rows:
        run(
            engine,
            "INSERT INTO audit_log (actor_id, kind, payload, created_at) "
            "VALUES (:a, :k, CAST(:p AS jsonb), :at)",
            a=actor,
            k=kind,
            p=payload,
            at=at,
        )


def test_captured_sources_agree_with_a_rebuild_row_for_row(engine, app_database_url):
    before = [
        (1, "DOCUMENT_CREATED", '{"type": "doc.new", "flag": true}', "2026-11-20T10:00Z"),
        (2, "SIGN_IN", '{"type": "signin", "flag": false}', "2026-11-20T11:00Z"),
    ]
    insert_audit(engine, before)
    run(engine, "INSERT INTO comments (author, body, created_at) VALUES (1, 'hi', '2026-11-20')")
    activity = [AUDIT, AUDIT_JSON, COMMENTS]
    captured = sources_config(app_database_url, activity)
    report = install(engine, captured)
    assert report.sources == (
        "source `audit_log`: rebuilt from its 1 rows of public.audit_log",
        "source `audit_json`: rebuilt from its 1 rows of public.audit_log",
        "source `comments`: rebuilt from its 1 rows of public.comments",
    )
    # After the install, in one statement and in several; rows the filter leaves out, a JSON
    # field, a NULL user, an empty action.
    insert_audit(
        engine,
        [
            (3, "DOCUMENT_SENT", '{"type": "doc.sent", "flag": true}', "2026-11-21T09:00Z"),
            (None, "DOCUMENT_SENT", '{"flag": true}', "2026-11-21T09:00Z"),
            (1, "", '{"type": "", "flag": true}', "2026-11-21T09:30Z"),
            (2, "DOCUMENT_DELETED", '{"flag": "true"}', "2026-11-21T10:00Z"),
        ],
    )
    run(
        engine,
        "INSERT INTO comments (author, body, created_at) "
        "SELECT 1 + g % 3, 'c', timestamp '2026-11-21' + g * interval '1 hour' "
        "FROM generate_series(1, 30) AS g",
    )
    update_rollup(engine, captured)
    rebuilt = sources_config(app_database_url, activity, schema="retention_rebuilt")
    install(engine, rebuilt, second_install=True)
    assert rollup(engine) == rollup(engine, "retention_rebuilt")
    daily, actions = rollup(engine)
    assert ("1", date(2026, 11, 20), "audit.DOCUMENT_CREATED", 1) in actions
    assert ("1", date(2026, 11, 20), "doc.new", 1) in actions
    assert ("3", date(2026, 11, 21), "doc.sent", 1) in actions
    assert not [row for row in actions if row[2] in ("audit.SIGN_IN", "audit.DOCUMENT_DELETED")]
    assert ("2", date(2026, 11, 21), "comment.posted", 8) in actions
    # Polled, the same sources count the same rows, the comments read through a view: its
    # history at install, and its rows added since at the next drain.
    polled = sources_config(
        app_database_url,
        [
            {**AUDIT, "capture": "polling"},
            {**AUDIT_JSON, "capture": "polling"},
            {**COMMENTS, "name": "comments", "table": "recent_comments", "capture": "polling"},
        ],
        schema="retention_polled",
    )
    install(engine, polled, second_install=True)
    update_rollup(engine, polled)
    assert rollup(engine, "retention_polled") == rollup(engine)

    def comments_of_user_3() -> int:
        _, actions = rollup(engine, "retention_polled")
        return sum(row[3] for row in actions if row[0] == "3" and row[2] == "comment.posted")

    before_drain = comments_of_user_3()
    run(
        engine,
        "INSERT INTO comments (author, body, created_at) "
        "SELECT 3, 'c', now() - g * interval '1 minute' FROM generate_series(1, 4) AS g",
    )
    update_rollup(engine, captured)
    update_rollup(engine, polled)
    assert rollup(engine, "retention_polled") == rollup(engine)
    assert comments_of_user_3() == before_drain + 4


def test_a_time_updated_in_place_counts_each_change_once_and_ignores_other_updates(
    engine, app_database_url
):
    config = sources_config(app_database_url, [{**SESSIONS, "capture": "updates"}])
    run(
        engine,
        """INSERT INTO "Session" ("userId", token, "updatedAt") VALUES (1, 'a', '2026-11-19')""",
    )
    report = install(engine, config)
    assert report.sources == (
        "source `Session`: history of `updatedAt` starts at install: it is a last-seen column "
        "(1 current values of public.Session counted)",
    )
    run(
        engine,
        """INSERT INTO "Session" ("userId", token, "updatedAt") VALUES (2, 'b', '2026-11-20')""",
    )
    for moment in ("2026-11-20T08:00", "2026-11-20T09:00", "2026-11-21T10:00"):
        run(engine, """UPDATE "Session" SET "updatedAt" = :at WHERE "userId" = 1""", at=moment)
    # Updates leaving the time alone: another column, the same value, no row.
    run(engine, """UPDATE "Session" SET token = 'x'""")
    run(engine, """UPDATE "Session" SET "updatedAt" = "updatedAt", token = 'y'""")
    run(engine, """UPDATE "Session" SET "updatedAt" = now() WHERE "userId" = 99""")
    with engine.connect() as connection:
        captured = connection.execute(
            text(
                "SELECT count(*) FROM (SELECT * FROM retention.activity_capture_0 "
                "UNION ALL SELECT * FROM retention.activity_capture_1) AS c"
            )
        ).scalar()
    assert captured == 4
    update_rollup(engine, config)
    daily, _actions = rollup(engine)
    assert daily == [
        ("1", date(2026, 11, 19), 0, 1),
        ("1", date(2026, 11, 20), 0, 2),
        ("1", date(2026, 11, 21), 0, 1),
        ("2", date(2026, 11, 20), 0, 1),
    ]
    update_rollup(engine, config)
    assert rollup(engine)[0] == daily
    # A repair would wipe what only the capture saw.
    with pytest.raises(TrackingError, match=r"^db refresh --since: source `Session` is captured"):
        refresh_from(engine, config, date(2026, 11, 20))


def test_a_time_set_by_a_before_update_trigger_counts_and_a_time_moved_back_does_not(
    engine, app_database_url
):
    # Supabase apps keep `updated_at` with a `moddatetime`-style BEFORE trigger: the app's
    # statement never names the column.
    run(
        engine,
        """
        CREATE FUNCTION touch_session() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.token IS DISTINCT FROM OLD.token THEN
                NEW."updatedAt" := OLD."updatedAt" + interval '1 day';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER touch BEFORE UPDATE ON "Session"
            FOR EACH ROW EXECUTE FUNCTION touch_session();
        INSERT INTO "Session" ("userId", token, "updatedAt") VALUES (1, 'a', '2026-11-19T10:00');
        """,
    )
    config = sources_config(app_database_url, [{**SESSIONS, "capture": "updates"}])
    install(engine, config)
    run(engine, """UPDATE "Session" SET token = 'b'""")  # the trigger moves it to 11-20
    run(engine, """UPDATE "Session" SET "updatedAt" = '2026-11-18T10:00'""")  # moved back
    update_rollup(engine, config)
    assert rollup(engine)[0] == [
        ("1", date(2026, 11, 19), 0, 1),
        ("1", date(2026, 11, 20), 0, 1),
    ]


def test_polling_counts_new_late_and_moved_rows_once_and_never_clears_a_day(
    engine, app_database_url
):
    config = sources_config(app_database_url, [SESSIONS], tracking="incremental")
    run(
        engine,
        """INSERT INTO "Session" ("userId", "updatedAt") VALUES (1, now() - interval '5 days')""",
    )
    install(engine, config)
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            ).scalar()
            == 0
        )
    run(
        engine,
        """INSERT INTO "Session" ("userId", "updatedAt") VALUES
           (2, now() - interval '1 hour'), (3, now() - interval '20 hours')""",
    )
    first = update_rollup(engine, config)
    assert first.polled_sources == ("Session",) and first.sessions == 2
    # A session refreshed in place: its new time counts, its old one stays counted.
    run(engine, """UPDATE "Session" SET "updatedAt" = now() WHERE "userId" = 3""")
    # A late row: committed after the last poll, with a time before its watermark.
    run(
        engine,
        """INSERT INTO "Session" ("userId", "updatedAt") VALUES (1, now() - interval '3 hours')""",
    )
    second = update_rollup(engine, config)
    assert second.sessions == 2
    assert update_rollup(engine, config).sessions == 0
    with engine.connect() as connection:
        sessions = connection.execute(
            text(
                "SELECT user_id, sum(session_count) FROM retention.activity_daily "
                "GROUP BY 1 ORDER BY 1"
            )
        ).all()
    assert [tuple(row) for row in sessions] == [("1", 2), ("2", 1), ("3", 2)]
    reconciliation = reconcile_last_day(engine.connect(), config)
    assert reconciliation.inexact_sources == ("Session",)
    assert reconciliation.matches


def test_a_source_that_lost_rows_is_named_though_another_of_its_kind_counts_more(
    engine, app_database_url
):
    """Sign-ins inserted (exact) and sessions refreshed in place (each refresh counted, the app
    keeping one row) both count sessions: the kind's total can only be a lower bound, and the
    refreshes' surplus hides sign-ins the capture missed. Each source's own count does not."""
    sign_ins = {
        "name": "sign_ins",
        "table": "audit_log",
        "user": "actor_id",
        "at": "created_at",
        "login": True,
        "where": [{"column": "kind", "in": ["SIGN_IN"]}],
    }
    config = sources_config(app_database_url, [sign_ins, {**SESSIONS, "capture": "updates"}])
    install(engine, config)
    yesterday = "date_trunc('day', now() AT TIME ZONE 'UTC') - interval '1 day'"
    run(engine, f"""INSERT INTO "Session" ("userId", "updatedAt") VALUES (1, {yesterday})""")
    for hour in (1, 2, 3):
        run(
            engine,
            f"""UPDATE "Session" SET "updatedAt" = {yesterday} + :hours * interval '1 hour'""",
            hours=hour,
        )
    sign_in = (
        "INSERT INTO audit_log (actor_id, kind, created_at) "
        f"SELECT 1, 'SIGN_IN', ({yesterday} + interval '5 hours') AT TIME ZONE 'UTC' "
        "FROM generate_series(1, :rows)"
    )
    run(engine, sign_in, rows=1)
    update_rollup(engine, config)
    with engine.connect() as connection:
        whole = reconcile_last_day(connection, config)
    assert whole.matches and whole.short_sources == ()
    assert whole.counted_rows_by_source == {"sign_ins": 1, "Session": 4}

    # Two sign-ins the capture never sees (its trigger off while they are written).
    run(engine, "ALTER TABLE audit_log DISABLE TRIGGER USER")
    run(engine, sign_in, rows=2)
    run(engine, "ALTER TABLE audit_log ENABLE TRIGGER USER")
    update_rollup(engine, config)
    with engine.connect() as connection:
        lost = reconcile_last_day(connection, config)

    # The kind's total still reaches the app's (5 counted, 1 session row and 3 sign-ins) ...
    assert (lost.app_sessions, lost.tracked_sessions) == (4, 5)
    # ... but the sign-ins' own count does not.
    assert lost.app_rows_by_source == {"sign_ins": 3, "Session": 1}
    assert lost.counted_rows_by_source == {"sign_ins": 1, "Session": 4}
    assert lost.short_sources == ("sign_ins",) and not lost.matches
    assert "`sign_ins` counted fewer rows than the app holds" in lost.compared


def test_a_source_counts_its_rows_from_its_rebuild_or_from_the_day_after_the_upgrade(
    engine, app_database_url
):
    from alembic import command

    from retention_pipeline.database import migrate

    run(
        engine,
        "INSERT INTO comments (author, created_at) "
        "SELECT 1, date_trunc('day', now() AT TIME ZONE 'UTC') - interval '12 hours' "
        "FROM generate_series(1, 3)",
    )
    config = sources_config(app_database_url, [COMMENTS])
    install(engine, config)
    with engine.connect() as connection:
        rebuilt = reconcile_last_day(connection, config)
    assert rebuilt.counted_rows_by_source == rebuilt.app_rows_by_source == {"comments": 3}
    assert rebuilt.matches

    # Installed before the count existed: yesterday was folded uncounted, so the count is
    # compared from tomorrow on, not taken for a loss.
    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0025")
    install(engine, config)
    with engine.connect() as connection:
        upgraded = reconcile_last_day(connection, config)
        counted_from = connection.execute(
            text(
                "SELECT rows_counted_from - (now() AT TIME ZONE 'UTC')::date "
                "FROM retention.tracking_sources"
            )
        ).scalar_one()
    assert upgraded.counted_rows_by_source == {} and upgraded.matches
    assert counted_from == 1


def test_db_upgrade_prints_what_history_each_new_source_starts_from(
    engine, app_database_url, tmp_path, capsys
):
    from retention_pipeline.cli import main

    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, '2026-11-19')")
    run(engine, """INSERT INTO "Session" ("userId", "updatedAt") VALUES (1, '2026-11-19')""")
    path = write_config(
        tmp_path,
        app_database_url,
        activity=[{**COMMENTS, "capture": "polling"}, {**SESSIONS, "capture": "updates"}],
    )
    raw = yaml.safe_load(path.read_text())
    raw["database"]["tables"].pop("events")
    raw["database"]["tables"].pop("sessions")
    path.write_text(yaml.safe_dump(raw))

    assert main(["--config", str(path), "db", "upgrade"]) == 0

    printed = capsys.readouterr().out
    assert (
        "source `comments`: rebuilt from its 1 rows of public.comments; each drain polls it "
        "from then on"
    ) in printed
    assert (
        "source `Session`: history of `updatedAt` starts at install: it is a last-seen column "
        "(1 current values of public.Session counted)"
    ) in printed


def test_a_source_renamed_to_a_removed_sources_name_counts_its_own_rows(engine, app_database_url):
    """`comments` removed with rows still in the capture (folded by the next drain, counted
    for no source), then `audit_log` renamed `comments`: the count is the audit log's alone."""
    install(engine, sources_config(app_database_url, [COMMENTS, AUDIT]))
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, now())")
    insert_audit(engine, [(2, "DOCUMENT_SENT", "{}", "now")])
    audit_only = sources_config(app_database_url, [AUDIT])
    install(engine, audit_only)
    update_rollup(engine, audit_only)
    renamed = sources_config(app_database_url, [{**AUDIT, "name": "comments"}])
    report = install(engine, renamed)
    assert report.sources == ("source `audit_log` renamed `comments`: its history is kept",)
    with engine.connect() as connection:
        counted = connection.execute(
            text("SELECT source, sum(rows) FROM retention.source_day_rows GROUP BY 1")
        ).all()
    assert [tuple(row) for row in counted] == [("comments", 1)]


@pytest.mark.parametrize(
    ("zone", "moments", "days"),
    [
        # UTC+05:45: midnight is 18:15 UTC.
        (
            "Asia/Kathmandu",
            ["2026-11-20T18:14:59.999", "2026-11-20T18:15:00", "2026-11-21T18:14:00"],
            [(date(2026, 11, 20), 1), (date(2026, 11, 21), 2)],
        ),
        # Clocks fell back from 00:01 on the 25th to 23:01 on the 24th (02:31 UTC): the rows
        # after it are of the 24th again.
        (
            "America/St_Johns",
            ["1987-10-25T02:30:59", "1987-10-25T02:31:00", "1987-10-25T02:44:59"],
            [(date(1987, 10, 24), 2), (date(1987, 10, 25), 1)],
        ),
    ],
)
def test_each_sources_rows_are_counted_in_the_day_their_zone_gives_them(
    engine, app_database_url, zone, moments, days
):
    """Rows on either side of a zone's midnight, drained and rebuilt, are counted in the day
    the zone gives them, as the app's rows say."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["tables"].pop("events")
    document["database"]["tables"].pop("sessions")
    document["database"].update(activity=[COMMENTS], url=app_database_url)
    for loop in document["loops"]:
        loop["steps"][0]["trigger"]["timezone"] = zone
    config = parse_config(document, environ={})
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, :at)", at=moments[0])
    install(engine, config)  # the first row rebuilt, the others captured
    for moment in moments[1:]:
        run(engine, "INSERT INTO comments (author, created_at) VALUES (2, :at)", at=moment)
    update_rollup(engine, config)
    with engine.connect() as connection:
        counted = connection.execute(
            text("SELECT day, rows FROM retention.source_day_rows ORDER BY day")
        ).all()
        app = connection.execute(
            text(
                "SELECT (created_at AT TIME ZONE 'UTC' AT TIME ZONE :zone)::date, "
                "count(*) FROM comments GROUP BY 1 ORDER BY 1"
            ),
            {"zone": zone},
        ).all()
    assert [tuple(row) for row in counted] == [tuple(row) for row in app]
    assert [tuple(row) for row in app] == days


def test_a_poll_killed_midway_loses_and_doubles_nothing(engine, app_database_url, tmp_path):
    document = {"activity": [{**COMMENTS, "capture": "polling"}]}
    path = write_config(tmp_path, app_database_url, **document)
    raw = yaml.safe_load(path.read_text())
    raw["database"]["tables"].pop("events")
    raw["database"]["tables"].pop("sessions")
    path.write_text(yaml.safe_dump(raw))
    config = sources_config(app_database_url, document["activity"])
    install(engine, config)
    for lock_mode in ("ACCESS EXCLUSIVE", "SHARE", "SHARE"):
        run(
            engine,
            "INSERT INTO comments (author, created_at) "
            "SELECT 1 + g % 3, (now() AT TIME ZONE 'UTC') - (g % 40) * interval '1 hour' "
            "FROM generate_series(1, 40000) AS g",
        )
        kill_mid_poll(engine, app_database_url, path, lock_mode)
    assert rollup(engine) == ([], [])  # no killed drain committed anything
    update_rollup(engine, config)
    with engine.connect() as connection:
        counted = connection.execute(
            text("SELECT sum(event_count) FROM retention.activity_daily")
        ).scalar()
        rows = connection.execute(text("SELECT count(*) FROM comments")).scalar()
    assert counted == rows == 120_000


def test_an_installed_database_upgrades_in_place_and_sources_come_and_go(engine, app_database_url):
    """An install of revision 0014 (one trigger named by the schema on events and sessions)
    keeps its rollup and its undrained capture; its triggers make way for per-source ones."""
    from alembic import command

    from retention_pipeline.database import migrate

    shorthand = make_config(app_database_url)
    run(
        engine,
        "INSERT INTO events (user_id, name, created_at) VALUES (1, 'old', '2026-11-20T10:00Z')",
    )
    install(engine, shorthand)
    with engine.begin() as connection:
        for source in ("events", "sessions"):
            connection.execute(text(f"DROP TRIGGER retention_track_{source} ON {source}"))
        command.downgrade(migrate._alembic_config(connection, "retention"), "0014")
        for kind, table in (("e", "events"), ("s", "sessions")):
            name = "pg_catalog.left(src.name, 200)" if kind == "e" else "NULL"
            connection.execute(
                text(f"""
                    CREATE FUNCTION retention.track_{table}() RETURNS trigger
                    LANGUAGE plpgsql SECURITY DEFINER AS $$
                    BEGIN
                        INSERT INTO retention.activity_capture_0 (kind, user_id, at, event_name)
                        SELECT '{kind}', src.user_id::text, src.created_at, {name}
                        FROM new_rows AS src WHERE src.user_id IS NOT NULL;
                        RETURN NULL;
                    END $$""")
            )
            connection.execute(
                text(f"""
                    CREATE TRIGGER retention_track_activity AFTER INSERT ON {table}
                    REFERENCING NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION retention.track_{table}()""")
            )
    run(
        engine,
        "INSERT INTO events (user_id, name, created_at) "
        "VALUES (1, 'undrained', '2026-11-20T11:00Z')",
    )
    report = install(engine, shorthand)
    assert report.rebuilt_chunks == 0 and report.sources == ()
    with engine.connect() as connection:
        triggers = connection.execute(
            text(
                "SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal "
                "ORDER BY 1, 2"
            )
        ).all()
    assert [tuple(row) for row in triggers] == [
        ("retention_track_activity", "users"),
        ("retention_track_events", "events"),
        ("retention_track_sessions", "sessions"),
    ]
    run(
        engine,
        "INSERT INTO events (user_id, name, created_at) VALUES (2, 'new', '2026-11-20T12:00Z')",
    )
    update_rollup(engine, shorthand)
    assert rollup(engine)[0] == [("1", date(2026, 11, 20), 2, 0), ("2", date(2026, 11, 20), 1, 0)]

    # A source added: backfilled alone; the shorthand stays because it is written.
    run(engine, "INSERT INTO comments (author, created_at) VALUES (3, '2026-11-19')")
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"].update(url=app_database_url, activity=[COMMENTS])
    from retention_pipeline.config.loader import parse_config

    added = parse_config(document, environ={})
    report = install(engine, added)
    assert report.sources == ("source `comments`: rebuilt from its 1 rows of public.comments",)
    update_rollup(engine, added)
    assert rollup(engine)[0] == [
        ("1", date(2026, 11, 20), 2, 0),
        ("2", date(2026, 11, 20), 1, 0),
        ("3", date(2026, 11, 19), 1, 0),
    ]
    # Removed: what it counted stays.
    report = install(engine, shorthand)
    assert report.sources == (
        "source `comments` removed: what it counted stays in the rollup (from 2026-11-19); "
        "nothing more is counted from public.comments",
    )
    run(engine, "INSERT INTO comments (author, created_at) VALUES (3, '2026-11-19')")
    update_rollup(engine, shorthand)
    assert ("3", date(2026, 11, 19), 1, 0) in rollup(engine)[0]
    uninstall(engine, shorthand, forget_suppressions=True, forget_send_history=True)
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            ).scalar()
            == 0
        )


def test_switching_capture_modes_hands_over_without_gap_or_double_count(engine, app_database_url):
    polled = sources_config(app_database_url, [{**COMMENTS, "capture": "polling"}])
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, now() - interval '1 hour')")
    install(engine, polled)
    update_rollup(engine, polled)
    run(engine, "INSERT INTO comments (author, created_at) VALUES (2, now() - interval '1 hour')")
    triggered = sources_config(app_database_url, [COMMENTS])
    report = install(engine, triggered)
    assert report.sources == (
        "source `comments`: now captured by `inserts` (was polled); polled once more as its "
        "triggers start",
    )
    run(engine, "INSERT INTO comments (author, created_at) VALUES (3, now() - interval '1 hour')")
    update_rollup(engine, triggered)
    install(engine, polled)
    run(
        engine,
        "INSERT INTO comments (author, created_at) VALUES (1, now() - interval '30 minutes')",
    )
    update_rollup(engine, polled)
    with engine.connect() as connection:
        counted = connection.execute(
            text(
                "SELECT user_id, sum(event_count) FROM retention.activity_daily "
                "GROUP BY 1 ORDER BY 1"
            )
        ).all()
    assert [tuple(row) for row in counted] == [("1", 2), ("2", 1), ("3", 1)]


def test_a_row_committed_while_a_switch_to_polling_waits_for_the_table_counts_once(
    engine, app_database_url
):
    triggered = sources_config(app_database_url, [COMMENTS])
    install(engine, triggered)
    polled = sources_config(app_database_url, [{**COMMENTS, "capture": "polling"}])
    # It waits to drop the table's triggers (each try gives up after a brief wait).
    behind_an_open_app_insert(
        engine,
        "INSERT INTO comments (author, created_at) VALUES (1, now() - interval '1 hour')",
        lambda: install(engine, polled),
    )
    update_rollup(engine, polled)
    update_rollup(engine, polled)
    with engine.connect() as connection:
        counted = connection.execute(
            text("SELECT user_id, sum(event_count) FROM retention.activity_daily GROUP BY 1")
        ).all()
    assert [tuple(row) for row in counted] == [("1", 1)]


@pytest.mark.parametrize(
    ("activity", "message"),
    [
        (
            [{**COMMENTS, "action": {"column": "title"}}],
            "database.activity.0.action.column: column 'title' does not exist in public.comments "
            "(it has: author, body, created_at, id)",
        ),
        (
            [{**COMMENTS, "action": {"column": "body.type"}}],
            "database.activity.0.action.column: 'body.type' is a path into "
            "public.comments.body, which is text, not json or jsonb",
        ),
        (
            [{**COMMENTS, "user": "created_at"}],
            "database.activity.0.user: column public.comments.created_at is timestamp without "
            "time zone, expected a user id (an integer, text or uuid type)",
        ),
        (
            [COMMENTS, {**AUDIT, "at": "kind"}],
            "database.activity.1.at: column public.audit_log.kind is text, expected a timestamp",
        ),
        (
            [{**AUDIT, "where": [{"column": "kind", "is": True}]}],
            "database.activity.0.where.0.is: public.audit_log.kind is text, not a boolean: "
            "compare it with `equals` or `in`",
        ),
        (
            [{**COMMENTS, "table": "recent_comments"}],
            "database.activity.0.capture: public.recent_comments is a view: triggers cannot "
            "capture it; use `capture: polling`",
        ),
        (
            [{**COMMENTS, "table": "todos"}],
            "database.activity.0.table: app table public.todos does not exist in the app database",
        ),
    ],
)
def test_a_bad_source_is_one_line_naming_its_key(engine, app_database_url, activity, message):
    config = sources_config(app_database_url, activity)
    with pytest.raises(MappingError) as raised:
        install(engine, config)
    assert str(raised.value) == message
    report = preflight(engine, config)
    assert report.problems[0] == message


@pytest.mark.parametrize(
    ("activity", "message"),
    [
        (
            [{"table": "t", "user": "u", "at": "a"}],
            "database.activity.0: action: required unless `login: true`",
        ),
        ([{**COMMENTS, "action": 5}], "database.activity.0.action: Input should be a valid string"),
        (
            [{**COMMENTS, "action": {"column": "a", "prefx": "p."}}],
            "database.activity.0.action.prefx: Extra inputs are not permitted",
        ),
        (
            [{**COMMENTS, "action": {"column": "a.b c"}}],
            "database.activity.0.action.column: ",
        ),
        ([{**COMMENTS, "capture": "sometimes"}], "database.activity.0.capture: Input should be"),
        (
            [{**COMMENTS, "where": [{"column": "k"}]}],
            "database.activity.0.where.0: k: give exactly",
        ),
        ([{**COMMENTS, "where": {"column": "k"}}], "database.activity.0.where: Input should be"),
        ([{**SESSIONS, "login": "maybe"}], "database.activity.0.login: Input should be"),
        (
            [COMMENTS, COMMENTS],
            "database: activity.1.name: source name 'comments' is already database.activity.0's",
        ),
        ([{**COMMENTS, "table": "9x"}], "database.activity.0.table: Value error, '9x' is not"),
    ],
)
def test_a_bad_source_key_is_one_line_naming_it(activity, message):
    with pytest.raises(ConfigError) as raised:
        sources_config("postgresql://localhost/x", activity)
    assert (
        str(raised.value)
        .removeprefix("configuration: ")
        .startswith(message.replace("Value error, ", ""))
    ), str(raised.value)
    assert "\n" not in str(raised.value)


def test_incremental_tracking_refuses_a_trigger_capture():
    with pytest.raises(
        ConfigError, match="database: activity.0.capture: 'inserts' needs a trigger"
    ):
        sources_config(
            "postgresql://localhost/x", [{**COMMENTS, "capture": "inserts"}], tracking="incremental"
        )


def test_check_reads_each_source_and_refuses_free_text_and_foreign_ids(engine, app_database_url):
    # Todo texts as the action; an organization id as the user.
    run(
        engine,
        "INSERT INTO comments (author, body, created_at) "
        "SELECT 1 + g % 3, 'buy item number ' || g, "
        "       (now() AT TIME ZONE 'UTC') - g * interval '1 minute' "
        "FROM generate_series(1, 300) AS g",
    )
    run(
        engine,
        # Today's, whatever the time: none of them is of the last (whole) day.
        "INSERT INTO audit_log (actor_id, kind, created_at) "
        "SELECT 1000 + g, 'DOCUMENT_SENT', "
        "       date_trunc('day', now(), 'UTC') + g * interval '1 minute' "
        "FROM generate_series(1, 100) AS g",
    )
    config = sources_config(
        app_database_url,
        [{**COMMENTS, "action": {"column": "body"}}, {**AUDIT, "name": "org_audit"}],
    )
    report = preflight(engine, config)
    assert report.problems[:2] == [
        "database.activity.0.action.column: `body` looks like free text (300 distinct values in "
        "300 rows of the last 7 days, 100.0 per user), which emails would show as actions: name "
        "a column of kinds, or give a constant (`action: todo.created`)",
        "database.activity.1.user: 0 of 100 rows of `public.audit_log` of the last 7 days reach "
        "a user: is `actor_id` a user id?",
    ]
    assert report.sources[1] == (
        "source `org_audit` (public.audit_log, inserts): 0 row(s) of the last day, reaching 0 "
        "user(s)"
    )
    assert report.sources[0].startswith("source `comments` (public.comments, inserts): ")


def test_a_source_whose_rows_are_mostly_of_excluded_users_is_mapped_right(engine, app_database_url):
    # A guest account (excluded) comments the most; the run reads the mapping as it is.
    run(
        engine,
        "INSERT INTO comments (author, body, created_at) "
        "SELECT CASE WHEN g % 10 = 0 THEN 1 ELSE 2 END, 'c', "
        "       (now() AT TIME ZONE 'UTC') - g * interval '1 minute' "
        "FROM generate_series(1, 100) AS g",
    )
    users = copy.deepcopy(SHIPPED_DOCUMENT["database"]["tables"]["users"])
    users["exclude"] = [{"column": "email", "equals": "user2@example.com"}]
    tables = {"users": users}
    report = preflight(engine, sources_config(app_database_url, [COMMENTS], tables=tables))
    assert not [problem for problem in report.problems if "a user id?" in problem], report.problems


def test_check_counts_the_last_day_whole_and_says_so_where_it_stops(
    engine, app_database_url, monkeypatch
):
    """The 7-day sample is cut at `SAMPLE_ROWS`; the last day is read apart, so a busy week
    does not shorten its count, and past the limit the line says it read no further."""
    monkeypatch.setattr(source_checks, "SAMPLE_ROWS", 40)
    yesterday = "date_trunc('day', now(), 'UTC') - interval '1 day'"
    # 60 comments of two days before, then 30 of the last day by users 1-3.
    run(
        engine,
        "INSERT INTO comments (author, body, created_at) "
        f"SELECT 1 + g % 3, 'c', {yesterday} - interval '1 hour' - g * interval '1 minute' "
        "FROM generate_series(1, 60) AS g",
    )
    run(
        engine,
        "INSERT INTO comments (author, body, created_at) "
        f"SELECT 1 + g % 3, 'c', {yesterday} + g * interval '1 minute' "
        "FROM generate_series(1, 30) AS g",
    )
    config = sources_config(app_database_url, [COMMENTS])
    assert preflight(engine, config).sources == [
        "source `comments` (public.comments, inserts): 30 row(s) of the last day, reaching 3 "
        "user(s)"
    ]
    monkeypatch.setattr(source_checks, "SAMPLE_ROWS", 20)
    assert preflight(engine, config).sources == [
        "source `comments` (public.comments, inserts): at least 20 row(s) of the last day "
        "(read no further), reaching at least 3 user(s)"
    ]


UPGRADE = "run `retention-pipeline db upgrade`"


@pytest.mark.parametrize(
    ("installed", "configured", "line"),
    [
        (
            [AUDIT],
            [AUDIT, COMMENTS],
            f"database.activity.1: source `comments` is not installed: {UPGRADE}",
        ),
        (
            [AUDIT],
            [AUDIT, {**COMMENTS, "capture": "polling"}],
            f"database.activity.1: source `comments` is not installed: {UPGRADE}",
        ),
        (
            [AUDIT],
            [{**AUDIT, "where": [{"column": "kind", "in": ["DOCUMENT_SENT"]}]}],
            "database.activity.0: source `audit_log` changed since the last `db upgrade` "
            f"(its user, time, action or where, or how this version reads them): {UPGRADE}",
        ),
        (
            [COMMENTS],
            [{**COMMENTS, "capture": "polling"}],
            "database.activity.0: source `comments` changed since the last `db upgrade` "
            f"(its capture): {UPGRADE}",
        ),
        (
            [COMMENTS],
            [{**COMMENTS, "name": "comments", "table": "recent_comments", "capture": "polling"}],
            "database.activity.0: source `comments` changed since the last `db upgrade` "
            f"(its table and its capture): {UPGRADE}",
        ),
        (
            [AUDIT, COMMENTS],
            [AUDIT],
            "database.activity: source `comments` (public.comments) is installed but no longer "
            f"configured: {UPGRADE}",
        ),
    ],
)
def test_sources_changed_without_db_upgrade_stop_every_run_with_one_line(
    engine, app_database_url, installed, configured, line
):
    import dagster as dg

    from retention_pipeline.resources.app_database import AppDatabase

    install(engine, sources_config(app_database_url, installed))
    config = sources_config(app_database_url, configured)
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, now())")
    with pytest.raises(dg.Failure) as stopped:
        AppDatabase.of(config).ensure_installed()
    assert stopped.value.description.endswith(f": {line}")
    with pytest.raises(TrackingError) as refused:
        update_rollup(engine, config)
    assert str(refused.value) == line
    assert line in preflight(engine, config).problems
    install(engine, config)
    AppDatabase.of(config).ensure_installed()
    update_rollup(engine, config)
    assert not [p for p in preflight(engine, config).problems if UPGRADE in p]


def test_a_renamed_source_keeps_its_history_and_its_undrained_capture(engine, app_database_url):
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, '2026-11-19')")
    install(engine, sources_config(app_database_url, [COMMENTS]))
    run(engine, "INSERT INTO comments (author, created_at) VALUES (2, '2026-11-20')")
    renamed = sources_config(app_database_url, [{**COMMENTS, "name": "posts"}])
    report = install(engine, renamed)
    assert report.sources == ("source `comments` renamed `posts`: its history is kept",)
    assert report.rebuilt_chunks == 0
    with engine.connect() as connection:
        labels = connection.execute(
            text(
                "SELECT source FROM retention.activity_capture_0 "
                "UNION ALL SELECT source FROM retention.activity_capture_1"
            )
        ).scalars()
        assert list(labels) == ["posts"]
    update_rollup(engine, renamed)
    assert rollup(engine)[0] == [
        ("1", date(2026, 11, 19), 1, 0),
        ("2", date(2026, 11, 20), 1, 0),
    ]
    # A repair subtracts what the capture still holds by its source's new name.
    run(engine, "INSERT INTO comments (author, created_at) VALUES (3, '2026-11-20')")
    refresh_from(engine, renamed, date(2026, 11, 19))
    update_rollup(engine, renamed)
    assert ("3", date(2026, 11, 20), 1, 0) in rollup(engine)[0]
    assert sum(row[2] for row in rollup(engine)[0]) == 3


def test_a_renamed_polled_source_keeps_its_watermark(engine, app_database_url):
    polled = {**COMMENTS, "capture": "polling"}
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, now() - interval '1 hour')")
    install(engine, sources_config(app_database_url, [polled]))
    run(engine, "INSERT INTO comments (author, created_at) VALUES (2, now() - interval '1 hour')")
    update_rollup(engine, sources_config(app_database_url, [polled]))
    renamed = sources_config(app_database_url, [{**polled, "name": "posts"}])
    assert install(engine, renamed).sources == (
        "source `comments` renamed `posts`: its history is kept",
    )
    assert update_rollup(engine, renamed).events == 0
    assert sum(row[2] for row in rollup(engine)[0]) == 2


def test_the_shorthand_moved_into_activity_under_another_name_keeps_its_history(
    engine, app_database_url
):
    run(
        engine,
        "INSERT INTO events (user_id, name, created_at) VALUES (1, 'a', '2026-11-20T10:00Z')",
    )
    install(engine, make_config(app_database_url))
    moved = sources_config(
        app_database_url,
        [
            {
                "name": "app_events",
                "table": "events",
                "user": "user_id",
                "at": "created_at",
                "action": {"column": "name"},
            },
            {
                "name": "logins",
                "table": "sessions",
                "user": "user_id",
                "at": "created_at",
                "login": True,
            },
        ],
    )
    assert install(engine, moved).sources == (
        "source `events` renamed `app_events`: its history is kept",
        "source `sessions` renamed `logins`: its history is kept",
    )
    update_rollup(engine, moved)
    assert rollup(engine)[0] == [("1", date(2026, 11, 20), 1, 0)]


def test_a_new_source_over_a_removed_ones_table_says_both_are_counted(engine, app_database_url):
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, '2026-11-19')")
    install(engine, sources_config(app_database_url, [COMMENTS]))
    replaced = sources_config(
        app_database_url, [{**COMMENTS, "name": "posts", "action": "post.written"}]
    )
    assert install(engine, replaced).sources == (
        "source `comments` removed: what it counted stays in the rollup (from 2026-11-19); "
        "nothing more is counted from public.comments",
        "source `posts` reads public.comments like the removed `comments`, whose counts stay: "
        "`posts` is backfilled from all of its rows, so the days before today count both (to "
        "count them once, keep the name `comments`: a changed definition applies to new rows "
        "only)",
        "source `posts`: rebuilt from its 1 rows of public.comments",
    )


def test_a_polled_sources_changed_definition_applies_to_new_rows_only(engine, app_database_url):
    polled = {**COMMENTS, "capture": "polling"}
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, now() - interval '1 hour')")
    install(engine, sources_config(app_database_url, [polled]))
    update_rollup(engine, sources_config(app_database_url, [polled]))
    # The newest row a poll counted sets the watermark; one dated ahead lies beyond it.
    run(
        engine, "INSERT INTO comments (author, created_at) VALUES (2, now() - interval '2 minutes')"
    )
    run(engine, "INSERT INTO comments (author, created_at) VALUES (3, now() + interval '1 hour')")
    assert update_rollup(engine, sources_config(app_database_url, [polled])).events == 2
    changed = sources_config(app_database_url, [{**polled, "action": "comment.written"}])
    install(engine, changed)
    assert update_rollup(engine, changed).events == 0
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, now() - interval '1 minute')")
    assert update_rollup(engine, changed).events == 1
    assert sorted(row[2:] for row in rollup(engine)[1]) == [
        ("comment.posted", 1),
        ("comment.posted", 1),
        ("comment.posted", 1),
        ("comment.written", 1),
    ]


@pytest.mark.parametrize("capture", ["polling", "inserts"])
def test_rows_written_after_the_last_poll_count_when_the_definition_changes(
    engine, app_database_url, capture
):
    """Drains refuse to run between the edit of a polled source and the upgrade: the rows
    written since the last poll count once, by the definition they were written under,
    whether the source stays polled or is captured from then on."""
    polled = {**COMMENTS, "capture": "polling"}
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, now() - interval '1 hour')")
    install(engine, sources_config(app_database_url, [polled]))
    update_rollup(engine, sources_config(app_database_url, [polled]))
    run(engine, "INSERT INTO comments (author, created_at) VALUES (2, now() - interval '1 minute')")
    changed = sources_config(
        app_database_url, [{**polled, "action": "comment.written", "capture": capture}]
    )

    install(engine, changed)
    update_rollup(engine, changed)
    run(engine, "INSERT INTO comments (author, created_at) VALUES (3, now())")
    update_rollup(engine, changed)

    assert sorted((row[0], *row[2:]) for row in rollup(engine)[1]) == [
        ("1", "comment.posted", 1),
        ("2", "comment.posted", 1),
        ("3", "comment.written", 1),
    ]


def test_a_previous_definition_that_no_longer_reads_is_said_and_the_upgrade_goes_on(
    engine, app_database_url
):
    polled = {**COMMENTS, "capture": "polling", "action": {"column": "body"}}
    run(engine, "INSERT INTO comments (author, body, created_at) VALUES (1, 'a', now())")
    install(engine, sources_config(app_database_url, [polled]))
    update_rollup(engine, sources_config(app_database_url, [polled]))
    run(engine, "INSERT INTO comments (author, body, created_at) VALUES (2, 'b', now())")
    run(engine, "ALTER TABLE comments DROP COLUMN body CASCADE")
    changed = sources_config(app_database_url, [{**COMMENTS, "capture": "polling"}])

    report = install(engine, changed)

    assert any(
        line.startswith("source `comments`: its rows written since the last drain are not counted")
        and "column src.body does not exist" in line
        for line in report.sources
    ), report.sources
    run(engine, "INSERT INTO comments (author, created_at) VALUES (3, now())")
    update_rollup(engine, changed)
    assert sorted(row[0] for row in rollup(engine)[1]) == ["1", "3"]


def test_the_snapshot_after_a_source_is_added_equals_a_full_build(engine, app_database_url):
    from retention_pipeline.segments.snapshot import build_snapshot

    def snapshot(config, day, *, full=False):
        with engine.begin() as connection:
            if full:
                connection.execute(text("DELETE FROM retention.snapshot_builds"))
            summary = build_snapshot(connection, config, day)
            rows = connection.execute(
                text(
                    "SELECT * FROM retention.user_activity_snapshot WHERE partition_date = :day "
                    "ORDER BY user_id"
                ),
                {"day": day},
            ).all()
        return summary.path, [tuple(row) for row in rows]

    run(
        engine,
        "INSERT INTO comments (author, created_at) "
        "SELECT 1 + g % 3, timestamp '2026-11-20' - g * interval '7 hours' "
        "FROM generate_series(1, 60) AS g",
    )
    run(
        engine,
        """INSERT INTO "Session" ("userId", "updatedAt")
           SELECT 1 + g % 3, timestamp '2026-11-20' - g * interval '5 hours'
           FROM generate_series(1, 90) AS g""",
    )
    comments = sources_config(app_database_url, [COMMENTS])
    install(engine, comments)
    assert snapshot(comments, date(2026, 11, 19))[0] == "full"
    # An action source: the snapshot counts visits before and after (a login source would
    # switch it to logins, and so to a full build anyway).
    refreshes = {**SESSIONS, "login": False, "action": "session.refreshed"}
    both = sources_config(app_database_url, [COMMENTS, refreshes])
    install(engine, both)
    path, after = snapshot(both, date(2026, 11, 20))
    assert path == "full"
    assert after == snapshot(both, date(2026, 11, 20), full=True)[1]


def test_check_names_each_trigger_captured_table_the_role_may_not_give_a_trigger(
    engine, app_database_url
):
    import uuid

    from sqlalchemy.engine import make_url

    from retention_pipeline.database.connection import create_app_engine

    config = sources_config(app_database_url, [COMMENTS, {**AUDIT, "capture": "polling"}])
    role = f"rp_trigger_{uuid.uuid4().hex[:8]}"
    run(engine, f"CREATE ROLE {role} LOGIN")
    run(engine, f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    app = create_app_engine(make_url(app_database_url).set(username=role).render_as_string())

    def trigger_lines():
        return [
            p
            for p in preflight(app, config).problems
            if "lacks TRIGGER on table" in p or "is not the owner of table" in p
        ]

    try:
        assert trigger_lines() == [
            f"database.activity.0.capture: role {role} lacks TRIGGER on table public.comments: "
            "`db upgrade` creates the source's capture trigger there (grant it, or use "
            "`capture: polling`)",
            f"database.tables.users: role {role} lacks TRIGGER on table public.users: `db "
            "upgrade` creates the trigger there that records the users your app deletes, to "
            "erase them (grant it, or use `database.tracking: incremental`)",
        ]
        run(engine, f"GRANT TRIGGER ON comments, users TO {role}")
        assert trigger_lines() == []
        install(engine, config)  # as the owner: the trigger is there now
        run(engine, f"REVOKE TRIGGER ON comments FROM {role}")
        run(engine, f"GRANT USAGE ON SCHEMA retention TO {role}")
        run(engine, f"GRANT SELECT ON ALL TABLES IN SCHEMA retention TO {role}")
        # Installed as configured: nothing for `db upgrade` to do, and a run needs no right.
        assert trigger_lines() == []
        # Changed: `db upgrade` drops the trigger, which only the owner may.
        config = sources_config(
            app_database_url,
            [{**COMMENTS, "action": "comment.made"}, {**AUDIT, "capture": "polling"}],
        )
        run(engine, f"GRANT TRIGGER ON comments TO {role}")
        assert trigger_lines() == [
            f"database.activity.0.capture: role {role} is not the owner of table "
            "public.comments: `db upgrade` replaces the source's capture trigger there, which "
            "only the owner may drop (run it as the owner, or use `capture: polling`)"
        ]
        run(engine, f"ALTER TABLE comments OWNER TO {role}")
        assert trigger_lines() == []
    finally:
        app.dispose()
        run(engine, f"REASSIGN OWNED BY {role} TO postgres")
        run(engine, f"DROP OWNED BY {role}")
        run(engine, f"DROP ROLE {role}")


def test_the_last_poll_before_triggers_marks_the_days_it_adds_to_late(engine, app_database_url):
    from retention_pipeline.segments.snapshot import build_snapshot

    polled = sources_config(app_database_url, [{**COMMENTS, "capture": "polling"}])
    yesterday = "(now() AT TIME ZONE 'UTC')::date - 1"
    run(engine, f"INSERT INTO comments (author, created_at) VALUES (1, {yesterday} + time '10:00')")
    install(engine, polled)
    with engine.begin() as connection:
        day = connection.execute(text(f"SELECT {yesterday}")).scalar_one()
        build_snapshot(connection, polled, day)
    # Committed after the snapshot, with a time within the poll's lookback.
    run(engine, f"INSERT INTO comments (author, created_at) VALUES (2, {yesterday} + time '11:00')")
    install(engine, sources_config(app_database_url, [COMMENTS]))
    with engine.connect() as connection:
        late = connection.execute(text("SELECT day FROM retention.late_activity")).scalars()
        assert list(late) == [day]


def test_a_source_filter_on_the_clock_and_logins_without_a_login_source_are_refused():
    timed = {**COMMENTS, "where": [{"column": "created_at", "is": "past"}]}
    with pytest.raises(ConfigError) as raised:
        sources_config("postgresql://unused", [timed])
    assert "database.activity.0.where: 0.is: 'past' depends on when a row is read" in str(
        raised.value
    )
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["tables"].pop("sessions")
    document["database"].update(activity=[COMMENTS], url="postgresql://unused")
    document["activity"] = {"baseline": "logins"}
    with pytest.raises(ConfigError, match=r"activity\.baseline: 'logins' counts the rows of login"):
        parse_config(document, environ={})


def test_an_upgrade_leaves_the_triggers_of_unchanged_sources_in_place(engine, app_database_url):
    config = sources_config(app_database_url, [COMMENTS, {**SESSIONS, "capture": "updates"}])

    def trigger_oids():
        with engine.connect() as connection:
            return connection.execute(
                text(
                    "SELECT tgname, oid FROM pg_trigger WHERE tgname LIKE 'retention_track_%' "
                    "AND tgname <> 'retention_track_activity' ORDER BY tgname"  # erasure's
                )
            ).all()

    install(engine, config)
    before = trigger_oids()
    assert len(before) == 3  # comments; Session's inserts and updates
    install(engine, config)
    assert trigger_oids() == before
    changed = sources_config(
        app_database_url,
        [{**COMMENTS, "action": "comment.written"}, {**SESSIONS, "capture": "updates"}],
    )
    install(engine, changed)
    after = dict(trigger_oids())
    session_triggers = {name for name, _ in before if "Session" in name}
    assert session_triggers and all(after[name] == dict(before)[name] for name in session_triggers)
    assert {name: oid for name, oid in before if name not in session_triggers} != {
        name: after[name] for name, _ in before if name not in session_triggers
    }
    run(engine, "INSERT INTO comments (author, created_at) VALUES (1, now())")
    assert update_rollup(engine, changed).events == 1


def test_a_timezone_change_rebuilds_no_history_the_app_tables_lost_unless_asked(
    engine, app_database_url
):
    """A last-seen column holds only its latest value: rebuilt in another timezone, every
    earlier visit it counted would be gone."""
    captured = [{**SESSIONS, "capture": "updates"}]
    run(
        engine,
        """INSERT INTO "Session" ("userId", token, "updatedAt") VALUES (1, 'a', '2026-11-19')""",
    )
    install(engine, sources_config(app_database_url, captured))
    run(engine, """UPDATE "Session" SET "updatedAt" = '2026-11-20 10:00+00'""")
    update_rollup(engine, sources_config(app_database_url, captured))
    counted = rollup(engine)
    berlin = sources_config(app_database_url, captured, timezone="Europe/Berlin")

    with pytest.raises(
        TrackingError,
        match=r"^db upgrade: the loops' timezone is now Europe/Berlin, the rollup counts days "
        r"in UTC: rebuilding it from your tables loses what source `Session` \(captured by "
        r"`updates`\)",
    ):
        install(engine, berlin)
    # A source taken out of the configuration: what it counted stays, until a rebuild.
    with pytest.raises(TrackingError, match=r"source `Session` \(no longer configured\)"):
        install(engine, sources_config(app_database_url, [COMMENTS], timezone="Europe/Berlin"))
    assert rollup(engine) == counted

    install(engine, berlin, rebuild_history=True)
    daily, _actions = rollup(engine)
    assert [(user, day) for user, day, _events, _sessions in daily] == [("1", date(2026, 11, 20))]
