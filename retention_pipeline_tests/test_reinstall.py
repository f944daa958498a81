"""`db uninstall` then `db upgrade` forgets nothing a user did or was sent, unless told to: a
re-run of a day emails nobody twice and the frequency cap still holds across loops."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml
from sqlalchemy import Engine, create_engine, text

from retention_pipeline.cli import main
from retention_pipeline.config import parse_config
from retention_pipeline.defs.audience import AUDIENCE, AudienceConfig
from retention_pipeline.defs.partitions import daily_partitions
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.defs.sending import build_send_job
from retention_pipeline.demo import seed_demo
from retention_pipeline.recipients.suppressions import suppress
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import OutboxEmail
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install, uninstall
from retention_pipeline_tests.helpers import (
    insert_sent_email,
    make_config,
    shipped_asset,
    write_config,
)

LOOP, OTHER_LOOP = "re_engagement", "win_back"
HISTORY = ("email_send_log", "episodes", "reengagement_audience")
user_activity_snapshot = shipped_asset(SNAPSHOT)
engagement_segments = shipped_asset(SEGMENTS)
reengagement_audience = shipped_asset(AUDIENCE)


def count(engine: Engine, query: str, **params) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(query), params).scalar_one())


def history(engine: Engine) -> dict[str, int]:
    return {table: count(engine, f"SELECT count(*) FROM retention.{table}") for table in HISTORY}


def users_of(engine: Engine, loop: str, day: str, *, arm: str | None = None) -> set[str]:
    with engine.connect() as connection:
        return set(
            connection.execute(
                text("""
                    SELECT user_id FROM retention.reengagement_audience
                    WHERE loop_name = :loop AND partition_date = :day
                      AND (arm = :arm OR CAST(:arm AS text) IS NULL)"""),
                {"loop": loop, "day": day, "arm": arm},
            ).scalars()
        )


def unsubscribe(engine: Engine, address: str) -> None:
    """`address` unsubscribes from every loop, as its link would record it."""
    with engine.begin() as connection:
        suppress(
            connection,
            schema="retention",
            email=address,
            reason="unsubscribed",
            source="unsubscribe_link",
        )


class Deployment:
    """The demo app up to yesterday, two loops with the same condition, emails to an outbox;
    the pipeline installed, uninstalled and upgraded through the command line."""

    def __init__(self, url: str, directory: Path, instance: dg.DagsterInstance) -> None:
        self.engine = create_engine(url)
        self.day = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
        path = write_config(directory, url)
        document = yaml.safe_load(path.read_text())
        second = copy.deepcopy(document["loops"][0])
        second["name"] = OTHER_LOOP
        document["loops"].append(second)
        path.write_text(yaml.safe_dump(document))
        self.config_path = str(path)
        self.config = parse_config(document, environ={})
        self.outbox = directory / "outbox"
        self.instance = instance
        self.resources = {
            "app_database": AppDatabase(config_path=self.config_path),
            "email": OutboxEmail(directory=str(self.outbox), from_address="a@acme.test"),
        }

    def cli(self, *args: str) -> None:
        assert main(["--config", self.config_path, *args]) == 0

    def run_day(self, loop: str) -> dict:
        """The loop's daily run of yesterday, then its send run; returns the audience's
        metadata."""
        daily = dg.materialize(
            [user_activity_snapshot, engagement_segments, reengagement_audience],
            partition_key=self.day,
            instance=self.instance,
            resources=self.resources,
            run_config=dg.RunConfig(
                ops={"retention__reengagement_audience": AudienceConfig(loops=[loop])}
            ),
        )
        assert daily.success
        (audience,) = [
            m
            for m in daily.asset_materializations_for_node("retention__reengagement_audience")
            if m.partition == self.day
        ]
        send = build_send_job(self.config.loop(loop), daily_partitions(self.config), 1)
        assert send.execute_in_process(
            partition_key=f"{self.day}|0", instance=self.instance, resources=self.resources
        ).success
        return {key: value.value for key, value in audience.metadata.items()}

    def emails_in_outbox(self) -> int:
        return len(list(self.outbox.glob("*.html")))


@pytest.fixture
def deployment(create_database, tmp_path: Path):
    url = create_database()
    engine = create_engine(url)
    end = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), UTC)
    with engine.begin() as connection:
        seed_demo(connection, users=400, days=60, seed=11, end=end)
    engine.dispose()
    with dg.instance_for_test() as instance:
        deployed = Deployment(url, tmp_path, instance)
        deployed.cli("db", "upgrade")
        yield deployed
        deployed.engine.dispose()


def test_a_reinstall_keeps_the_send_history_and_a_rerun_emails_nobody_twice(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    day, engine = deployment.day, deployment.engine
    deployment.run_day(LOOP)
    emailed = users_of(engine, LOOP, day, arm="treatment")
    picked = users_of(engine, LOOP, day)
    assert emailed and deployment.emails_in_outbox() == len(emailed)
    before = history(engine)
    capsys.readouterr()

    deployment.cli("db", "uninstall", "--yes")
    said = capsys.readouterr().out
    assert f"kept {len(emailed)} email(s) in the send log in retention.email_send_log_kept" in said
    assert f"kept {len(picked)} audience row(s) in retention.reengagement_audience_kept" in said
    deployment.cli("db", "upgrade")
    assert history(engine) == before
    # Its days may have been built again before they were kept: the cap reads their emails.
    rebuilt = "SELECT count(*) FROM retention.audience_days_rebuilt WHERE partition_date = :day"
    assert count(engine, rebuilt, day=day) == 1

    # The other loop's first day after the reinstall: whoever the first loop picked yesterday
    # (in either arm) is within the frequency cap.
    other = deployment.run_day(OTHER_LOOP)
    assert other[f"{OTHER_LOOP}/excluded_frequency_cap"] >= len(picked) > 0
    assert users_of(engine, OTHER_LOOP, day) & picked == set()
    assert deployment.emails_in_outbox() == len(emailed) + len(
        users_of(engine, OTHER_LOOP, day, arm="treatment")
    )
    emails_so_far = deployment.emails_in_outbox()

    # The same day again: the same audience, and not one email more.
    deployment.run_day(LOOP)
    assert users_of(engine, LOOP, day, arm="treatment") == emailed
    assert deployment.emails_in_outbox() == emails_so_far
    assert count(
        engine, "SELECT count(*) FROM retention.email_send_log WHERE loop_name = :l", l=LOOP
    ) == len(emailed)

    # Told to, the uninstall forgets the send history.
    deployment.cli("db", "uninstall", "--yes", "--forget-send-history")
    assert "send log" not in capsys.readouterr().out
    deployment.cli("db", "upgrade")
    assert history(engine) == dict.fromkeys(HISTORY, 0)


def test_restored_rows_keep_their_ids_and_new_rows_number_on(app_database_url: str) -> None:
    config = make_config(app_database_url)
    engine = create_engine(app_database_url)
    install(engine, config)
    insert_sent_email(engine, "u1", "key-1")
    insert_sent_email(engine, "u2", "key-2")
    with engine.begin() as connection:
        connection.execute(
            text("""
                INSERT INTO retention.email_events
                    (svix_id, event_type, provider_email_id, send_log_id, occurred_at)
                SELECT 'msg-1', 'delivered', 'e-2', id, now() FROM retention.email_send_log
                WHERE send_key = 'key-2'""")
        )
        connection.execute(
            text("""
                INSERT INTO retention.campaign_decisions (loop_name, step, step_id,
                    decided_on, variant_shares, paused, reason, evidence)
                VALUES ('re_engagement', 2, 're_engagement_last_call', '2026-11-20', '{"a": 1}',
                        true, 'harmful', '{}')""")
        )
    with engine.connect() as connection:
        ids = dict(
            connection.execute(text("SELECT send_key, id FROM retention.email_send_log")).all()
        )

    assert uninstall(engine, config) == {
        "email_send_log": 2,
        "email_events": 1,
        "campaign_decisions": 1,
    }
    install(engine, config)
    # A step paused as harmful stays paused after the reinstall.
    assert count(engine, "SELECT count(*) FROM retention.campaign_decisions WHERE paused") == 1
    insert_sent_email(engine, "u3", "key-3")

    with engine.connect() as connection:
        restored = dict(
            connection.execute(text("SELECT send_key, id FROM retention.email_send_log")).all()
        )
        linked = connection.execute(
            text("""
                SELECT log.send_key FROM retention.email_events AS event
                JOIN retention.email_send_log AS log ON log.id = event.send_log_id""")
        ).scalar_one()
    assert {key: restored[key] for key in ids} == ids
    assert restored["key-3"] > max(ids.values())
    assert linked == "key-2"

    # Uninstalled twice, the second time told to forget the history: the schema goes whole.
    kept = {"email_send_log": 3, "email_events": 1, "campaign_decisions": 1}
    assert uninstall(engine, config) == kept
    assert uninstall(engine, config) == kept
    assert uninstall(engine, config, forget_send_history=True) == {}
    assert count(engine, "SELECT count(*) FROM pg_namespace WHERE nspname = 'retention'") == 0
    engine.dispose()


def test_users_the_app_deleted_while_uninstalled_are_erased_from_the_kept_history(
    app_database_url: str,
) -> None:
    config = make_config(app_database_url)
    engine = create_engine(app_database_url)
    install(engine, config)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (id, email) VALUES (1, 'a@example.com'), (2, 'b@example.com')")
        )
    insert_sent_email(engine, "1", "key-1")
    insert_sent_email(engine, "2", "key-2")
    uninstall(engine, config)

    with engine.begin() as connection:  # no trigger sees it
        connection.execute(text("DELETE FROM users WHERE id = 2"))
    install(engine, config)
    update_rollup(engine, config)

    with engine.connect() as connection:
        emails = dict(
            connection.execute(text("SELECT user_id, email FROM retention.email_send_log")).all()
        )
    assert emails == {"1": "user1@example.com", "2": ""}
    engine.dispose()


def test_a_new_schema_beside_an_install_is_refused_until_moved_or_meant(
    app_database_url: str,
) -> None:
    """A new `database.schema` would start an install that reads none of the old one's
    unsubscribes: refused, naming the old schema, both live and after `db uninstall`; the
    README's move (uninstall, rename the schema, upgrade) keeps them; `second_install` installs
    beside it on purpose."""
    from retention_pipeline.database.migrate import installation_problem
    from retention_pipeline.tracking.state import TrackingError

    config = make_config(app_database_url)
    moved = make_config(app_database_url, schema="retention_app")
    engine = create_engine(app_database_url)
    install(engine, config)
    unsubscribe(engine, "ada@example.com")

    refusal = "the pipeline's install in this database is in schema 'retention' (1 suppressed"
    with pytest.raises(TrackingError, match="--second-install") as refused:
        install(engine, moved)
    assert refusal in str(refused.value) and "\n" not in str(refused.value)
    with engine.connect() as connection:
        assert refusal in installation_problem(connection, "retention_app")
    uninstall(engine, config)
    with pytest.raises(TrackingError, match=re.escape(refusal)):
        install(engine, moved)
    assert count(engine, "SELECT count(*) FROM pg_namespace WHERE nspname = 'retention_app'") == 0

    with engine.begin() as connection:
        connection.execute(text("ALTER SCHEMA retention RENAME TO retention_app"))
    install(engine, moved)
    assert count(engine, "SELECT count(*) FROM retention_app.email_suppressions") == 1

    with pytest.raises(TrackingError, match="schema 'retention_app' \\(1 suppressed"):
        install(engine, config)
    install(engine, config, second_install=True)
    assert count(engine, "SELECT count(*) FROM retention.email_suppressions") == 0
    engine.dispose()


def test_an_apps_own_suppression_table_and_alembic_are_not_an_install(
    app_database_url: str,
) -> None:
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE public.alembic_version (version_num text)"))
        connection.execute(text("CREATE TABLE public.email_suppressions (email text)"))
    install(engine, make_config(app_database_url))
    assert count(engine, "SELECT count(*) FROM retention.email_suppressions") == 0
    engine.dispose()


def test_an_unsubscribe_while_uninstalling_is_kept_or_fails_never_lost(
    app_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unsubscribe written while `db uninstall` copies the send history either lands in
    what it keeps or fails where its writer sees it (`serve` then journals it): never
    acknowledged and dropped with the schema."""
    import threading

    from retention_pipeline.database import reinstall

    config = make_config(app_database_url)
    engine = create_engine(app_database_url)
    install(engine, config)
    insert_sent_email(engine, "u1", "key-1")
    written: list[bool] = []

    def late_unsubscribe() -> None:
        try:
            unsubscribe(engine, "late@example.com")
        except Exception:  # the writer learns its write did not land
            written.append(False)
        else:
            written.append(True)

    writer = threading.Thread(target=late_unsubscribe)
    copy_count = reinstall._count

    def count_while_a_reader_unsubscribes(connection, table: str) -> int:
        if table.endswith("email_send_log") and not writer.is_alive() and not written:
            writer.start()
            writer.join(timeout=2)  # without the lock it commits here, between copies
        return copy_count(connection, table)

    monkeypatch.setattr(reinstall, "_count", count_while_a_reader_unsubscribes)
    uninstall(engine, config)
    writer.join(timeout=30)
    monkeypatch.undo()
    install(engine, config)

    kept = count(
        engine,
        "SELECT count(*) FROM retention.email_suppressions WHERE email = 'late@example.com'",
    )
    assert written == [bool(kept)]
    engine.dispose()


def test_uninstall_is_refused_while_a_send_run_sends(app_database_url: str) -> None:
    from retention_pipeline.sending.sender_lock import sender_lock
    from retention_pipeline.tracking.install import is_installed
    from retention_pipeline.tracking.state import TrackingError

    config = make_config(app_database_url)
    engine = create_engine(app_database_url)
    install(engine, config)
    sending = sender_lock(engine, schema="retention", loop_name=LOOP, holder="send-run-42")
    refused = pytest.raises(TrackingError, match="a send run is sending \\('send-run-42'")
    with sending, refused:
        uninstall(engine, config)
    assert is_installed(engine, config)
    assert count(engine, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'retention%'") > 0
    # Another install's sender is not this one's.
    with sender_lock(engine, schema="retention_other", loop_name=LOOP, holder="other-install"):
        assert uninstall(engine, config) == {}
    engine.dispose()


def test_a_sender_that_starts_while_uninstalling_is_caught_under_the_lock(
    app_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An hourly send run that takes its lock between the triggers' removal and the copy: it may
    have sent what it claimed, whose outcomes the dropped log could not record."""
    from contextlib import ExitStack

    from retention_pipeline.sending.sender_lock import sender_lock
    from retention_pipeline.tracking import install as installing
    from retention_pipeline.tracking.state import TrackingError

    config = make_config(app_database_url)
    engine = create_engine(app_database_url)
    install(engine, config)
    insert_sent_email(engine, "u1", "key-1")
    senders = ExitStack()
    lock_tables = installing.lock_against_writes

    def a_sender_starts_first(connection, schema, tables) -> None:
        senders.enter_context(
            sender_lock(engine, schema="retention", loop_name=LOOP, holder="hourly-send")
        )
        lock_tables(connection, schema, tables)

    monkeypatch.setattr(installing, "lock_against_writes", a_sender_starts_first)
    with senders, pytest.raises(TrackingError, match="the triggers are gone, the schema is still"):
        uninstall(engine, config)
    monkeypatch.undo()
    assert count(engine, "SELECT count(*) FROM retention.email_send_log") == 1
    assert uninstall(engine, config) == {"email_send_log": 1}
    engine.dispose()
