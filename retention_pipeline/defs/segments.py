"""Daily activity snapshots and engagement segments, materialized every morning."""

from datetime import date, timedelta

import dagster as dg

from retention_pipeline.database.day_partitions import rebuilding_day
from retention_pipeline.database.replica import ReplicaDataError, copy_app_reads
from retention_pipeline.defs.partitions import (
    DayResult,
    daily_backfill_policy,
    day_by_day,
    previous_day_of,
)
from retention_pipeline.defs.retries import DAILY_ASSET_RETRIES
from retention_pipeline.defs.tracking import ROLLUP
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.segments.rules import (
    CLASSIFIED_SEGMENTS,
    build_day_segments,
    forget_rules_used_before,
    segment_counts,
    segment_examples,
)
from retention_pipeline.segments.snapshot import (
    SnapshotError,
    build_snapshot,
    reconcile_with_users,
    snapshot_user_count,
)

SNAPSHOT = dg.AssetKey(["retention", "user_activity_snapshot"])
SEGMENTS = dg.AssetKey(["retention", "engagement_segments"])
SNAPSHOT_TABLE = "user_activity_snapshot"


def build_segment_assets(daily: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    """The daily snapshot and segments assets, on the definitions' daily partitions."""

    @dg.asset(
        key=SNAPSHOT,
        partitions_def=daily,
        backfill_policy=daily_backfill_policy,
        retry_policy=DAILY_ASSET_RETRIES,
        # The day before's snapshot is rolled forward when it can be: backfills run the days in
        # order.
        deps=[
            ROLLUP,
            previous_day_of(SNAPSHOT),
        ],
        group_name="retention",
        kinds={"postgres"},
        description=(
            "Every user's activity as of the end of the partition day: last activity, last "
            "actions, 7-day events and auth sessions, the session baseline, active days in the "
            "last 28, account age and Stripe subscription state."
        ),
        # Blocking: a snapshot that loses users or leaks later activity never reaches the segments.
        check_specs=[
            dg.AssetCheckSpec(
                "reconciles_with_users",
                blocking=True,
                asset=SNAPSHOT,
                description="Every app user who existed by the day's end, exactly once.",
            ),
            dg.AssetCheckSpec(
                "no_user_vanished",
                asset=SNAPSHOT,
                description="Every user of the day before's snapshot is still there.",
            ),
            dg.AssetCheckSpec(
                "no_activity_after_partition_end",
                blocking=True,
                asset=SNAPSHOT,
                description="No last activity later than the end of the day.",
            ),
        ],
    )
    def user_activity_snapshot(context: dg.AssetExecutionContext, app_database: AppDatabase):
        app_database.ensure_installed()
        yield from day_by_day(
            context, lambda day: _snapshot_day(context, app_database, day), ("no_user_vanished",)
        )

    @dg.asset(
        key=SEGMENTS,
        partitions_def=daily,
        backfill_policy=daily_backfill_policy,
        retry_policy=DAILY_ASSET_RETRIES,
        # Yesterday's segments give `entered_on`: backfills run the days in order.
        deps=[
            SNAPSHOT,
            previous_day_of(SEGMENTS),
        ],
        group_name="retention",
        kinds={"postgres"},
        description=(
            "One engagement segment per user, loop and day (new, active, at_risk, dormant, "
            "resurrected, never_activated, churned) with the reason and the day the user "
            "entered it."
        ),
        # Blocking: a user without a segment would silently miss (or wrongly join) the audience.
        check_specs=[
            dg.AssetCheckSpec(
                "one_segment_per_user",
                blocking=True,
                asset=SEGMENTS,
                description="Every snapshot user has exactly one segment per loop.",
            ),
            dg.AssetCheckSpec(
                "plausible_dormant_flow",
                asset=SEGMENTS,
                description="Dormant users did not jump by more than the loop's "
                "dormant_jump_warning_factor since the day before.",
            ),
        ],
    )
    def engagement_segments(context: dg.AssetExecutionContext, app_database: AppDatabase):
        app_database.ensure_installed()
        yield from day_by_day(
            context, lambda day: _segments_day(app_database, day), ("plausible_dormant_flow",)
        )

    return [user_activity_snapshot, engagement_segments]


def _snapshot_day(
    context: dg.AssetExecutionContext, app_database: AppDatabase, day: date
) -> DayResult:
    config = app_database.config
    with rebuilding_day(
        app_database.engine, app_database.schema, SNAPSHOT_TABLE, day, config.database.keep_days
    ) as (connection, rebuild):
        tables, read_from = None, {"app_read_from": "the primary"}
        try:
            if app_database.read_engine is not None:
                reads = copy_app_reads(connection, app_database.read_engine, config.database.tables)
                tables, read_from = reads.tables, reads.metadata
            summary = build_snapshot(connection, config, day, tables)
        except (SnapshotError, ReplicaDataError) as error:
            raise dg.Failure(description=str(error), allow_retries=False) from None
        reconciliation = reconcile_with_users(connection, config, day, summary.users, tables)
    context.log.info(
        f"{day}: {summary.users} users, {summary.active_today} active that day; built "
        f"{summary.path}: {summary.path_reason}"
    )
    return DayResult(
        metadata={
            "dagster/row_count": summary.users,
            "active_that_day": summary.active_today,
            "never_active": summary.never_active,
            "build": summary.path,
            "build_reason": summary.path_reason,
            **read_from,
            **rebuild,
        },
        checks={
            "reconciles_with_users": (
                reconciliation.app_users == reconciliation.snapshot_users
                and reconciliation.missing == 0,
                {
                    "app_users": reconciliation.app_users,
                    "snapshot_users": reconciliation.snapshot_users,
                    "missing": reconciliation.missing,
                },
            ),
            "no_user_vanished": (
                not summary.vanished,
                {
                    "vanished_users": summary.vanished or 0,
                    "compared_with": "the day before"
                    if summary.vanished is not None
                    else "nothing (first day)",
                },
            ),
            "no_activity_after_partition_end": (
                summary.leaked_rows == 0,
                {"rows_with_later_activity": summary.leaked_rows},
            ),
        },
    )


def _segments_day(app_database: AppDatabase, day: date) -> DayResult:
    config = app_database.config
    metadata: dict[str, object] = {}
    unsegmented = 0
    jumps: list[str] = []
    total = 0
    with rebuilding_day(
        app_database.engine,
        app_database.schema,
        CLASSIFIED_SEGMENTS,
        day,
        config.database.keep_days,
    ) as (connection, rebuild):
        snapshot_users = snapshot_user_count(connection, app_database.schema, day)
        by_loop = build_day_segments(
            connection, app_database.schema, config.loops, config.timezone, day
        )
        for loop in config.loops:
            counts = by_loop[loop.name]
            yesterday = segment_counts(
                connection, app_database.schema, loop.name, day - timedelta(days=1)
            )
            total += sum(counts.values())
            unsegmented += snapshot_users - sum(counts.values())
            metadata.update({f"{loop.name}/{segment}": n for segment, n in counts.items()})
            factor = loop.segments.dormant_jump_warning_factor
            if yesterday["dormant"] and counts["dormant"] > factor * yesterday["dormant"]:
                jumps.append(f"{loop.name}: {yesterday['dormant']} -> {counts['dormant']}")
        examples = segment_examples(connection, app_database.schema, day)
        forget_rules_used_before(
            connection, app_database.schema, day - timedelta(days=config.database.keep_days)
        )
    metadata.update(rebuild)
    metadata["dagster/row_count"] = total
    metadata["preview"] = dg.MetadataValue.md(examples.to_markdown(index=False))
    return DayResult(
        metadata=metadata,
        checks={
            "one_segment_per_user": (
                unsegmented == 0,
                {"snapshot_users": snapshot_users, "users_without_segment": unsegmented},
            ),
            "plausible_dormant_flow": (not jumps, {"jumps": "; ".join(jumps) or "none"}),
        },
    )
