"""One sender per loop and shard at a time: a PostgreSQL advisory lock held for the sender's
lifetime.

The lock lives on a dedicated connection (session level, autocommit, so no transaction stays
open for the length of a send), and goes when the sender ends or its process dies, since
PostgreSQL releases a session's advisory locks when its connection closes. A second sender of the
same loop and shard does not wait behind the first: it stops with one line naming the holder, so an
operator sees which process still sends (a step process that outlived its run worker, say).

The connection can also die under a live sender (an operator's `pg_terminate_backend`, a database
restart), and the lock with it: the sender asks `SenderLock.ensure_held` before each batch and
stops with `SenderLockLost` instead of sending unlocked beside the next sender.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from retention_pipeline.sending.shards import WHOLE_LOOP, Shard

# The first half of the two-key advisory lock: which kind of lock this is. The second half
# names the schema, loop and shard.
_SENDER_LOCK_SPACE = zlib.crc32(b"retention-pipeline:sender") & 0x7FFFFFFF


logger = logging.getLogger(__name__)


class SenderBusy(RuntimeError):
    """Another sender holds the loop's (shard's) lock; the message names it in one line."""


class SenderLockLost(RuntimeError):
    """The sender's lock went with its connection; the message says so in one line."""


class SenderLock:
    """The held lock of one loop's shard, on its dedicated connection."""

    def __init__(self, connection: Connection, space: int, key: int, which: str) -> None:
        self._connection = connection
        self._space = space
        self._key = key
        self._which = which

    def ensure_held(self) -> None:
        """Return if this sender still holds its lock; raise `SenderLockLost` if not."""
        try:
            held = self._connection.execute(
                text("""
                    SELECT EXISTS (
                        SELECT FROM pg_locks
                        WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
                          AND classid = CAST(CAST(:space AS bigint) AS oid)
                          AND objid = CAST(CAST(:key AS bigint) AS oid)
                          AND objsubid = 2)"""),
                {"space": self._space, "key": self._key},
            ).scalar_one()
        except DBAPIError as error:
            raise SenderLockLost(
                f"lost the sender lock of {self._which}: its PostgreSQL connection is gone "
                f"({_first_line(error)}); stopped before the next batch, whose emails stay "
                "claimed for the next send run"
            ) from None
        if not held:
            raise SenderLockLost(
                f"lost the sender lock of {self._which}: its connection no longer holds it; "
                "stopped before the next batch, whose emails stay claimed for the next send run"
            )


def sender_lock_keys(schema: str, loop_name: str, shard: Shard) -> tuple[int, int]:
    """The (space, key) pair of the lock of the loop's shard; both positive, as pg_locks shows
    them."""
    name = f"{schema}:{loop_name}:{shard.index}"
    return _SENDER_LOCK_SPACE, zlib.crc32(name.encode()) & 0x7FFFFFFF


@contextmanager
def sender_lock(
    engine: Engine, *, schema: str, loop_name: str, holder: str, shard: Shard = WHOLE_LOOP
) -> Iterator[SenderLock]:
    """Hold the sender lock of the loop's `shard` for the duration of the block, or raise
    `SenderBusy`. The block asks the `SenderLock` it gets whether the lock is still held.

    `holder` becomes the dedicated connection's `application_name` (PostgreSQL keeps 63
    characters of it), which is how the next sender, and `pg_stat_activity`, name this one.
    """
    space, key = sender_lock_keys(schema, loop_name, shard)
    which = f"loop {loop_name}" if shard == WHOLE_LOOP else f"loop {loop_name}, {shard}"
    which += f" (schema {schema})"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(
            text("SELECT set_config('application_name', :holder, false)"), {"holder": holder}
        )
        taken = connection.execute(
            text("SELECT pg_try_advisory_lock(:space, :key)"), {"space": space, "key": key}
        ).scalar_one()
        if not taken:
            connection.execute(text("RESET application_name"))
            raise SenderBusy(
                f"{which} is already being sent by "
                f"{_describe_holder(connection, space, key)}; this sender stops without sending"
            )
        try:
            yield SenderLock(connection, space, key, which)
        finally:
            _unlock(connection, space, key, which)


def _unlock(connection: Connection, space: int, key: int, which: str) -> None:
    # Never raises: an error here would replace the one that ended the block. A connection that
    # died took the lock with it (PostgreSQL drops a session's locks when it ends).
    if connection.invalidated:
        return
    try:
        connection.execute(
            text("SELECT pg_advisory_unlock(:space, :key)"), {"space": space, "key": key}
        )
        # The connection goes back to the pool: it must not keep naming this sender.
        connection.execute(text("RESET application_name"))
    except DBAPIError as error:
        logger.warning(
            "could not release the sender lock of %s (%s); closing its connection instead",
            which,
            _first_line(error),
        )
        # Never back into the pool still holding the lock.
        connection.invalidate()


def _first_line(error: DBAPIError) -> str:
    lines = str(error.orig or error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def running_sender(
    connection: Connection, *, schema: str, loop_names: list[str], shards: int
) -> str | None:
    """A sender of one of `loop_names` (any of its `shards`) in `schema` holding its lock, named
    as `SenderBusy` names one, or None. Another install's senders are not this one's."""
    keys = [
        sender_lock_keys(schema, loop_name, Shard(index, shards))[1]
        for loop_name in loop_names
        for index in range(shards)
    ]
    return _holder(connection, _SENDER_LOCK_SPACE, keys)


def _describe_holder(connection: Connection, space: int, key: int) -> str:
    # None: it let go between our attempt and this look.
    return _holder(connection, space, [key]) or "another sender that has just finished"


def _holder(connection: Connection, space: int, keys: list[int]) -> str | None:
    """The holder of one of the advisory locks (space, key) of `keys`."""
    holder = (
        connection.execute(
            text("""
                SELECT activity.pid, activity.application_name, activity.state_change,
                       activity.client_addr
                FROM pg_locks AS lock
                JOIN pg_stat_activity AS activity ON activity.pid = lock.pid
                WHERE lock.locktype = 'advisory' AND lock.granted
                  AND lock.database = (SELECT oid FROM pg_database
                                       WHERE datname = current_database())
                  AND lock.classid = CAST(CAST(:space AS bigint) AS oid)
                  AND CAST(lock.objid AS bigint) = ANY (CAST(:keys AS bigint[]))
                  AND lock.objsubid = 2
                ORDER BY activity.pid LIMIT 1"""),
            {"space": space, "keys": keys},
        )
        .mappings()
        .first()
    )
    if holder is None:
        return None
    name = holder["application_name"] or "an unnamed client"
    # The lock is the last statement its connection ran, so its last state change is when it
    # was taken.
    since = holder["state_change"].isoformat(timespec="seconds")
    where = f" at {holder['client_addr']}" if holder["client_addr"] else ""
    return f"{name!r} (PostgreSQL pid {holder['pid']}{where}, holding it since {since})"
