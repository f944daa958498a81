"""The whole morning on demo data: the daily run builds the audience, the sensor launches the
send job, the outbox holds one readable email per treated user, and nothing is sent twice."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.dependency import NodeHandle
from sqlalchemy import text

from retention_pipeline.config import parse_config
from retention_pipeline.defs.audience import AUDIENCE, loops_picked
from retention_pipeline.defs.partitions import daily_partitions
from retention_pipeline.defs.schedules import build_daily_schedules, daily_retention_job
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.defs.sending import build_send_job
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import OutboxEmail
from retention_pipeline.segments.calendar import SEND_WINDOW_DAYS
from retention_pipeline_tests.helpers import (
    SHIPPED_CONFIG,
    SHIPPED_DOCUMENT,
    demo_until_yesterday,
    shipped_asset,
    shipped_definitions,
    shipped_job,
    shipped_sensor,
    treated,
    write_config,
)

user_activity_snapshot = shipped_asset(SNAPSHOT)
engagement_segments = shipped_asset(SEGMENTS)
reengagement_audience = shipped_asset(AUDIENCE)
# the shipped configuration has one loop
send_re_engagement = shipped_job("send_re_engagement")
send_on_new_audience = shipped_sensor("send_on_new_audience")


@pytest.fixture
def morning(create_database, tmp_path: Path):
    url = create_database()
    engine, day = demo_until_yesterday(url)
    resources = {
        "app_database": AppDatabase(config_path=str(write_config(tmp_path, url))),
        "email": OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@acme.test"),
    }
    with dg.instance_for_test() as instance:
        yield engine, instance, resources, day.isoformat(), tmp_path / "outbox"
    engine.dispose()


def test_the_daily_run_the_sensor_and_the_send_job(morning):
    engine, instance, resources, day, outbox = morning
    daily = dg.materialize(
        [user_activity_snapshot, engagement_segments, reengagement_audience],
        partition_key=day,
        instance=instance,
        resources=resources,
    )
    assert daily.success
    users = treated(engine, day)
    assert users

    context = dg.build_sensor_context(instance=instance)
    requests = list(send_on_new_audience(context))
    (request,) = requests
    assert request.run_key.startswith(f"re_engagement:{day}:0:")
    assert request.partition_key == f"{day}|0"
    sent = send_re_engagement.execute_in_process(
        partition_key=request.partition_key, instance=instance, resources=resources
    )
    assert sent.success
    files = sorted(outbox.glob("*.html"))
    assert len(files) == len(users)
    with engine.connect() as connection:
        statuses = dict(
            connection.execute(
                text("SELECT status, count(*) FROM retention.email_send_log GROUP BY status")
            ).all()
        )
    assert statuses == {"sent": len(users)}
    (materialization,) = [
        event.event_specific_data.materialization
        for event in sent.all_events
        if event.event_type_value == "ASSET_MATERIALIZATION"
    ]
    assert materialization.asset_key == dg.AssetKey(["retention", "email_send_log"])
    assert materialization.partition == day
    assert materialization.metadata["sent_this_run"].value == len(users)

    # A second run for the same day sends nothing, and the sensor asks for no new run.
    again = send_re_engagement.execute_in_process(
        partition_key=request.partition_key, instance=instance, resources=resources
    )
    assert again.success
    assert len(sorted(outbox.glob("*.html"))) == len(users)
    with engine.connect() as connection:
        assert connection.execute(
            text("SELECT count(*) FROM retention.email_send_log")
        ).scalar() == len(users)
    later = dg.build_sensor_context(instance=instance, cursor=context.cursor)
    assert [item for item in send_on_new_audience(later) if isinstance(item, dg.RunRequest)] == []

    # Re-materializing the day's audience keeps the emailed users: nothing new to claim.
    assert dg.materialize(
        [reengagement_audience], partition_key=day, instance=instance, resources=resources
    ).success
    third = send_re_engagement.execute_in_process(
        partition_key=request.partition_key, instance=instance, resources=resources
    )
    assert third.success
    assert len(sorted(outbox.glob("*.html"))) == len(users)


def test_preview_renders_one_users_email_to_a_file(morning, tmp_path, capsys, monkeypatch):
    from retention_pipeline.cli import main

    engine, instance, resources, day, _outbox = morning
    assert dg.materialize(
        [user_activity_snapshot], partition_key=day, instance=instance, resources=resources
    ).success
    with engine.connect() as connection:
        user_id, name = connection.execute(
            text(
                "SELECT user_id, name FROM retention.user_activity_snapshot "
                "WHERE name IS NOT NULL AND last_activity_at IS NOT NULL ORDER BY user_id LIMIT 1"
            )
        ).one()
    config = resources["app_database"].config_path
    out = tmp_path / "preview.html"
    assert (
        main(
            [
                "--config",
                config,
                "preview",
                "--template",
                "re_engagement_last_call",
                "--user",
                user_id,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert f"as of {day}" in capsys.readouterr().out
    html = out.read_text()
    assert name.split()[0] in html and "unsubscribe" in html.lower()

    assert (
        main(
            ["--config", config, "preview", "--template", "re_engagement", "--user", "no-such-user"]
        )
        == 2
    )
    assert capsys.readouterr().err == (
        f"error: --user: no user 'no-such-user' in the snapshot of {day}\n"
    )
    # Without a secret to sign links with, the preview is refused in one line naming it.
    url = resources["app_database"].config.database.url
    (tmp_path / "unsigned").mkdir()
    unsigned = str(write_config(tmp_path / "unsigned", url, email={"unsubscribe_secret": ""}))
    assert (
        main(["--config", unsigned, "preview", "--template", "re_engagement", "--user", user_id])
        == 2
    )
    assert capsys.readouterr().err == (
        "error: email.unsubscribe_secret: required to sign and check unsubscribe links "
        "(set $RETENTION_UNSUBSCRIBE_SECRET)\n"
    )

    assert main(["--config", config, "suppress", "Bounced@Example.com", "--reason", "bounced"]) == 0
    assert main(["--config", config, "suppress", "bounced@example.com"]) == 0
    assert "(already suppressed)" in capsys.readouterr().out
    with engine.connect() as connection:
        assert connection.execute(
            text("SELECT email, reason FROM retention.email_suppressions")
        ).all() == [("bounced@example.com", "bounced")]


def test_the_sensor_launches_every_recent_day_once_and_skips_history(morning):
    _engine, instance, resources, day, _outbox = morning
    yesterday = date.fromisoformat(day)
    days = [yesterday - timedelta(days=back) for back in (5, 1, 0)]
    for each in days:  # in order, as a backfill would: a week-old day, then the last two
        assert dg.materialize(
            [user_activity_snapshot, engagement_segments, reengagement_audience],
            partition_key=each.isoformat(),
            instance=instance,
            resources=resources,
        ).success
    context = dg.build_sensor_context(instance=instance)
    requests = [item for item in send_on_new_audience(context) if isinstance(item, dg.RunRequest)]
    assert [request.partition_key for request in requests] == [
        f"{each.isoformat()}|0" for each in days[1:]
    ]
    # Nothing new since: the next tick launches nothing.
    later = dg.build_sensor_context(instance=instance, cursor=context.cursor)
    assert [item for item in send_on_new_audience(later) if isinstance(item, dg.RunRequest)] == []


def audience_landed(instance: dg.DagsterInstance, day: date, loops: str | None = None) -> None:
    """An audience of `day` materialized, picking `loops` (its metadata), or reported without it
    (every loop)."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=AUDIENCE,
            partition=day.isoformat(),
            metadata={} if loops is None else {"loops": loops},
        )
    )


def run_requests(context: dg.SensorEvaluationContext) -> list[dg.RunRequest]:
    return [item for item in send_on_new_audience(context) if isinstance(item, dg.RunRequest)]


def test_a_re_materialized_recent_day_is_sent_again_and_history_is_not():
    today = datetime.now(ZoneInfo(SHIPPED_CONFIG.timezone)).date()
    with dg.DagsterInstance.ephemeral() as instance:
        audience_landed(instance, today - timedelta(days=1))
        first = dg.build_sensor_context(instance=instance)
        (sent_first,) = run_requests(first)

        # The day is re-materialized (users were added): a new run, not the one already made.
        audience_landed(instance, today - timedelta(days=1))
        audience_landed(instance, today - timedelta(days=SEND_WINDOW_DAYS))
        second = dg.build_sensor_context(instance=instance, cursor=first.cursor)
        (sent_again,) = run_requests(second)

        # Both re-materializations of one day in a single tick: one run each.
        audience_landed(instance, today)
        audience_landed(instance, today)
        third = dg.build_sensor_context(instance=instance, cursor=second.cursor)
        both = run_requests(third)

    assert sent_again.partition_key == sent_first.partition_key
    assert sent_again.run_key != sent_first.run_key
    assert [request.partition_key for request in both] == [f"{today.isoformat()}|0"] * 2
    assert len({request.run_key for request in [sent_first, sent_again, *both]}) == 4


def project_resources(tmp_path: Path, url: str, **email: str):
    """The resources the project's definitions choose for this email configuration."""
    from retention_pipeline.config.loader import load_config
    from retention_pipeline.defs.resource_bindings import resource_bindings

    directory = tmp_path / "config"
    directory.mkdir(exist_ok=True)
    return resource_bindings(load_config(write_config(directory, url, email=email)))


def test_without_a_resend_key_a_send_run_fails_before_claiming_and_the_outbox_is_a_choice(
    morning, monkeypatch, tmp_path, capsys
):
    from retention_pipeline.cli import main

    engine, instance, resources, day, _outbox = morning
    url = resources["app_database"].config.database.url
    monkeypatch.delenv("RESEND_API_KEY", raising=False)
    daily = dg.materialize(
        [user_activity_snapshot, engagement_segments, reengagement_audience],
        partition_key=day,
        instance=instance,
        resources=resources,
    )
    assert daily.success
    partition = f"{day}|0"

    chosen = project_resources(tmp_path, url, provider="resend", unsubscribe_secret="s")
    failed = send_re_engagement.execute_in_process(
        partition_key=partition,
        instance=instance,
        resources=chosen,
        raise_on_error=False,
    )
    assert not failed.success
    (failure,) = [event for event in failed.all_events if event.event_type_value == "STEP_FAILURE"]
    assert failure.step_failure_data.user_failure_data.description == (
        "RESEND_API_KEY is not set: email.provider is resend, so no email can be sent (set it, "
        "or choose email.provider: outbox to write emails to files instead)"
    )
    with engine.connect() as connection:
        assert (
            connection.execute(text("SELECT count(*) FROM retention.email_send_log")).scalar() == 0
        )
    # `check` reports the same line.
    config = str(tmp_path / "config" / "retention.yaml")
    capsys.readouterr()
    assert main(["--config", config, "check"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {failure.step_failure_data.user_failure_data.description}\n"
    )

    # Choosing the outbox writes the emails there; the key stays unset.
    chosen = project_resources(tmp_path, url, provider="outbox")
    sent = send_re_engagement.execute_in_process(
        partition_key=partition, instance=instance, resources=chosen
    )
    assert sent.success
    written = list((tmp_path / "config" / "outbox").glob("*.html"))
    assert len(written) == len(treated(engine, day)) > 0

    # The run's event log tells the progress in words, a line per batch, and no Python repr.
    messages = [entry.user_message for entry in instance.all_logs(sent.run_id)]
    assert any(message.startswith("re_engagement batch 1 of ") for message in messages)
    assert any(message.startswith(f"re_engagement {day}: claimed ") for message in messages)
    assert not [m for m in messages if "Report(" in m or "Summary(" in m]
    audience_logs = [entry.user_message for entry in instance.all_logs(daily.run_id)]
    assert any("users meet the condition" in m for m in audience_logs)
    assert not [m for m in audience_logs if "Report(" in m or "Summary(" in m]


def test_the_demo_database_that_dev_hands_dagster_still_means_the_outbox(tmp_path, monkeypatch):
    """`retention-pipeline dev` gives its Dagster processes the embedded server's URL; their
    send runs must still write to the outbox, not look for a Resend key."""
    from retention_pipeline.config import load_config
    from retention_pipeline.database import embedded
    from retention_pipeline.defs.resource_bindings import resource_bindings
    from retention_pipeline.resources.email import email_provider

    monkeypatch.setenv("RETENTION_HOME", str(tmp_path))
    monkeypatch.delenv("RESEND_API_KEY", raising=False)
    shipped_provider = {"provider": "resend"}
    monkeypatch.setenv("RETENTION_CONFIG", str(write_config(tmp_path, "", email=shipped_provider)))
    demo_url = embedded.sqlalchemy_url(
        f"postgresql://postgres:@/postgres?host={embedded.data_directory()}", "app"
    )
    monkeypatch.setenv("RETENTION_DATABASE_URL", demo_url)
    assert email_provider(load_config()) == "outbox"
    assert isinstance(resource_bindings(load_config())["email"], OutboxEmail)
    # Any other server is the user's own: its emails go through Resend.
    monkeypatch.setenv(
        "RETENTION_DATABASE_URL", "postgresql+psycopg://postgres@/app?host=/elsewhere/pgdata"
    )
    assert email_provider(load_config()) == "resend"


def two_loop_document() -> dict:
    """The shipped loop at 09:00, and a second loop, `win_back`, at 15:00 with its own retries."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    win_back = copy.deepcopy(document["loops"][0])
    win_back["name"] = "win_back"
    win_back["steps"][0]["trigger"]["cron"] = "0 15 * * *"
    win_back["steps"][0]["condition"] = {"type": "segment", "segment": "dormant"}
    win_back["recovery"] = {"retries": 1, "backoff": "none", "delay": "10s"}
    document["loops"].append(win_back)
    for loop in document["loops"]:  # its steps follow whichever email.provider a test gives
        for step in loop["steps"]:
            del step["action"]["provider"]
    return document


def test_each_loop_runs_at_its_own_cron_and_sends_with_its_own_job(morning, tmp_path):
    engine, instance, resources, day, _outbox = morning
    document = two_loop_document()
    config = parse_config(document, environ={})

    schedules = {s.name: s for s in build_daily_schedules(config, daily_retention_job)}
    assert {name: s.cron_schedule for name, s in schedules.items()} == {
        "daily_retention_re_engagement": "0 9 * * *",
        "daily_retention_win_back": "0 15 * * *",
    }
    tick = datetime.combine(date.fromisoformat(day) + timedelta(days=1), time(15), UTC)
    request = schedules["daily_retention_win_back"](
        dg.build_schedule_context(scheduled_execution_time=tick)
    )
    assert request.partition_key == day

    # The 15:00 run picks the win_back audience only; the 09:00 run's picks stay as they were.
    (tmp_path / "two").mkdir()
    path = write_config(tmp_path / "two", resources["app_database"].config.database.url)
    path.write_text(
        yaml.safe_dump({**yaml.safe_load(path.read_text()), "loops": document["loops"]})
    )
    two_loops = {**resources, "app_database": AppDatabase(config_path=str(path))}
    result = dg.materialize(
        [user_activity_snapshot, engagement_segments, reengagement_audience],
        partition_key=day,
        instance=instance,
        resources=two_loops,
        run_config=request.run_config,
    )
    assert result.success
    with engine.connect() as connection:
        picked = connection.execute(
            text(
                "SELECT DISTINCT loop_name FROM retention.reengagement_audience "
                "WHERE partition_date = :day"
            ),
            {"day": day},
        ).scalars()
        assert list(picked) == ["win_back"]
    (materialization,) = result.asset_materializations_for_node("retention__reengagement_audience")
    assert materialization.metadata["loops"].value == "win_back"
    assert materialization.metadata["win_back/treatment"].value > 0
    assert loops_picked(materialization, config) == ["win_back"]

    # Each loop sends through its own job, tagged with the loop on every run, retrying as the
    # loop's recovery says.
    loop = config.loop("win_back")
    job = build_send_job(loop, daily_partitions(config), shards=1)
    assert job.name == "send_win_back"
    assert job.run_tags["retention/loop"] == "win_back"
    policy = job.get_retry_policy_for_handle(NodeHandle("send_emails", None))
    assert (policy.max_retries, policy.delay, policy.backoff) == (1, 10, None)
    shipped = send_re_engagement.get_retry_policy_for_handle(NodeHandle("send_emails", None))
    assert (shipped.max_retries, shipped.backoff) == (3, dg.Backoff.EXPONENTIAL)


def test_loops_due_at_the_same_time_share_one_daily_run_on_the_days_both_fire():
    """A daily loop and a Monday loop at 09:00: two schedules would build Monday's snapshot
    twice at once; one schedule picks the loops due that day."""
    document = two_loop_document()
    document["loops"][1]["steps"][0]["trigger"]["cron"] = "0 9 * * 1"
    config = parse_config(document, environ={})

    (schedule,) = build_daily_schedules(config, daily_retention_job)
    assert schedule.name == "daily_retention_schedule"
    assert list(schedule.cron_schedule) == ["0 9 * * *", "0 9 * * 1"]
    picked = {}
    for day in (date(2026, 12, 7), date(2026, 12, 8)):  # a Monday, a Tuesday
        tick = datetime.combine(day, time(9), ZoneInfo(config.timezone))
        request = schedule(dg.build_schedule_context(scheduled_execution_time=tick))
        picked[day.strftime("%A")] = request.run_config["ops"]["retention__reengagement_audience"][
            "config"
        ]["loops"]
    assert picked == {"Monday": ["re_engagement", "win_back"], "Tuesday": ["re_engagement"]}


def test_a_send_run_launched_by_partition_alone_carries_its_loop_and_shard_tags(morning):
    _engine, instance, resources, day, _outbox = morning
    run = send_re_engagement.execute_in_process(
        partition_key=f"{day}|0", instance=instance, resources=resources
    )
    assert run.success
    tags = instance.get_run_by_id(run.run_id).tags
    assert tags["retention/loop"] == "re_engagement"
    assert tags["retention/send_shard"] == "re_engagement/0"


def test_an_audience_of_a_loop_no_longer_configured_does_not_stop_the_others():
    """A loop renamed or removed while its audience waited for the sensor: a request for its
    job would fail the tick, and every later tick on the same record, for every loop."""
    yesterday = datetime.now(ZoneInfo(SHIPPED_CONFIG.timezone)).date() - timedelta(days=1)
    with dg.DagsterInstance.ephemeral() as instance:
        audience_landed(instance, yesterday, loops="old_name,re_engagement")
        context = dg.build_sensor_context(instance=instance, definitions=shipped_definitions())
        tick = send_on_new_audience.evaluate_tick(context)
    (request,) = tick.run_requests
    assert request.job_name == "send_re_engagement"
    assert tick.cursor is not None


def test_the_sensor_sends_the_loops_an_audience_picked_through_their_jobs():
    today = datetime.now(ZoneInfo(SHIPPED_CONFIG.timezone)).date()
    with dg.DagsterInstance.ephemeral() as instance:
        audience_landed(instance, today, loops="")
        audience_landed(instance, today, loops="re_engagement")
        (request,) = run_requests(dg.build_sensor_context(instance=instance))
    assert request.job_name == "send_re_engagement"
    assert request.partition_key == f"{today.isoformat()}|0"
