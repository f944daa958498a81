"""The daily audience: who gets which step of which loop, picked from the day's segments."""

from datetime import UTC, date, datetime

import dagster as dg
from pydantic import Field

from retention_pipeline.audience.build import build_audiences
from retention_pipeline.audience.experiment import DesignChangeRefused
from retention_pipeline.config.models import Loop, RetentionConfig
from retention_pipeline.defs.partitions import (
    DayResult,
    daily_backfill_policy,
    day_by_day,
    previous_day_of,
)
from retention_pipeline.defs.retries import DAILY_ASSET_RETRIES
from retention_pipeline.defs.segments import SEGMENTS
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.segments.conditions import condition_user_ids
from retention_pipeline.sending.due import due_preview

AUDIENCE = dg.AssetKey(["retention", "reengagement_audience"])
LOOPS_METADATA = "loops"


class AudienceConfig(dg.Config):
    loops: list[str] | None = Field(
        None, description="the loops to pick the day's audience for (default: every loop)"
    )


def loops_picked(
    materialization: dg.AssetMaterialization | None, config: RetentionConfig
) -> list[str]:
    """The loops an audience materialization picked users for, as its `loops` metadata says."""
    picked = materialization.metadata.get(LOOPS_METADATA) if materialization else None
    if picked is None:  # reported without the pipeline's metadata: it stands for every loop
        return config.loop_names
    return [name for name in picked.value.split(",") if name]


def build_audience_asset(daily: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The daily audience asset, on the definitions' daily partitions."""

    @dg.asset(
        key=AUDIENCE,
        partitions_def=daily,
        backfill_policy=daily_backfill_policy,
        retry_policy=DAILY_ASSET_RETRIES,
        # Episodes carry over from day to day: backfills run the days in order.
        deps=[
            SEGMENTS,
            previous_day_of(AUDIENCE),
        ],
        group_name="retention",
        kinds={"postgres"},
        description=(
            "Who gets which step of which loop today: the loop's condition, minus suppressed, "
            "unreachable, frequency-capped and returned users, split into treatment and holdout, "
            "and at later steps the treated users withheld from that step (step_holdout)."
        ),
    )
    def reengagement_audience(
        context: dg.AssetExecutionContext, config: AudienceConfig, app_database: AppDatabase
    ):
        app_database.ensure_installed()
        settings = app_database.config
        try:
            loops = (
                settings.loops if config.loops is None else [settings.loop(n) for n in config.loops]
            )
        except ValueError as unknown:
            raise dg.Failure(description=f"config.loops: {unknown}", allow_retries=False) from None
        yield from day_by_day(context, lambda day: _audience_day(context, app_database, loops, day))

    return reengagement_audience


def _audience_day(
    context: dg.AssetExecutionContext, app_database: AppDatabase, loops: list[Loop], day: date
) -> DayResult:
    metadata: dict[str, object] = {LOOPS_METADATA: ",".join(loop.name for loop in loops)}
    candidates = {
        loop.name: condition_user_ids(app_database.engine, app_database.schema, loop, day)
        for loop in loops
    }
    # One transaction for the loops: they read the day's snapshot once, and a loop refused
    # leaves no other loop's audience of the day half made.
    try:
        with app_database.engine.begin() as connection:
            summaries = build_audiences(
                connection,
                config=app_database.config,
                loops=loops,
                day=day,
                candidates=candidates,
                now=datetime.now(UTC),
            )
    except DesignChangeRefused as refused:
        others = [loop.name for loop in loops if loop.name != refused.loop]
        raise dg.Failure(
            description=f"{refused}"
            + (
                f"; no audience of {day} was built for the other loops ({', '.join(others)}): "
                "the audience op's `loops` setting can leave the refused loop out"
                if others
                else ""
            ),
            allow_retries=False,
        ) from None
    total = 0
    for loop in loops:
        summary = summaries[loop.name]
        total += summary.treatment + summary.holdout + summary.withheld
        if app_database.config.sends_on_due_times(loop) and not summary.simulated:
            with app_database.engine.connect() as connection:
                metadata[f"{loop.name}/due_times"] = dg.MetadataValue.md(
                    due_preview(
                        connection, schema=app_database.schema, loop_name=loop.name, day=day
                    )
                )
        metadata.update(
            {
                f"{loop.name}/candidates": summary.candidates,
                f"{loop.name}/treatment": summary.treatment,
                f"{loop.name}/holdout": summary.holdout,
                f"{loop.name}/withheld": summary.withheld,
                f"{loop.name}/returned": summary.returned,
                f"{loop.name}/simulated": summary.simulated,
                **{f"{loop.name}/step_{step}": n for step, n in sorted(summary.by_step.items())},
                **{f"{loop.name}/excluded_{reason}": n for reason, n in summary.excluded.items()},
            }
        )
        context.log.info(
            f"{loop.name} {day}: {summary.candidates} users meet the condition; "
            f"{summary.treatment} to be emailed, {summary.holdout} held out, "
            f"{summary.withheld} withheld from a later step, "
            f"{summary.returned} came back; "
            + (
                "simulated: the day is older than the send window, so nobody will be emailed "
                "and it is no experiment; "
                if summary.simulated
                else ""
            )
            + "excluded: "
            + (", ".join(f"{n} {reason}" for reason, n in summary.excluded.items()) or "none")
        )
    metadata["dagster/row_count"] = total
    return DayResult(metadata=metadata)
