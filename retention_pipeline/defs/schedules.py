"""The daily run: the loops' assets for the day just ended, at each loop's trigger time."""

from zoneinfo import ZoneInfo

import dagster as dg

from retention_pipeline.config import RetentionConfig
from retention_pipeline.config.cron import fires_on, time_of_day
from retention_pipeline.config.models import Loop
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
    """One schedule per time of day the loops' crons fire at, in the loops' shared timezone:
    each runs the day that just ended for the loops whose cron fires that day. Loops that fire
    at the same time share a run (`0 9 * * *` and a Monday's `0 9 * * 1` too), so the day's
    snapshot is not built twice at once; with a single time the schedule is
    `daily_retention_schedule`, otherwise `daily_retention_<loop>[_<loop>...]`."""
    by_time: dict[tuple[int, int], list[Loop]] = {}
    for loop in config.loops:
        by_time.setdefault(time_of_day(loop.trigger.cron), []).append(loop)
    return [
        _daily_schedule(
            job,
            timezone=config.timezone,
            loops=loops,
            name="daily_retention_schedule"
            if len(by_time) == 1
            else "daily_retention_" + "_".join(loop.name for loop in loops),
        )
        for loops in by_time.values()
    ]


def _daily_schedule(job, *, timezone: str, loops: list[Loop], name: str) -> dg.ScheduleDefinition:
    crons = sorted({loop.trigger.cron for loop in loops})

    @dg.schedule(
        name=name,
        job=job,
        cron_schedule=crons[0] if len(crons) == 1 else crons,
        execution_timezone=timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"At {' and '.join(crons)} ({timezone}), materialize the daily assets for "
        f"the day just ended and pick the audience of the loops due then "
        f"({', '.join(loop.name for loop in loops)}).",
    )
    def daily_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        fired = context.scheduled_execution_time.astimezone(ZoneInfo(timezone))
        due = [loop.name for loop in loops if fires_on(loop.trigger.cron, fired.date())]
        key = day_just_ended(context.scheduled_execution_time, timezone).isoformat()
        return dg.RunRequest(
            run_key=key,
            partition_key=key,
            run_config=dg.RunConfig(
                ops={"retention__reengagement_audience": AudienceConfig(loops=due)}
            ),
        )

    return daily_schedule
