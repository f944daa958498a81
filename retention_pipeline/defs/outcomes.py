"""Measure and adjust: who came back after each assignment, and how each loop performs against
its holdout, with the decisions the next day's audience follows."""

from datetime import date

import dagster as dg
import pandas as pd
from sqlalchemy.exc import SQLAlchemyError

from retention_pipeline.config.models import LearnedSendTime, QuerySuccess
from retention_pipeline.database.maintenance import vacuum_audience_tables
from retention_pipeline.defs.audience import AUDIENCE
from retention_pipeline.defs.partitions import (
    DayResult,
    daily_backfill_policy,
    day_by_day,
)
from retention_pipeline.defs.retries import DAILY_ASSET_RETRIES
from retention_pipeline.defs.segments import SNAPSHOT
from retention_pipeline.defs.sending import SEND_LOG
from retention_pipeline.defs.tracking import ROLLUP
from retention_pipeline.outcomes.decisions import decide_day
from retention_pipeline.outcomes.evaluate import (
    evaluate_outcomes,
    evaluation_lag_days,
    success_days,
)
from retention_pipeline.outcomes.performance import (
    performance_frame,
    performance_metadata,
)
from retention_pipeline.outcomes.send_time import send_time_markdown, send_time_rows
from retention_pipeline.resources.app_database import AppDatabase

OUTCOMES = dg.AssetKey(["retention", "reengagement_outcomes"])
PERFORMANCE = dg.AssetKey(["retention", "campaign_performance"])


def build_outcome_assets(daily: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    """The outcomes and performance assets, on the definitions' daily partitions."""

    @dg.asset(
        key=OUTCOMES,
        partitions_def=daily,
        backfill_policy=daily_backfill_policy,
        retry_policy=DAILY_ASSET_RETRIES,
        # The snapshots give the subscription billed at the end of each window.
        deps=[AUDIENCE, SEND_LOG, ROLLUP, SNAPSHOT],
        group_name="retention",
        kinds={"postgres"},
        description=(
            "For every assignment, holdout and treatment, whether the user came back (the loop's "
            "success) within each window after it, as of the partition day; windows not over yet "
            "are pending. Each day re-evaluates every assignment whose windows were still open; "
            "then the episodes and assignments are vacuumed and analyzed for the next audience."
        ),
    )
    def reengagement_outcomes(context: dg.AssetExecutionContext, app_database: AppDatabase):
        app_database.ensure_installed()
        yield from day_by_day(context, lambda day: _outcomes_day(context, app_database, day))
        # Here, beside the send and off the morning's path to the first email, for tomorrow's
        # audience. Upkeep: the outcomes are stored by now, and autovacuum can still do it.
        try:
            not_owned = vacuum_audience_tables(app_database.engine, app_database.schema)
        except SQLAlchemyError as error:
            reason = str(getattr(error, "orig", None) or error).splitlines()[0]
            context.log.warning(f"episodes and reengagement_audience not vacuumed: {reason}")
        else:
            if not_owned:
                context.log.warning(
                    f"not vacuumed, owned by another role: {', '.join(not_owned)}; "
                    "tomorrow's audience reads them as autovacuum leaves them"
                )

    @dg.asset(
        key=PERFORMANCE,
        partitions_def=daily,
        backfill_policy=daily_backfill_policy,
        retry_policy=DAILY_ASSET_RETRIES,
        deps=[OUTCOMES],
        group_name="retention",
        kinds={"postgres"},
        description=(
            "Per loop (one row per episode, the headline), step and variant: assigned, emailed and "
            "returned in each arm, the lift over the control (the holdout; for a later step the "
            "users withheld from it) with its 95% interval, the billed revenue difference, a "
            "verdict per row; "
            "and the day's decisions (variant shares, paused steps), which the next day's audience "
            "follows unless the loop says adjust: false."
        ),
    )
    def campaign_performance(context: dg.AssetExecutionContext, app_database: AppDatabase):
        app_database.ensure_installed()
        yield from day_by_day(context, lambda day: _performance_day(context, app_database, day))

    return [reengagement_outcomes, campaign_performance]


def _outcomes_day(
    context: dg.AssetExecutionContext, app_database: AppDatabase, day: date
) -> DayResult:
    config = app_database.config
    metadata: dict[str, object] = {}
    total = 0
    for loop in config.loops:
        successes = None
        if isinstance(loop.success, QuerySuccess):
            successes = success_days(
                app_database.engine,
                app_database.schema,
                loop,
                loop.success,
                day,
                config.timezone,
                lag_days=evaluation_lag_days(config, loop),
            )
        with app_database.engine.begin() as connection:
            summary = evaluate_outcomes(
                connection, config=config, loop=loop, day=day, successes=successes
            )
        total += summary.assignments
        metadata[f"{loop.name}/assignments_evaluated"] = summary.assignments
        for window, statuses in summary.by_window.items():
            for status in ("returned", "not_returned", "pending"):
                metadata[f"{loop.name}/{window}d/{status}"] = statuses[status]
        context.log.info(
            f"{loop.name} {day}: {summary.assignments} assignment(s) with open windows "
            "evaluated; "
            + "; ".join(
                f"{window}d: {statuses['returned']} returned, {statuses['not_returned']} not, "
                f"{statuses['pending']} pending"
                for window, statuses in summary.by_window.items()
            )
        )
    metadata["dagster/row_count"] = total
    return DayResult(metadata=metadata)


def _performance_day(
    context: dg.AssetExecutionContext, app_database: AppDatabase, day: date
) -> DayResult:
    config = app_database.config
    metadata: dict[str, object] = {}
    tables, decision_lines = [], []
    for loop in config.loops:
        with app_database.engine.begin() as connection:
            rows, decisions = decide_day(connection, app_database.schema, loop, day)
            if loop.adjust:
                decision_lines += [f"- **{loop.name}** {decision}" for decision in decisions]
            else:
                decision_lines.append(f"- **{loop.name}**: adjust is off; nothing decided")
        metadata.update(performance_metadata(rows))
        tables.append(performance_frame(rows))
        if isinstance(loop.send_at, LearnedSendTime):
            with app_database.engine.connect() as connection:
                compared = send_time_rows(
                    connection, schema=app_database.schema, loop_name=loop.name, day=day
                )
            metadata[f"{loop.name}/send_time"] = dg.MetadataValue.md(send_time_markdown(compared))
        context.log.info(
            f"{loop.name} {day}: "
            + "; ".join(
                f"{row.scope} {row.window_days}d: {row.verdict}" for row in rows if row.step is None
            )
        )
    frame = pd.concat(tables, ignore_index=True)
    metadata["performance"] = dg.MetadataValue.md(
        frame.to_markdown(index=False) if len(frame) else "no assignments yet"
    )
    metadata["decisions"] = dg.MetadataValue.md("\n".join(decision_lines))
    metadata["dagster/row_count"] = len(frame)
    return DayResult(metadata=metadata)
