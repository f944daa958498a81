"""The daily run: every loop's assets for the day just ended, at the loops' trigger time."""

import dagster as dg

from retention_pipeline.config import RetentionConfig
from retention_pipeline.defs.activity import ROLLUP
from retention_pipeline.defs.emails import AUDIENCE
from retention_pipeline.defs.outcomes import OUTCOMES, PERFORMANCE
from retention_pipeline.defs.partitions import CONFIG
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.segments.calendar import day_just_ended

daily_retention_job = dg.define_asset_job(
    "daily_retention",
    selection=dg.AssetSelection.assets(ROLLUP, SNAPSHOT, SEGMENTS, AUDIENCE, OUTCOMES, PERFORMANCE),
    description="Fold the captured activity in, then snapshot and segment every user for one "
    "day, pick the day's audience, re-evaluate the outcomes whose windows are open and measure "
    "each loop against its holdout (the decisions apply from the next day's audience).",
)


def build_daily_schedule(config: RetentionConfig, job) -> dg.ScheduleDefinition:
    """At the loops' cron (default 09:00) in their timezone, run the day that just ended."""
    timezone = config.timezone

    @dg.schedule(
        name="daily_retention_schedule",
        job=job,
        cron_schedule=config.loops[0].trigger.cron,
        execution_timezone=timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Each morning, materialize the daily assets for the day just ended.",
    )
    def daily_retention_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        key = day_just_ended(context.scheduled_execution_time, timezone).isoformat()
        return dg.RunRequest(run_key=key, partition_key=key)

    return daily_retention_schedule


daily_retention_schedule = build_daily_schedule(CONFIG, daily_retention_job)
