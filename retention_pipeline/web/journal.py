"""Unsubscribes the database could not take, kept on local disk until it can.

A verified unsubscribe whose write fails (the database is down, restarting, or refused it) is
appended to a journal file, one JSON line each (who, from which loop, when: never a token or a
secret), and written through to the disk before the reader is told it is done. `replay` writes
the entries to the database, each in a transaction of its own, and removes from the file only
those whose transaction committed. Suppressing is idempotent, so an entry replayed twice (after a
crash between the commit and the removal, or by two services sharing the file) suppresses once.

Appends and removals of every process take turns on a lock file beside the journal: a removal
rewrites the file, and an append meanwhile would go to the file it replaces.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from retention_pipeline.recipients.suppressions import NothingToUnsubscribe, unsubscribe_user

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JournaledUnsubscribe:
    user_id: str
    loop_name: str | None
    """None: every loop."""
    requested_at: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Replay:
    suppressed: int = 0
    nothing_to_unsubscribe: int = 0
    left: int = 0
    """Entries still in the journal: the database failed before their turn, or on it."""
    failure: str | None = None


class UnsubscribeJournal:
    """The append-only journal at `path` (created on the first append, with its folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(f"{path.name}.lock")

    def record(self, user_id: str, loop_name: str | None) -> JournaledUnsubscribe:
        """Append one unsubscribe; it is on the disk when this returns."""
        entry = JournaledUnsubscribe(
            user_id=user_id,
            loop_name=loop_name,
            requested_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        line = json.dumps(asdict(entry)).encode() + b"\n"
        with self._locked():
            created = not self.path.exists()
            with open(self.path, "a+b", opener=_private) as journal:
                if journal.seek(0, os.SEEK_END) and _last_byte(journal) != b"\n":
                    line = b"\n" + line  # after a line an earlier crash cut short
                journal.write(line)
                journal.flush()
                os.fsync(journal.fileno())
            if created:
                _sync_folder(self.path.parent)
        return entry

    def pending(self) -> list[JournaledUnsubscribe]:
        """The entries not replayed yet, oldest first."""
        with self._locked():
            return self._read()

    def replay(self, engine: Engine, schema: str) -> Replay:
        """Write the pending entries to the database in their order, and remove those whose
        transaction committed; stop at the first database error, keeping the rest."""
        entries = self.pending()
        done: set[str] = set()
        suppressed = nothing = 0
        failure = None
        try:
            for entry in entries:
                try:
                    with engine.begin() as connection:
                        unsubscribe_user(
                            connection,
                            schema=schema,
                            user_id=entry.user_id,
                            loop_name=entry.loop_name,
                        )
                    suppressed += 1
                except NothingToUnsubscribe as never_emailed:
                    logger.info("journaled unsubscribe dropped: %s", never_emailed)
                    nothing += 1
                done.add(entry.id)
        except SQLAlchemyError as error:
            failure = database_failure(error)
        finally:
            if done:
                self._remove(done)
        return Replay(suppressed, nothing, len(entries) - len(done), failure)

    def _read(self) -> list[JournaledUnsubscribe]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(lines, 1):
            try:
                entries.append(JournaledUnsubscribe(**json.loads(line)))
            except (ValueError, TypeError):
                # Only a crash in the middle of an append writes one: its reader got no answer.
                logger.warning("%s line %d is not an unsubscribe: skipped", self.path, number)
        return entries

    def _remove(self, ids: set[str]) -> None:
        with self._locked():
            kept = [entry for entry in self._read() if entry.id not in ids]
            if kept:
                rewritten = self.path.with_name(f"{self.path.name}.rewrite")
                with open(rewritten, "wb", opener=_private) as journal:
                    journal.writelines(json.dumps(asdict(e)).encode() + b"\n" for e in kept)
                    journal.flush()
                    os.fsync(journal.fileno())
                os.replace(rewritten, self.path)
            else:
                self.path.unlink(missing_ok=True)
            _sync_folder(self.path.parent)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a", opener=_private) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def database_failure(error: SQLAlchemyError) -> str:
    """Why a database call failed, in a few words and without the statement, its parameters or
    the server's detail, which may name an address."""
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    if sqlstate is None and isinstance(error, DBAPIError):
        return f"the database is unreachable ({type(error).__name__})"
    if sqlstate is None:
        return f"the database failed ({type(error).__name__})"
    return f"the database failed the statement ({type(error).__name__}, SQLSTATE {sqlstate})"


def _private(path: str, flags: int) -> int:
    # The journal names users: readable by the service's own account alone.
    return os.open(path, flags, 0o600)


def _last_byte(journal) -> bytes:
    journal.seek(-1, os.SEEK_END)
    return journal.read(1)


def _sync_folder(folder: Path) -> None:
    """Make a created, replaced or removed file's folder entry durable too."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
