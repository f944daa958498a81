"""Session settings of the pipeline's batch statements: the fold into the rollup and the daily
rebuilds of snapshots and segments."""

from __future__ import annotations

from sqlalchemy import Connection, text

# Sorting, grouping and hashing a fold or a day's users in memory is far cheaper than spilling
# them to disk.
BATCH_WORK_MEM = "256MB"


def tune_for_batch(connection: Connection) -> None:
    """For the rest of the caller's transaction: room to work in memory, and no JIT, whose
    compilation cost about 0.5 s per snapshot statement at 100k users, several times what the
    statement itself took (`python -m benchmarks run`)."""
    connection.execute(text(f"SET LOCAL work_mem = '{BATCH_WORK_MEM}'"))
    connection.execute(text("SET LOCAL jit = off"))
