"""The morning's critical path: from the start of the daily run to the first email the stand-in
Resend accepts, step by step, as production runs it (the `daily_retention` job, the send sensor,
the first send run it asks for), on a database the main benchmark seeded.

Three loops, as a team runs them: the shipped re-engagement loop (its seed's query condition)
and two on built-in segments (`at_risk`, `dormant`), each with the shipped three steps (days 0, 3
and 7 of an episode), so their open episodes are due at every step. The episodes come from the
daily runs of the days before (`HISTORY_DAYS`), run the same way, and the recent ones' audiences
are sent as their mornings sent them, so the measured send run finds only its own day's audience
to claim (checked). The app's writes since the hourly drain are written once the history is
done, so the measured drain is the one that folds them.
The history is run once (`run_history`); the morning (`run_critical_path`) can then be run
again and again on copies of the database it left: a day's morning happens once, but its
copies can be measured side by side, and each statement of one logged or explained.
The daily run's steps the first email waits for (`PATH_STEPS`) run first, the others (the
rollup's reconciliation check, outcomes, performance: `BESIDE_STEPS`) once the first send run is
done, and are reported apart. In production they do not delay the first email but load the
machine beside it: the check runs beside the snapshot, segments and audience (the job's executor
starts it once the drain is done), outcomes and performance beside the send. Their load is not
in the path's figures here.
The sensor is evaluated the way the daemon evaluates it (its tick's wait, up to its
`minimum_interval_seconds`, is not counted), then the first send run it asks for is executed
against the stand-in Resend (a real HTTP server on a thread, unthrottled: the time to the first
batch is wanted, not the account's rate limit); the run goes on to its end.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

import dagster as dg
import yaml
from sqlalchemy import create_engine, text

from retention_pipeline.config import load_config
from retention_pipeline.defs import build_definitions
from retention_pipeline.resources.email import RESEND_KEY_ENV_VAR
from retention_pipeline_tests.email.fake_resend import serve_fake_resend
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT, write_config

HISTORY_DAYS = 10
API_KEY = "re_bench_critical_path"
# The steps of the daily run the first email waits for, by their Dagster step key, in order.
PATH_STEPS = {
    "retention__activity_rollup": "rollup drain",
    "retention__user_activity_snapshot": "snapshot",
    "retention__engagement_segments": "segments",
    "retention__reengagement_audience": "audience",
}
# Its steps nothing on that path waits for: the check runs beside the path's later steps,
# outcomes and performance beside the send (the sensor reads the audience's materialization as
# soon as it is stored, the run going on).
BESIDE_STEPS = {
    "retention__activity_rollup_reconciles_with_app_tables": "rollup reconciliation (check)",
    "retention__reengagement_outcomes": "outcomes",
    "retention__campaign_performance": "performance",
}
PATH_ASSETS = {dg.AssetKey(key.split("__")) for key in PATH_STEPS}
RECONCILIATION = dg.AssetCheckKey(
    dg.AssetKey(["retention", "activity_rollup"]), "reconciles_with_app_tables"
)
PARTS = (*PATH_STEPS.values(), "Dagster between steps", "sensor", "send run to first email")


def three_loops() -> list[dict]:
    """The shipped loop, and two more on built-in segments with its steps."""
    (shipped,) = copy.deepcopy(SHIPPED_DOCUMENT["loops"])
    loops = [shipped]
    for name, segment in (("at_risk_nudge", "at_risk"), ("dormant_winback", "dormant")):
        loop = copy.deepcopy(shipped)
        loop["name"] = name
        loop["opinion"] = f"Win back users in the {segment} segment"
        del loop["steps"][0]["condition"]
        loop["steps"][0]["condition"] = {"type": "segment", "segment": segment}
        loops.append(loop)
    return loops


def write_critical_path_config(directory: Path, url: str, start_date: str) -> Path:
    """The configuration of the critical path's runs: three loops, sent through Resend (the
    stand-in) without a rate limit, from `start_date` (YYYY-MM-DD) on."""
    directory.mkdir(parents=True, exist_ok=True)
    path = write_config(directory, url, email={"provider": "resend", "requests_per_second": 1000})
    document = yaml.safe_load(path.read_text())
    document["start_date"] = start_date
    document["loops"] = three_loops()
    for loop in document["loops"]:
        for step in loop["steps"]:
            step["action"]["provider"] = "resend"
    path.write_text(yaml.safe_dump(document))
    return path


def capture_half_an_hour(url: str, end: datetime) -> int:
    """The app's writes since the hourly drain (at :30) when the 09:00 run starts, as its capture
    sees them: a 48th of the last day's events and sessions, written again in the first half hour
    after `end` (the start of today). Returns how many rows the app wrote."""
    engine = create_engine(url)
    written = 0
    with engine.begin() as connection:
        for table, columns in (
            ("events", "user_id, name, properties"),
            ("sessions", "user_id, expires_at, ip_address, user_agent"),
        ):
            written += connection.execute(
                text(f"""
                    INSERT INTO {table} ({columns}, created_at)
                    SELECT {columns}, :end + (created_at - (:end - interval '1 day')) / 48
                    FROM {table}
                    WHERE created_at >= :end - interval '1 day' AND created_at < :end
                      AND id % 48 = 0"""),
                {"end": end},
            ).rowcount
    engine.dispose()
    return written


def history_step(label: str, url: str, config_path: Path, day: date, capture_end: datetime) -> dict:
    """A worker step (see `benchmarks.worker`): the daily runs of the `HISTORY_DAYS` days before
    `day` and the send runs they ask for, then the app's writes of the half hour after
    `capture_end` (the start of today) left waiting in the capture."""
    return {
        "label": label,
        "url": url,
        "config": str(config_path),
        "critical_path": {
            "day": day.isoformat(),
            "history_days": HISTORY_DAYS,
            "capture_end": capture_end.isoformat(),
        },
    }


def morning_step(label: str, url: str, config_path: Path, day: date) -> dict:
    """A worker step: the critical path of `day` on a database its `history_step` prepared."""
    return {
        "label": label,
        "url": url,
        "config": str(config_path),
        "critical_path": {"day": day.isoformat()},
    }


def run_history(
    config_path: str, history: Sequence[date], capture_end: datetime, instance: dg.DagsterInstance
) -> int:
    """Run the history's daily runs and the send runs their audiences ask for, then write the
    half hour of app activity (`capture_half_an_hour`); return how many rows the app wrote."""
    os.environ[RESEND_KEY_ENV_VAR] = API_KEY
    config = load_config(config_path)
    definitions = build_definitions(config)
    daily = definitions.resolve_job_def("daily_retention")
    with serve_fake_resend(api_key=API_KEY):
        for earlier in history:
            if not daily.execute_in_process(
                partition_key=earlier.isoformat(), instance=instance
            ).success:
                raise RuntimeError(f"the daily run of {earlier} failed")
        # The history's recent audiences are sent, as their own mornings sent them: the
        # measured send run then finds only its own day's audience to claim.
        for request in send_requests(definitions, instance):
            send(definitions, request, instance)
    return capture_half_an_hour(config.database.url, capture_end)


def send_requests(definitions: dg.Definitions, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    """The send sensor's run requests from no cursor: for every audience materialization
    `instance` has stored."""
    sensor = definitions.resolve_sensor_def("send_on_new_audience")
    context = dg.build_sensor_context(instance=instance, definitions=definitions)
    return [item for item in sensor(context) or [] if isinstance(item, dg.RunRequest)]


def send(
    definitions: dg.Definitions, request: dg.RunRequest, instance: dg.DagsterInstance
) -> dg.ExecuteInProcessResult:
    result = definitions.resolve_job_def(request.job_name).execute_in_process(
        partition_key=request.partition_key, instance=instance, tags=request.tags
    )
    if not result.success:
        raise RuntimeError(f"the send run {request.run_key} failed")
    return result


def run_critical_path(
    config_path: str, day: date, instance: dg.DagsterInstance
) -> dict[str, float]:
    """Time `day`'s morning on a database its history was run on (`run_history`), in an
    `instance` that has not seen that history (so the send sensor, from no cursor, asks only for
    the morning's send runs); return seconds per part of `PARTS` and of `BESIDE_STEPS`, with
    `total` (the daily run's start to the first accepted email), `emails` (the first send run's
    accepted emails), `send run` (its whole time) and `send runs asked`."""
    os.environ[RESEND_KEY_ENV_VAR] = API_KEY
    config = load_config(config_path)
    definitions = build_definitions(config)
    daily = definitions.resolve_job_def("daily_retention")

    with serve_fake_resend(api_key=API_KEY) as fake:
        # The daemon's run executes every step; the first email waits only for those of
        # `PATH_STEPS`, so they run first, and the rest once the first send run is done.
        path_run = daily.get_subset(
            asset_selection=PATH_ASSETS,
            asset_check_selection={
                key
                for key in definitions.resolve_asset_graph().asset_check_keys
                if key.asset_key in PATH_ASSETS
            }
            - {RECONCILIATION},
        )
        started = time.monotonic()
        started_at = datetime.now(UTC)
        result = path_run.execute_in_process(partition_key=day.isoformat(), instance=instance)
        path_seconds = time.monotonic() - started
        if not result.success:
            raise RuntimeError(f"the daily run of {day} failed")
        parts = dict.fromkeys((*PARTS, *BESIDE_STEPS.values()), 0.0)
        for stats in instance.get_run_step_stats(result.run_id):
            parts[PATH_STEPS[stats.step_key]] += stats.end_time - stats.start_time
        parts["Dagster between steps"] = path_seconds - sum(
            parts[name] for name in PATH_STEPS.values()
        )

        sensor_started = time.monotonic()
        requests = send_requests(definitions, instance)
        parts["sensor"] = time.monotonic() - sensor_started
        if not requests:
            raise RuntimeError(f"the sensor asked for no send run of {day}")
        send_started = time.monotonic()
        send(definitions, requests[0], instance)
        send_seconds = time.monotonic() - send_started
        accepted = [
            request
            for request in fake.requests
            if request.status == 200 and request.arrived_at >= send_started
        ]
        if not accepted:
            raise RuntimeError(f"the send run {requests[0].run_key} sent nothing")
        first_accepted = min(request.arrived_at for request in accepted)
        rest = daily.get_subset(
            asset_selection=set(daily.asset_layer.executable_asset_keys) - PATH_ASSETS,
            asset_check_selection={RECONCILIATION},
        ).execute_in_process(partition_key=day.isoformat(), instance=instance)
        if not rest.success:
            raise RuntimeError(f"the rest of the daily run of {day} failed")
        for stats in instance.get_run_step_stats(rest.run_id):
            parts[BESIDE_STEPS[stats.step_key]] += stats.end_time - stats.start_time
    other_days = emails_of_other_days(config.database.url, config.database.schema_, day, started_at)
    if other_days:
        raise RuntimeError(f"the measured send run also sent {other_days} emails of other days")
    parts["send run to first email"] = first_accepted - send_started
    return {
        **parts,
        "total": first_accepted - started,
        "send run": send_seconds,
        "emails": float(sum(len(request.emails) for request in accepted)),
        "send runs asked": float(len(requests)),
    }


def emails_of_other_days(url: str, schema: str, day: date, since: datetime) -> int:
    """Emails of audience days other than `day` first sent at `since` or later."""
    engine = create_engine(url)
    s = engine.dialect.identifier_preparer.quote_schema(schema)
    with engine.connect() as connection:
        count = connection.execute(
            text(f"""SELECT count(*) FROM {s}.email_send_log
                     WHERE partition_date <> :day AND first_attempt_at >= :since"""),
            {"day": day, "since": since},
        ).scalar_one()
    engine.dispose()
    return count
