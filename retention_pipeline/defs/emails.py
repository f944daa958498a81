"""The daily audience, and the send job a sensor launches when a new audience lands."""

from datetime import UTC, date, datetime

import dagster as dg
from pydantic import Field

from retention_pipeline.audience.build import build_audience
from retention_pipeline.defs.partitions import CONFIG, daily_partitions, previous_day_of
from retention_pipeline.defs.segments import SEGMENTS
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import EmailResource, unsubscribe_secret
from retention_pipeline.segments.calendar import send_window, within_send_window
from retention_pipeline.segments.conditions import condition_user_ids
from retention_pipeline.sending.compose import compose_emails
from retention_pipeline.sending.dispatch import send_pending
from retention_pipeline.sending.send_log import claim, send_log_summary

AUDIENCE = dg.AssetKey(["retention", "reengagement_audience"])
SENSOR_BATCH = 100
SEND_LOG = dg.AssetKey(["retention", "email_send_log"])


@dg.asset(
    key=AUDIENCE,
    partitions_def=daily_partitions,
    # Episodes carry over from day to day: backfills run the days in order.
    deps=[
        SEGMENTS,
        previous_day_of(AUDIENCE),
    ],
    group_name="retention",
    kinds={"postgres"},
    description=(
        "Who gets which step of which loop today: the loop's condition, minus suppressed, "
        "unreachable, frequency-capped and returned users, split into treatment and holdout."
    ),
)
def reengagement_audience(context: dg.AssetExecutionContext, app_database: AppDatabase):
    app_database.ensure_installed()
    day = date.fromisoformat(context.partition_key)
    config = app_database.config
    metadata: dict[str, object] = {}
    total = 0
    for loop in config.loops:
        candidates = condition_user_ids(app_database.engine, app_database.schema, loop, day)
        with app_database.engine.begin() as connection:
            summary = build_audience(
                connection, config=config, loop=loop, day=day, candidates=candidates
            )
        total += summary.treatment + summary.holdout
        metadata.update(
            {
                f"{loop.name}/candidates": summary.candidates,
                f"{loop.name}/treatment": summary.treatment,
                f"{loop.name}/holdout": summary.holdout,
                f"{loop.name}/returned": summary.returned,
                **{f"{loop.name}/step_{step}": n for step, n in sorted(summary.by_step.items())},
                **{f"{loop.name}/excluded_{reason}": n for reason, n in summary.excluded.items()},
            }
        )
        context.log.info(f"{loop.name} {day}: {summary}")
    metadata["dagster/row_count"] = total
    return dg.MaterializeResult(metadata=metadata)


email_send_log = dg.AssetSpec(
    key=SEND_LOG,
    deps=[AUDIENCE],
    partitions_def=daily_partitions,
    group_name="retention",
    kinds={"postgres", "resend"},
    description=(
        "Every email claimed, sent or failed, one row per loop, user, episode and step: the "
        "exactly-once ledger. Materialized by the send_reengagement_emails job."
    ),
)


class SendConfig(dg.Config):
    loop: str = Field(description="the loop whose audience to send")
    partition_date: str = Field(description="the audience day, YYYY-MM-DD")


@dg.op(
    retry_policy=CONFIG.loops[0].recovery.retry_policy(),
    tags={"retention/kind": "send"},
)
def send_emails(
    context: dg.OpExecutionContext,
    config: SendConfig,
    app_database: AppDatabase,
    email: EmailResource,
):
    """Claim the day's treated audience in the send log, then send what is not yet confirmed.

    A retry (or a rerun after a crash) claims nothing twice and resends unconfirmed batches
    with their original Idempotency-Keys."""
    app_database.ensure_installed()
    settings = app_database.config
    loop = settings.loop(config.loop)
    day = date.fromisoformat(config.partition_date)
    secret = unsubscribe_secret(settings.email.unsubscribe_secret, email.provider)
    claimed = 0
    for audience_day in send_window(day):
        with app_database.engine.begin() as connection:
            emails = compose_emails(
                connection,
                schema=app_database.schema,
                config=settings,
                loop=loop,
                day=audience_day,
                unsubscribe_secret=secret,
                # Claimed emails keep their stored content: rendering them again is waste.
                unclaimed_only=True,
            )
            claimed += claim(
                connection,
                schema=app_database.schema,
                loop_name=loop.name,
                day=audience_day,
                emails=emails,
            )
    report = send_pending(
        app_database.engine,
        schema=app_database.schema,
        loop_name=loop.name,
        sender=email.sender(),
        provider=email.provider,
    )
    with app_database.engine.connect() as connection:
        ledger = send_log_summary(
            connection, schema=app_database.schema, loop_name=loop.name, day=day
        )
    context.log.info(f"{loop.name} {day}: claimed {claimed}; {report}")
    context.log_event(
        dg.AssetMaterialization(
            asset_key=SEND_LOG,
            partition=config.partition_date,
            metadata={
                "loop": loop.name,
                "provider": email.provider,
                "claimed_this_run": claimed,
                "sent_this_run": report.sent,
                "failed_this_run": report.failed,
                **{f"status/{status}": n for status, n in ledger.items()},
            },
        )
    )
    if report.still_pending:
        raise dg.Failure(
            description=f"{report.still_pending} emails of {loop.name} {day} are not confirmed "
            "yet (transient errors); a retry resends them with the same idempotency keys",
        )


@dg.job(
    name="send_reengagement_emails",
    description="Send one loop's emails for one audience day, exactly once.",
    tags={"retention/kind": "send"},
)
def send_reengagement_emails():
    send_emails()


@dg.sensor(
    job=send_reengagement_emails,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Every new audience partition of the last days launches one send run per loop; older "
        "partitions (backfills) are history and are not emailed."
    ),
)
def send_on_new_audience(context: dg.SensorEvaluationContext):
    after = int(context.cursor) if context.cursor else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=AUDIENCE, after_storage_id=after),
        limit=SENSOR_BATCH,
        ascending=True,
    ).records
    if not records:
        yield dg.SkipReason("no new reengagement_audience materialization")
        return
    now = datetime.now(UTC)
    for record in records:
        partition = record.partition_key
        if partition is None or not within_send_window(
            date.fromisoformat(partition), now, CONFIG.timezone
        ):
            context.log.info(f"audience {partition} is history: not emailed")
            continue
        for loop in CONFIG.loops:
            yield dg.RunRequest(
                run_key=f"{loop.name}:{partition}",
                run_config=dg.RunConfig(
                    ops={"send_emails": SendConfig(loop=loop.name, partition_date=partition)}
                ),
                tags={"retention/loop": loop.name, "retention/partition": partition},
            )
    context.update_cursor(str(records[-1].storage_id))
