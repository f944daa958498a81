"""A send in a process of its own, for the crash tests to kill.

    python -m retention_pipeline_tests.sending.dispatch_worker DATABASE_URL
    python -m retention_pipeline_tests.sending.dispatch_worker --job CONFIG_PATH DAY
    python -m retention_pipeline_tests.sending.dispatch_worker \
        --shard-job CONFIG_PATH DAY SHARD SHARDS REQUESTS_PER_SECOND
    python -m retention_pipeline_tests.sending.dispatch_worker --due CONFIG_PATH DAY NOW

The first sends the pending batches of the test loop with `send_pending` and prints the
`DispatchReport`'s counts as JSON. The second runs the loop's Dagster send job
for DAY in process, as a run worker would, and prints whether the run succeeded. The third
builds the loop's send job with SHARDS shards, prints `ready`, waits for a line on stdin, then
runs the partition DAY|SHARD on the Dagster instance of $DAGSTER_HOME and prints whether it
succeeded, so a test can start several at the same moment. The fourth runs `send_loop_day` of
the test loop, whose configuration (a YAML document) sends at a local time, as the hourly send
at NOW (ISO 8601), and prints its claims. All send through the Resend SDK at $RESEND_API_URL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import resend
from sqlalchemy import create_engine

from retention_pipeline.email.resend_sender import ResendSender
from retention_pipeline.sending import send_pending
from retention_pipeline_tests.sending.support import API_KEY, FROM, LOOP, SCHEMA


def dispatch(url: str) -> None:
    engine = create_engine(url)
    sender = ResendSender(API_KEY, FROM, requests_per_second=1000)
    report = send_pending(
        engine,
        schema=SCHEMA,
        loop_name=LOOP,
        loops_configured=[LOOP],
        sender=sender,
        provider="resend",
    )
    counts = {name: value for name, value in dataclasses.asdict(report).items() if name != "by_day"}
    print(json.dumps(counts), flush=True)


def run_job(config_path: str, day: str) -> None:
    from retention_pipeline.defs import build_definitions
    from retention_pipeline.defs.sending import send_job_name, send_partition_key
    from retention_pipeline.resources.app_database import AppDatabase
    from retention_pipeline.resources.email import ResendEmail

    app_database = AppDatabase(config_path=config_path)
    send_job = build_definitions(app_database.config).resolve_job_def(send_job_name(LOOP))
    result = send_job.execute_in_process(
        partition_key=send_partition_key(day, 0),
        resources={
            "app_database": app_database,
            "email": ResendEmail(api_key=API_KEY, from_address=FROM, requests_per_second=1000),
        },
        raise_on_error=False,
    )
    print(json.dumps({"success": result.success}), flush=True)


def run_shard_job(
    config_path: str, day: str, shard: int, shards: int, requests_per_second: float
) -> None:
    import dagster as dg

    from retention_pipeline.defs.partitions import daily_partitions
    from retention_pipeline.defs.sending import build_send_job, send_partition_key
    from retention_pipeline.resources.app_database import AppDatabase
    from retention_pipeline.resources.email import ResendEmail

    app_database = AppDatabase(config_path=config_path)
    config = app_database.config
    send_job = build_send_job(config.loop(LOOP), daily_partitions(config), shards)
    resources = {
        "app_database": app_database,
        "email": ResendEmail(
            api_key=API_KEY, from_address=FROM, requests_per_second=requests_per_second
        ),
    }
    with dg.DagsterInstance.get() as instance:
        print("ready", flush=True)
        sys.stdin.readline()
        result = send_job.execute_in_process(
            partition_key=send_partition_key(day, shard),
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
    print(json.dumps({"success": result.success, "run_id": result.run_id}), flush=True)


def send_due(config_path: str, day: str, now: str) -> None:
    from datetime import date, datetime
    from pathlib import Path

    import yaml

    from retention_pipeline.config import parse_config
    from retention_pipeline.sending import send_loop_day
    from retention_pipeline_tests.sending.support import SECRET

    config = parse_config(yaml.safe_load(Path(config_path).read_text()), environ={})
    report = send_loop_day(
        create_engine(config.database.url),
        config=config,
        loop=config.loop(LOOP),
        day=date.fromisoformat(day),
        now=datetime.fromisoformat(now),
        sender=ResendSender(API_KEY, FROM, requests_per_second=1000),
        provider="resend",
        unsubscribe_secret=SECRET,
        holder="hourly worker",
    )
    print(json.dumps({"claimed": report.due.claimed.total() if report.due else None}), flush=True)


def main(argv: list[str]) -> None:
    resend.api_url = os.environ["RESEND_API_URL"]
    if argv[0] == "--job":
        run_job(argv[1], argv[2])
    elif argv[0] == "--due":
        send_due(argv[1], argv[2], argv[3])
    elif argv[0] == "--shard-job":
        run_shard_job(argv[1], argv[2], int(argv[3]), int(argv[4]), float(argv[5]))
    else:
        dispatch(argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
