"""The daily run: the loops' assets for the day just ended, at each loop's trigger time."""

import dagster as dg

from retention_pipeline.config import RetentionConfig
from retention_pipeline.defs.audience import AUDIENCE, AudienceConfig
from retention_pipeline.defs.outcomes import OUTCOMES, PERFORMANCE
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.defs.tracking import ROLLUP
from retention_pipeline.segments.calendar import day_just_ended

daily_retention_job = dg.define_asset_job(
    "daily_retention",
    selection=dg.AssetSelection.assets(ROLLUP, SNAPSHOT, SEGMENTS, AUDIENCE, OUTCOMES, PERFORMANCE),
    description="Fold the captured activity in, then snapshot and segment every user for one "
    "day, pick the day's audience, re-evaluate the outcomes whose windows are open and measure "
    "each loop against its holdout (the decisions apply from the next day's audience).",
)


def build_daily_schedules(config: RetentionConfig, job) -> list[dg.ScheduleDefinition]:
    """One schedule per distinct loop cron, in the loops' shared timezone: each runs the day that
    just ended for the loops with that cron. Loops that share a cron share a run, so the day's
    snapshot is not built twice at once; with a single cron the schedule is
    `daily_retention_schedule`, otherwise `daily_retention_<loop>[_<loop>...]`."""
    by_cron: dict[str, list[str]] = {}
    for loop in config.loops:
        by_cron.setdefault(loop.trigger.cron, []).append(loop.name)
    return [
        _daily_schedule(
            job,
            cron=cron,
            timezone=config.timezone,
            loops=loops,
            name="daily_retention_schedule"
            if len(by_cron) == 1
            else "daily_retention_" + "_".join(loops),
        )
        for cron, loops in by_cron.items()
    ]


def _daily_schedule(
    job, *, cron: str, timezone: str, loops: list[str], name: str
) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=name,
        job=job,
        cron_schedule=cron,
        execution_timezone=timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Each day at {cron} ({timezone}), materialize the daily assets for the day "
        f"just ended and pick the audience of {', '.join(loops)}.",
    )
    def daily_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        key = day_just_ended(context.scheduled_execution_time, timezone).isoformat()
        return dg.RunRequest(
            run_key=key,
            partition_key=key,
            run_config=dg.RunConfig(
                ops={"retention__reengagement_audience": AudienceConfig(loops=loops)}
            ),
        )

    return daily_schedule
