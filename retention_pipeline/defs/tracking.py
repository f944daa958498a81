"""The activity rollup: the capture drained into it, hourly and before every daily run."""

import dagster as dg

from retention_pipeline.defs.retries import DAILY_ASSET_RETRIES
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import EmailResource
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.erasure import MassErasure
from retention_pipeline.tracking.status import reconcile_last_day, rollup_status

ROLLUP = dg.AssetKey(["retention", "activity_rollup"])


@dg.asset(
    key=ROLLUP,
    retry_policy=DAILY_ASSET_RETRIES,
    group_name="retention",
    kinds={"postgres"},
    description=(
        "Per-user, per-day actions, auth sessions, visits, last activity and last actions. "
        "Triggers on the app's activity sources append to a capture table; this folds the "
        "capture in, polls the sources no trigger captures, and erases users deleted from the "
        "app (or now excluded from it) from every table of the pipeline."
    ),
)
def activity_rollup(
    context: dg.AssetExecutionContext, app_database: AppDatabase, email: EmailResource
):
    app_database.ensure_installed()
    config = app_database.config
    try:
        update = update_rollup(app_database.engine, config)
    except MassErasure as mass:
        raise dg.Failure(description=str(mass), allow_retries=False) from None
    forgotten = email.forget(update.erased_send_keys)
    if update.late_days:
        context.log.warning(
            f"rows arrived for days a snapshot already covers: "
            f"{', '.join(map(str, update.late_days))}; re-materialize the daily assets from "
            f"{update.late_days[0]} (or your first partition, if later) to include them"
        )
    context.log.info(
        f"folded {update.events:,} event(s) and {update.sessions:,} session(s) into "
        f"{update.user_days:,} user-days in {update.seconds:.1f}s"
        + (
            f"; erased {update.erased_users} user(s) deleted from the app or now excluded"
            if update.erased_users
            else ""
        )
    )
    with app_database.engine.connect() as connection:
        status = rollup_status(connection, app_database.schema)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": status.rows,
            "first_day": str(status.first_day),
            "last_day": str(status.last_day),
            "users_on_last_day": status.users_on_last_day,
            "tracking_mode": status.mode,
            "timezone": status.timezone,
            "folded_events": update.events,
            "folded_sessions": update.sessions,
            "folded_rows_per_second": round(update.rows / update.seconds) if update.seconds else 0,
            "late_days": ", ".join(map(str, update.late_days)) or "none",
            "rematerialize_from": str(update.late_days[0]) if update.late_days else "",
            "polled_sources": ", ".join(update.polled_sources) or "none",
            "erased_users": update.erased_users,
            "erased_outbox_files": forgotten,
        }
    )


# Its own step, which nothing downstream waits for: at a million users it reads a day of every
# source (about 10 s), and the morning's snapshot, segments, audience and first email need none
# of it.
@dg.asset_check(
    asset=ROLLUP,
    name="reconciles_with_app_tables",
    description="The last complete day's events and sessions in the rollup (plus what the "
    "capture still holds) equal every activity source's rows of that day (at least equal, for a "
    "source whose time the app updates in place or that is polled), and each source counted "
    "since before that day counted at least its rows of it in the app.",
)
def rollup_reconciles_with_app_tables(app_database: AppDatabase) -> dg.AssetCheckResult:
    with app_database.engine.connect() as connection:
        reconciliation = reconcile_last_day(connection, app_database.config)
    return dg.AssetCheckResult(
        passed=reconciliation.matches,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "day": str(reconciliation.day),
            "app_events": reconciliation.app_events,
            "tracked_events": reconciliation.tracked_events,
            "app_sessions": reconciliation.app_sessions,
            "tracked_sessions": reconciliation.tracked_sessions,
            "compared": reconciliation.compared,
            **{
                f"app_rows/{name}": rows for name, rows in reconciliation.app_rows_by_source.items()
            },
            **{
                f"counted_rows/{name}": rows
                for name, rows in reconciliation.counted_rows_by_source.items()
            },
        },
    )


drain_activity_job = dg.define_asset_job(
    "drain_activity",
    # The reconciliation compares the last complete day, the same all day: the daily run's.
    selection=dg.AssetSelection.assets(ROLLUP).without_checks(),
    description="Fold the captured activity into the rollup.",
)

# Hourly keeps the capture to an hour of the app's writes; the daily run drains once more.
drain_activity_schedule = dg.ScheduleDefinition(
    name="drain_activity_hourly",
    job=drain_activity_job,
    cron_schedule="30 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every hour, fold the captured activity into the rollup.",
)
