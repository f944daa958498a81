"""The activity rollup the triggers keep current (or the incremental refresh recomputes)."""

import dagster as dg

from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import refresh_incremental, rollup_status


@dg.asset(
    key=dg.AssetKey(["retention", "activity_rollup"]),
    deps=[dg.AssetKey(["app", "events"]), dg.AssetKey(["app", "sessions"])],
    group_name="retention",
    kinds={"postgres"},
    description=(
        "Per-user, per-day events, auth sessions, last activity and last actions. Kept current "
        "by triggers on the app's events and sessions; in incremental mode this recomputes the "
        "recent days."
    ),
    check_specs=[
        dg.AssetCheckSpec(
            "no_recent_tracking_errors",
            asset=dg.AssetKey(["retention", "activity_rollup"]),
            description="The tracking triggers recorded no error in the last 24 hours.",
        )
    ],
)
def activity_rollup(context: dg.AssetExecutionContext, app_database: AppDatabase):
    app_database.ensure_installed()
    config = app_database.config
    recomputed_from = None
    with app_database.engine.begin() as connection:
        if config.database.tracking == "incremental":
            recomputed_from = refresh_incremental(connection, config)
        status = rollup_status(connection, app_database.schema)
    context.log.info(
        f"rollup: {status.rows} rows for {status.users} users, {status.first_day} to "
        f"{status.last_day} ({status.mode}, {status.timezone})"
    )
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": status.rows,
            "users": status.users,
            "first_day": str(status.first_day),
            "last_day": str(status.last_day),
            "tracking_mode": status.mode,
            "timezone": status.timezone,
            "recomputed_from": str(recomputed_from) if recomputed_from else "(triggers)",
        }
    )
    yield dg.AssetCheckResult(
        check_name="no_recent_tracking_errors",
        passed=status.recent_errors == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"errors_last_24h": status.recent_errors, "last_error": status.last_error or ""},
    )
