"""Sharded sending: several send runs of one loop and day, each for the users its shard holds,
at once, in processes of their own, through one Dagster instance on PostgreSQL, against a local
stand-in for Resend that records when each request arrived."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml
from sqlalchemy import make_url, text

from retention_pipeline.config import parse_config
from retention_pipeline.defs import build_definitions
from retention_pipeline.defs.audience import AUDIENCE
from retention_pipeline.defs.partitions import daily_partitions
from retention_pipeline.defs.sending import build_send_job
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import ResendEmail
from retention_pipeline.sending import SenderBusy, sender_lock, treatment_rows
from retention_pipeline.sending.shards import Shard
from retention_pipeline_tests.email.fake_resend import FakeResend
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT, write_config
from retention_pipeline_tests.sending.support import (
    API_KEY,
    DAY,
    FROM,
    LOOP,
    SCHEMA,
    SendingDatabase,
    add_users,
    serving,
    statuses,
    users,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARDS = 4
REQUESTS_PER_SECOND = 2
"""Resend's default limit, which the send runs together must keep."""


def test_every_user_is_in_exactly_one_shard(sending_db: SendingDatabase) -> None:
    people = users(500)
    add_users(sending_db.engine, people)
    everyone = sorted(person.user_id for person in people)
    with sending_db.engine.connect() as connection:
        for count in range(1, 6):
            shards = [
                [
                    row["user_id"]
                    for row in treatment_rows(
                        connection,
                        schema=SCHEMA,
                        loop_name=LOOP,
                        day=DAY,
                        shard=Shard(index, count),
                    )
                ]
                for index in range(count)
            ]
            assert sorted(user for shard in shards for user in shard) == everyone
            # The hash spreads users evenly: no shard holds less than half its share.
            assert min(len(shard) for shard in shards) > len(people) / count / 2


def test_one_sender_per_shard_and_the_shards_apart(sending_db: SendingDatabase) -> None:
    def lock(holder: str, shard: Shard):
        return sender_lock(
            sending_db.engine, schema=SCHEMA, loop_name=LOOP, holder=holder, shard=shard
        )

    # Shard 0 and shard 1 send at once; a second sender of shard 1 stops, naming the first.
    with (
        lock("shard 0", Shard(0, 2)),
        lock("shard 1", Shard(1, 2)),
        pytest.raises(SenderBusy) as busy,
        lock("again", Shard(1, 2)),
    ):
        pass
    assert str(busy.value).startswith(
        f"loop {LOOP}, shard 1 of 2 (schema {SCHEMA}) is already being sent by 'shard 1' "
    )


@pytest.fixture
def dagster_home(create_database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The production instance (`deploy/dagster.yaml`) with its storage in a fresh PostgreSQL
    database, and the `resend` pool's limit set to the shard count as the README says."""
    instance = yaml.safe_load((PROJECT_ROOT / "deploy" / "dagster.yaml").read_text())
    url = make_url(create_database()).set(drivername="postgresql+psycopg2")
    instance["storage"] = {"postgres": {"postgres_url": url.render_as_string(hide_password=False)}}
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    subprocess.run(
        [sys.executable, "-m", "dagster", "instance", "concurrency", "set", "resend", str(SHARDS)],
        check=True,
        capture_output=True,
    )
    return home


def start_shard_run(config: Path, day: str, shard: int, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "retention_pipeline_tests.sending.dispatch_worker",
            "--shard-job",
            str(config),
            day,
            str(shard),
            str(SHARDS),
            str(REQUESTS_PER_SECOND),
        ],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


# How much later or earlier than its start a request may arrive on a busy shared machine. The
# strict figure (requests in any second at the stand-in server) is the benchmark's to measure
# (`python -m benchmarks run`); here four runs pacing apart would put about 8 in such a window.
ARRIVAL_JITTER_SECONDS = 0.15


def most_requests_within(arrivals: list[float], seconds: float) -> int:
    """The most requests that arrived within any `seconds` ([t, t + seconds))."""
    arrivals = sorted(arrivals)
    return max(
        sum(1 for later in arrivals[index:] if later < start + seconds)
        for index, start in enumerate(arrivals)
    )


def test_four_shard_runs_at_once_send_every_email_once_within_one_rate_limit(
    sending_db: SendingDatabase,
    dagster_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Enough users for several batches of 100 in each shard.
    day = datetime.now(UTC).date() - timedelta(days=1)
    people = users(1200)
    add_users(sending_db.engine, people, day=day)
    config = write_config(tmp_path, sending_db.url, email={"unsubscribe_secret": "s3cret"})
    fake = FakeResend()

    with serving(fake, monkeypatch):
        workers = [
            start_shard_run(config, day.isoformat(), shard, tmp_path / f"shard_{shard}.log")
            for shard in range(SHARDS)
        ]
        for worker in workers:  # each has loaded Dagster and the definitions
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:  # and now they start together
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outcomes = [json.loads(worker.communicate(timeout=300)[0]) for worker in workers]
    logs = "\n".join((tmp_path / f"shard_{shard}.log").read_text() for shard in range(SHARDS))
    assert [outcome["success"] for outcome in outcomes] == [True] * SHARDS, logs

    # Every treated user got one email, and the send log and the provider agree on which.
    delivered = Counter(address for email in fake.delivered for address in email["to"])
    assert sorted(delivered) == sorted(person.email for person in people)
    assert set(delivered.values()) == {1}
    assert statuses(sending_db.engine) == {"sent": len(people)}
    with sending_db.engine.connect() as connection:
        logged = connection.execute(
            text("SELECT email, send_shard, provider_id FROM retention.email_send_log")
        ).all()
    assert {row.provider_id for row in logged} == {email["id"] for email in fake.delivered}
    shard_of_address = {row.email: row.send_shard for row in logged}

    # Each shard sent its own batches, none mixing shards, and each sent while another did.
    requests = [request for request in fake.requests if request.status == 200]
    shard_of_request = []
    for request in requests:
        (shard,) = {shard_of_address[email["to"][0]] for email in request.emails}
        shard_of_request.append(shard)
    arrivals_by_shard: dict[int, list[float]] = {}
    for shard, request in zip(shard_of_request, requests, strict=True):
        arrivals_by_shard.setdefault(shard, []).append(request.arrived_at)
    assert sorted(arrivals_by_shard) == list(range(SHARDS))
    assert all(len(arrivals) >= 3 for arrivals in arrivals_by_shard.values())
    for shard, arrivals in arrivals_by_shard.items():
        assert any(
            min(arrivals) < other < max(arrivals)
            for other_shard, others in arrivals_by_shard.items()
            if other_shard != shard
            for other in others
        )

    # Together they kept one rate limit, as the stand-in for Resend saw it.
    arrivals = [request.arrived_at for request in fake.requests]
    busiest = most_requests_within(arrivals, 1.0 - ARRIVAL_JITTER_SECONDS)
    assert busiest <= REQUESTS_PER_SECOND, f"{busiest} requests within one second"

    # The runs were Dagster's, tagged for the queue's limit, in the pool the README's command
    # limited.
    with dg.DagsterInstance.get() as instance:
        runs = [instance.get_run_by_id(outcome["run_id"]) for outcome in outcomes]
        assert sorted(run.tags["retention/send_shard"] for run in runs) == [
            f"{LOOP}/{shard}" for shard in range(SHARDS)
        ]
        (pool,) = [limit for limit in instance.event_log_storage.get_pool_limits()]
        assert (pool.name, pool.limit) == ("resend", SHARDS)

        # A second run of a partition sends nothing.
        settings = sending_db.config
        send_job = build_send_job(settings.loop(LOOP), daily_partitions(settings), SHARDS)
        again = send_job.execute_in_process(
            partition_key=f"{day.isoformat()}|2",
            instance=instance,
            resources={
                "app_database": AppDatabase(config_path=str(config)),
                "email": ResendEmail(api_key=API_KEY, from_address=FROM),
            },
        )
    assert again.success
    assert len(fake.requests) == len(arrivals)


@pytest.fixture
def sharded_definitions() -> dg.Definitions:
    """The definitions of a configuration with a second loop and three shards."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    win_back = copy.deepcopy(document["loops"][0])
    win_back["name"] = "win_back"
    document["loops"].append(win_back)
    document["email"]["send_shards"] = 3
    return build_definitions(parse_config(document, environ={}))


def test_the_sensor_launches_a_run_per_shard_of_each_loop_picked(sharded_definitions) -> None:
    send_on_new_audience = sharded_definitions.resolve_sensor_def("send_on_new_audience")
    today = datetime.now(UTC).date()
    with dg.DagsterInstance.ephemeral() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=AUDIENCE,
                partition=today.isoformat(),
                metadata={"loops": "re_engagement,win_back"},
            )
        )
        context = dg.build_sensor_context(instance=instance)
        requests = [
            item for item in send_on_new_audience(context) if isinstance(item, dg.RunRequest)
        ]
    assert [(request.job_name, request.partition_key) for request in requests] == [
        (f"send_{loop}", f"{today.isoformat()}|{shard}")
        for loop in ("re_engagement", "win_back")
        for shard in range(3)
    ]
    assert len({request.run_key for request in requests}) == 6
