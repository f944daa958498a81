"""One sender per loop and shard at a time: a PostgreSQL advisory lock held for the sender's
lifetime.

The lock lives on a dedicated connection (session level, autocommit, so no transaction stays
open for the length of a send), and goes when the sender ends or its process dies, since
PostgreSQL releases a session's advisory locks when its connection closes. A second sender of the
same loop and shard does not wait behind the first: it stops with one line naming the holder, so an
operator sees which process still sends (a step process that outlived its run worker, say).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, text

from retention_pipeline.sending.shards import WHOLE_LOOP, Shard

# The first half of the two-key advisory lock: which kind of lock this is. The second half
# names the schema, loop and shard.
_SENDER_LOCK_SPACE = zlib.crc32(b"retention-pipeline:sender") & 0x7FFFFFFF


class SenderBusy(RuntimeError):
    """Another sender holds the loop's (shard's) lock; the message names it in one line."""


def sender_lock_keys(schema: str, loop_name: str, shard: Shard) -> tuple[int, int]:
    """The (space, key) pair of the lock of the loop's shard; both positive, as pg_locks shows
    them."""
    name = f"{schema}:{loop_name}:{shard.index}"
    return _SENDER_LOCK_SPACE, zlib.crc32(name.encode()) & 0x7FFFFFFF


@contextmanager
def sender_lock(
    engine: Engine, *, schema: str, loop_name: str, holder: str, shard: Shard = WHOLE_LOOP
) -> Iterator[None]:
    """Hold the sender lock of the loop's `shard` for the duration of the block, or raise
    `SenderBusy`.

    `holder` becomes the dedicated connection's `application_name` (PostgreSQL keeps 63
    characters of it), which is how the next sender, and `pg_stat_activity`, name this one.
    """
    space, key = sender_lock_keys(schema, loop_name, shard)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(
            text("SELECT set_config('application_name', :holder, false)"), {"holder": holder}
        )
        taken = connection.execute(
            text("SELECT pg_try_advisory_lock(:space, :key)"), {"space": space, "key": key}
        ).scalar_one()
        if not taken:
            connection.execute(text("RESET application_name"))
            which = f"loop {loop_name}" if shard == WHOLE_LOOP else f"loop {loop_name}, {shard}"
            raise SenderBusy(
                f"{which} (schema {schema}) is already being sent by "
                f"{_describe_holder(connection, space, key)}; this sender stops without sending"
            )
        try:
            yield
        finally:
            connection.execute(
                text("SELECT pg_advisory_unlock(:space, :key)"), {"space": space, "key": key}
            )
            # The connection goes back to the pool: it must not keep naming this sender.
            connection.execute(text("RESET application_name"))


def _describe_holder(connection: Connection, space: int, key: int) -> str:
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
                  AND lock.objid = CAST(CAST(:key AS bigint) AS oid)
                  AND lock.objsubid = 2"""),
            {"space": space, "key": key},
        )
        .mappings()
        .first()
    )
    if holder is None:  # it let go between our attempt and this look
        return "another sender that has just finished"
    name = holder["application_name"] or "an unnamed client"
    # The lock is the last statement its connection ran, so its last state change is when it
    # was taken.
    since = holder["state_change"].isoformat(timespec="seconds")
    where = f" at {holder['client_addr']}" if holder["client_addr"] else ""
    return f"{name!r} (PostgreSQL pid {holder['pid']}{where}, holding it since {since})"
