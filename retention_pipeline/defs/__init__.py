"""The wiring of the pipeline's packages into Dagster: one builder per concern, each given the
configuration the definitions loaded (`build_definitions`); none reads it or the database."""

import dagster as dg

from retention_pipeline.config import RetentionConfig
from retention_pipeline.defs.app_tables import (
    SUBSCRIPTIONS,
    USERS,
    app_table_specs,
    reading_app_tables,
    source_key,
)
from retention_pipeline.defs.audience import build_audience_asset
from retention_pipeline.defs.outcomes import build_outcome_assets
from retention_pipeline.defs.partitions import daily_partitions
from retention_pipeline.defs.resource_bindings import resource_bindings
from retention_pipeline.defs.schedules import build_daily_schedules, daily_retention_job
from retention_pipeline.defs.segments import SNAPSHOT, build_segment_assets
from retention_pipeline.defs.sending import (
    build_hourly_send_schedules,
    build_send_jobs,
    build_send_sensor,
    send_log_spec,
)
from retention_pipeline.defs.tracking import (
    ROLLUP,
    activity_rollup,
    drain_activity_job,
    drain_activity_schedule,
    rollup_reconciles_with_app_tables,
)


def build_definitions(config: RetentionConfig) -> dg.Definitions:
    """Every asset, job, schedule, sensor and resource of one loaded configuration."""
    daily = daily_partitions(config)
    send_jobs = build_send_jobs(config, daily)
    sources = [source_key(source.name) for source in config.database.activity_sources()]
    billing = [SUBSCRIPTIONS] if config.database.tables.subscriptions is not None else []
    snapshot, *segments = build_segment_assets(daily)
    return dg.Definitions(
        assets=[
            *app_table_specs(config),
            reading_app_tables(activity_rollup, ROLLUP, [*sources, USERS]),
            reading_app_tables(snapshot, SNAPSHOT, [USERS, *billing]),
            *segments,
            build_audience_asset(daily),
            send_log_spec(daily),
            *build_outcome_assets(daily),
        ],
        asset_checks=[rollup_reconciles_with_app_tables],
        jobs=[drain_activity_job, daily_retention_job, *send_jobs],
        schedules=[
            drain_activity_schedule,
            *build_daily_schedules(config, daily_retention_job),
            *build_hourly_send_schedules(config, send_jobs),
        ],
        sensors=[build_send_sensor(config, send_jobs)],
        resources=resource_bindings(config),
    )
