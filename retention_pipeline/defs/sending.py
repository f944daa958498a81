"""The send log, and each loop's send job, which a sensor launches when a new audience lands."""

from datetime import UTC, date, datetime

import dagster as dg

from retention_pipeline.config.models import Loop, RetentionConfig
from retention_pipeline.defs.audience import AUDIENCE, loops_picked
from retention_pipeline.defs.retries import retry_policy
from retention_pipeline.email.secrets import unsubscribe_secret
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import EmailResource, send_run_problems
from retention_pipeline.segments.calendar import day_just_ended, within_send_window
from retention_pipeline.sending.pace import SharedPace
from retention_pipeline.sending.run import Markdown, send_loop_day
from retention_pipeline.sending.sender_lock import SenderBusy, SenderLockLost
from retention_pipeline.sending.shards import Shard

SENSOR_BATCH = 100
LOOP_TAG = "retention/loop"
SEND_SHARD_TAG = "retention/send_shard"
SEND_HOUR_TAG = "retention/send_hour"
HOURLY_CRON = "0 * * * *"
SEND_POOL = "resend"
SEND_LOG = dg.AssetKey(["retention", "email_send_log"])


def send_log_spec(daily: dg.PartitionsDefinition) -> dg.AssetSpec:
    """The send log, on the definitions' daily partitions."""
    return dg.AssetSpec(
        key=SEND_LOG,
        deps=[AUDIENCE],
        partitions_def=daily,
        group_name="retention",
        kinds={"postgres", "resend"},
        description=(
            "Every email claimed, sent or failed, one row per loop, user, episode and step: the "
            "exactly-once ledger, with each email's last delivery event from Resend. Materialized "
            "by each loop's send job (send_LOOP), which also reports the last 7 days again with "
            "the emails delivered, bounced, complained, opened and clicked so far (opens are "
            "inflated by mail privacy proxies: not a success measure)."
        ),
    )


def send_partitions(daily: dg.PartitionsDefinition, shards: int) -> dg.MultiPartitionsDefinition:
    """A send job's partitions: each audience day times each shard, keys like `2026-11-27|0`."""
    return dg.MultiPartitionsDefinition(
        {
            "day": daily,
            "shard": dg.StaticPartitionsDefinition([str(index) for index in range(shards)]),
        }
    )


def send_partition_key(day: str, shard: int) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"day": day, "shard": str(shard)})


def _day_and_shard(context: dg.OpExecutionContext) -> tuple[date, Shard]:
    """The run's audience day and shard; the shard count is the job's, so the shards of one
    job always cover every user."""
    partitions = context.job_def.partitions_def
    assert isinstance(partitions, dg.MultiPartitionsDefinition)
    keys = partitions.get_partition_key_from_str(context.partition_key).keys_by_dimension
    count = len(partitions.get_partitions_def_for_dimension("shard").get_partition_keys())
    return date.fromisoformat(keys["day"]), Shard(int(keys["shard"]), count)


@dg.op(tags={"retention/kind": "send"}, pool=SEND_POOL)
def send_emails(
    context: dg.OpExecutionContext,
    app_database: AppDatabase,
    email: EmailResource,
):
    """Claim the treated audience of the run's day and shard for the job's loop in the send log,
    then send what of the shard is not yet confirmed (`send_loop_day`), and report each changed
    day of the send log."""
    app_database.ensure_installed()
    settings = app_database.config
    # The job's own tag, not the run's: a tag edited at launch cannot point a job at another loop.
    loop = settings.loop(context.job_def.tags[LOOP_TAG])
    day, shard = _day_and_shard(context)
    # Whatever `check` would report stops the run here, before anything is claimed.
    problems = send_run_problems(settings, email)
    if problems:
        raise dg.Failure(description="; ".join(problems), allow_retries=False)
    secret = unsubscribe_secret(settings)

    # Every shard's run, and every loop's, paces its requests on one shared schedule.
    def shared_pace(requests_per_second: float) -> SharedPace:
        return SharedPace(
            app_database.engine,
            schema=settings.database.schema_,
            provider=email.provider,
            requests_per_second=requests_per_second,
        )

    sender = email.sender(log=context.log, shared_pace=shared_pace)
    try:
        report = send_loop_day(
            app_database.engine,
            config=settings,
            loop=loop,
            day=day,
            now=datetime.now(UTC),
            sender=sender,
            provider=email.provider,
            unsubscribe_secret=secret,
            holder=f"retention sender {loop.name}/{shard.index} run {context.run_id[:8]}",
            log=context.log,
            shard=shard,
            # A step process whose run worker was killed (the run FAILURE, its retry queued)
            # must not keep sending: it stops before its next batch.
            keep_going=lambda: (
                context.instance.get_run_by_id(context.run_id).status == dg.DagsterRunStatus.STARTED
            ),
        )
    except (SenderBusy, SenderLockLost) as busy:
        raise dg.Failure(description=str(busy)) from None
    context.log.info(str(report))
    for reported_day in report.days_reported:
        context.log_event(
            dg.AssetMaterialization(
                asset_key=SEND_LOG,
                partition=reported_day.isoformat(),
                metadata={
                    "provider": email.provider,
                    **{
                        name: dg.MetadataValue.md(value) if isinstance(value, Markdown) else value
                        for name, value in report.metadata_for(reported_day).items()
                    },
                },
            )
        )
    if report.dispatch.still_pending:
        raise dg.Failure(
            description=f"{report.dispatch.still_pending} emails of {loop.name} ({shard}) are "
            "not confirmed yet (transient errors); a retry resends them with the same "
            "idempotency keys",
        )


def send_job_name(loop_name: str) -> str:
    return f"send_{loop_name}"


def build_send_job(loop: Loop, daily: dg.PartitionsDefinition, shards: int) -> dg.JobDefinition:
    """The loop's own send job, partitioned by audience day and shard. Its loop tag is on every
    run, however launched (sensor, Launchpad, re-execution), and every run launched for a
    partition also carries `retention/send_shard` = LOOP/SHARD, so the queue's
    one-run-per-loop-and-shard limit applies; its step retries as the loop's `recovery` says."""

    partitions = send_partitions(daily, shards)

    def shard_tag(partition_key: str) -> dict[str, str]:
        keys = partitions.get_partition_key_from_str(partition_key).keys_by_dimension
        return {SEND_SHARD_TAG: f"{loop.name}/{keys['shard']}"}

    @dg.job(
        name=send_job_name(loop.name),
        description=(f"{loop.opinion.rstrip('.')}. " if loop.opinion else "")
        + f"Send the {loop.name} loop's emails for one audience day and shard, exactly once.",
        tags={"retention/kind": "send", LOOP_TAG: loop.name},
        config=dg.PartitionedConfig(
            partitions_def=partitions,
            run_config_for_partition_key_fn=lambda _key: {},
            tags_for_partition_key_fn=shard_tag,
        ),
    )
    def send_loop_emails():
        send_emails.with_retry_policy(retry_policy(loop.recovery))()

    return send_loop_emails


def build_send_jobs(
    config: RetentionConfig, daily: dg.PartitionsDefinition
) -> list[dg.JobDefinition]:
    """Every loop's send job, each with the configured number of shards."""
    return [build_send_job(loop, daily, config.email.send_shards) for loop in config.loops]


def build_send_sensor(
    config: RetentionConfig, send_jobs: list[dg.JobDefinition]
) -> dg.SensorDefinition:
    """The sensor that launches the loops' send runs for each new audience of the last days."""

    @dg.sensor(
        jobs=send_jobs,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=(
            "Every new materialization of an audience partition of the last days launches, per "
            "loop it picked, one send run per shard; older partitions (backfills) are history and "
            "are not emailed."
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
                date.fromisoformat(partition), now, config.timezone
            ):
                context.log.info(f"audience {partition} is history: not emailed")
                continue
            for loop_name in loops_picked(record.asset_materialization, config):
                if loop_name not in config.loop_names:
                    # Renamed or removed since: a request for its job would fail the tick, and
                    # every tick after it, for every loop.
                    context.log.warning(
                        f"audience {partition} picked loop {loop_name}, which is no longer "
                        "configured: not sent"
                    )
                    continue
                for shard in range(config.email.send_shards):
                    yield dg.RunRequest(
                        job_name=send_job_name(loop_name),
                        # One run per materialization and shard, not per day: a re-materialized
                        # audience may hold new users, and the send log's claims keep a second run
                        # from sending twice.
                        run_key=f"{loop_name}:{partition}:{shard}:{record.storage_id}",
                        partition_key=send_partition_key(partition, shard),
                    )
        context.update_cursor(str(records[-1].storage_id))

    return send_on_new_audience


def hourly_send_schedule_name(loop_name: str) -> str:
    return f"send_{loop_name}_hourly"


def build_hourly_send_schedules(
    config: RetentionConfig, send_jobs: list[dg.JobDefinition]
) -> list[dg.ScheduleDefinition]:
    """Per loop whose members have due times of their own (`send_at: {local_time}`, or quiet
    hours), a schedule at the top of every hour (UTC: every timezone's hour, the ones 30 or 45
    minutes off included, starts within it) that launches one run of the loop's send job per
    shard: each claims and sends the members due since its shard's previous claim. A missed
    hour is not launched late: the next hour's run claims what it would have."""
    jobs = {job.name: job for job in send_jobs}
    return [
        _hourly_send_schedule(config, loop, jobs[send_job_name(loop.name)])
        for loop in config.loops
        if config.sends_on_due_times(loop)
    ]


def _hourly_send_schedule(
    config: RetentionConfig, loop: Loop, job: dg.JobDefinition
) -> dg.ScheduleDefinition:
    shards = config.email.send_shards

    @dg.schedule(
        name=hourly_send_schedule_name(loop.name),
        job=job,
        cron_schedule=HOURLY_CRON,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Every hour, send the {loop.name} loop's emails now due in each reader's "
        "own timezone, one run per shard.",
    )
    def send_due_hourly(context: dg.ScheduleEvaluationContext):
        hour = context.scheduled_execution_time.astimezone(UTC)
        day = day_just_ended(hour, config.timezone).isoformat()
        for shard in range(shards):
            yield dg.RunRequest(
                run_key=f"{hour:%Y-%m-%dT%H}:{shard}",
                partition_key=send_partition_key(day, shard),
                tags={SEND_HOUR_TAG: f"{hour:%Y-%m-%dT%H:00Z}"},
            )

    return send_due_hourly
