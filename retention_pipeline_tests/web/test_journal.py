"""The unsubscribe journal on its own: durable appends, replays that remove only what committed."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from sqlalchemy import create_engine, event, text

from retention_pipeline.web.journal import UnsubscribeJournal
from retention_pipeline_tests.sending.support import LOOP, SCHEMA, SendingDatabase


def suppressions(db: SendingDatabase) -> list[tuple]:
    with db.engine.connect() as connection:
        return connection.execute(
            text("SELECT email, loop_name, reason FROM retention.email_suppressions ORDER BY 1")
        ).all()


def test_an_entry_is_one_private_json_line_naming_the_user_and_the_loop(tmp_path: Path) -> None:
    journal = UnsubscribeJournal(tmp_path / "web" / "journal.jsonl")

    first = journal.record("u1", LOOP)
    second = journal.record("u2", None)

    lines = [json.loads(line) for line in journal.path.read_text().splitlines()]
    assert [(line["user_id"], line["loop_name"]) for line in lines] == [("u1", LOOP), ("u2", None)]
    assert set(lines[0]) == {"id", "user_id", "loop_name", "requested_at"}
    assert journal.pending() == [first, second]
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600


def test_a_line_an_interrupted_append_cut_short_loses_no_other_entry(tmp_path: Path) -> None:
    journal = UnsubscribeJournal(tmp_path / "journal.jsonl")
    kept = journal.record("u1", LOOP)
    with open(journal.path, "ab") as cut_short:
        cut_short.write(b'{"user_id": "u9", "loop_')

    after = journal.record("u2", LOOP)

    assert journal.pending() == [kept, after]


def test_a_replay_writes_every_entry_once_and_empties_the_journal(
    emailed: SendingDatabase, tmp_path: Path
) -> None:
    journal = UnsubscribeJournal(tmp_path / "journal.jsonl")
    journal.record("u1", LOOP)
    journal.record("u2", None)
    journal.record("u1", LOOP)  # clicked twice
    journal.record("never-emailed", LOOP)

    replay = journal.replay(emailed.engine, SCHEMA)

    assert (replay.suppressed, replay.nothing_to_unsubscribe, replay.left) == (3, 1, 0)
    assert replay.failure is None
    assert not journal.path.exists()
    assert suppressions(emailed) == [
        ("ada@example.com", LOOP, "unsubscribed"),
        ("bob@example.com", None, "unsubscribed"),
    ]
    assert journal.replay(emailed.engine, SCHEMA).suppressed == 0


def test_while_the_database_is_unreachable_every_entry_stays(tmp_path: Path) -> None:
    journal = UnsubscribeJournal(tmp_path / "journal.jsonl")
    entries = [journal.record("u1", LOOP), journal.record("u2", None)]
    nowhere = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")

    replay = journal.replay(nowhere, SCHEMA)

    assert (replay.suppressed, replay.left) == (0, 2)
    assert replay.failure == "the database is unreachable (OperationalError)"
    assert journal.pending() == entries


def test_an_unsubscribe_journaled_during_a_replay_stays_for_the_next(
    emailed: SendingDatabase, tmp_path: Path
) -> None:
    journal = UnsubscribeJournal(tmp_path / "journal.jsonl")
    journal.record("u1", LOOP)
    arrived = []

    @event.listens_for(emailed.engine, "begin")
    def another_request_meanwhile(_connection) -> None:
        if not arrived:
            arrived.append(journal.record("u2", None))

    replay = journal.replay(emailed.engine, SCHEMA)

    assert (replay.suppressed, replay.left) == (1, 0)
    assert journal.pending() == arrived
    assert suppressions(emailed) == [("ada@example.com", LOOP, "unsubscribed")]
