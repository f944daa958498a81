"""Every user's activity as of the end of one day, computed in PostgreSQL from the rollup.

The rollup buckets days in the loop timezone, so "day <= D" is exactly "before the end of D":
nothing after the partition leaks in, and a backfill gives the rows the schedule would have.
Subscriptions are the app's current state (it keeps no history), so a backfill sees today's.

The full build (`full`), the rolled-forward build (`rolled`), what they share (`statement`), the
build that chooses between them (`build`) and what the snapshot's checks compare (`checks`).
"""

from retention_pipeline.segments.snapshot.build import SnapshotSummary, build_snapshot
from retention_pipeline.segments.snapshot.checks import (
    Reconciliation,
    reconcile_with_users,
    snapshot_user_count,
)
from retention_pipeline.segments.snapshot.statement import SnapshotError

__all__ = [
    "Reconciliation",
    "SnapshotError",
    "SnapshotSummary",
    "build_snapshot",
    "reconcile_with_users",
    "snapshot_user_count",
]
