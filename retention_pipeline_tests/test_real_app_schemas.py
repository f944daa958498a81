"""Four public apps' real schemas (apps/<app>/schema.sql), with histories written the way each app
writes, mapped by examples/<app>/retention.yaml alone: `check`, `db upgrade`, live writes
captured after install, the drain, the daily run for the run day, checked user by user."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import ModuleType

import dagster as dg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.cli import main
from retention_pipeline.config.loader import load_config, project_root
from retention_pipeline.defs.audience import AUDIENCE
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import OutboxEmail
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline.tracking.status import reconcile_last_day
from retention_pipeline_tests.apps.cohorts import HISTORY_DAYS, visits_on
from retention_pipeline_tests.helpers import shipped_asset, shipped_job, write_config

EXAMPLES = project_root() / "examples"
APPS = {  # fixture module: example folder
    "nestjs_boilerplate": "nestjs-boilerplate",
    "documenso": "documenso",
    "supabase_stripe_sync": "supabase-stripe-sync",
    "calcom": "calcom",
}
DAILY = [shipped_asset(SNAPSHOT), shipped_asset(SEGMENTS), shipped_asset(AUDIENCE)]


def history_of(app: str) -> ModuleType:
    return importlib.import_module(f"retention_pipeline_tests.apps.{app}.history")


@pytest.fixture
def app_database(postgres_server_url: str) -> Iterator[Callable[[str], str]]:
    """A factory of fresh databases named after the app (h5_<app>_...), dropped afterwards."""
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def factory(app: str) -> str:
        name = f"h5_{app}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(postgres_server_url).set(database=name).render_as_string(False)

    yield factory
    with admin.connect() as connection:
        for name in created:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run_day():
    return datetime.now(UTC).date() - timedelta(days=1)


def load_until_the_day_before(url: str, history: ModuleType, day, live_days: int = 1) -> None:
    """The app's history up to `live_days` days before `day`: what the app holds at install."""
    engine = create_engine(url)
    with engine.begin() as connection:
        history.create(connection)
        history.load(connection, day, first_offset=HISTORY_DAYS - 1, last_offset=live_days)
    engine.dispose()


def rows(url: str, sql: str, **params) -> list:
    engine = create_engine(url)
    with engine.connect() as connection:
        result = connection.execute(text(sql), params).all()
    engine.dispose()
    return result


def visits_in_the_last_week(app: str, user) -> int:
    """The visits the fixture made in the run day's 7-day window: each burst of writes is one;
    cal.com's readers leave only `lastActiveAt`, which the app moves once a day."""
    per_day = [visits_on(user, offset) for offset in range(7)]
    if app == "calcom" and user.cohort == "reader":
        return sum(1 for visits in per_day if visits)
    return sum(per_day)


@pytest.mark.parametrize("app", list(APPS))
def test_each_example_maps_its_app_and_the_daily_run_is_right_user_by_user(
    app, app_database, tmp_path: Path, monkeypatch, capsys
):
    url = app_database(app)
    history = history_of(app)
    day = run_day()
    example = EXAMPLES / APPS[app] / "retention.yaml"
    monkeypatch.setenv("RETENTION_DATABASE_URL", url)
    monkeypatch.setenv("RETENTION_UNSUBSCRIBE_SECRET", "unsubscribe-secret-for-tests")
    monkeypatch.setenv("RESEND_API_KEY", "re_test_key")
    monkeypatch.setenv("RETENTION_START_DATE", str(day - timedelta(days=7)))
    # Installed a week before the run day: what the app updates in place (a session's refresh
    # time, a last-seen column) is captured from then on, and the run day's 7-day figures
    # count every visit (before install, such a column holds only its latest value).
    load_until_the_day_before(url, history, day, live_days=7)

    assert main(["--config", str(example), "check"]) == 0
    assert main(["--config", str(example), "db", "upgrade"]) == 0
    engine = create_engine(url)
    with engine.begin() as connection:  # the last week, live: the triggers see it
        history.load(connection, day, first_offset=6, last_offset=0)
    config = load_config(str(example))
    update_rollup(engine, config)
    with engine.connect() as connection:
        reconciled = reconcile_last_day(connection, config)
    engine.dispose()
    # Every source, whatever its capture, counted at least the run day's rows the app holds.
    assert reconciled.day == day and reconciled.matches, reconciled
    sources = {spec.name for spec in config.database.activity_sources()}
    assert set(reconciled.counted_rows_by_source) == sources
    assert sum(reconciled.app_rows_by_source.values()) > 0

    capsys.readouterr()
    assert main(["--config", str(example), "check"]) == 0  # installed: every plan checked
    checked = capsys.readouterr().out
    assert "not checked" not in checked, checked
    for spec in config.database.activity_sources():
        assert f"source `{spec.name}` (" in checked, (spec.name, checked)

    resources = {
        "app_database": AppDatabase(config_path=str(example)),
        "email": OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@example.com"),
    }
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            DAILY, partition_key=day.isoformat(), instance=instance, resources=resources
        ).success
        assert (
            shipped_job("send_re_engagement")
            .execute_in_process(
                partition_key=f"{day.isoformat()}|0", instance=instance, resources=resources
            )
            .success
        )

    segments = dict(
        ((user_id, (segment, reason)))
        for user_id, segment, reason in rows(
            url,
            "SELECT user_id, segment, reason FROM retention.engagement_segments "
            "WHERE partition_date = :day",
            day=day,
        )
    )
    audience = {row[0] for row in rows(url, "SELECT user_id FROM retention.reengagement_audience")}
    sent = {row[0] for row in rows(url, "SELECT user_id FROM retention.email_send_log")}
    snapshot = {
        user_id: (name, visits, events, [action["name"] for action in last_actions])
        for user_id, name, visits, events, last_actions in rows(
            url,
            "SELECT user_id, name, sessions_7d, events_7d, last_actions "
            "FROM retention.user_activity_snapshot WHERE partition_date = :day",
            day=day,
        )
    }
    for user in history.USERS:
        user_id = history.user_id(user)
        if user.exclusion:
            assert user_id not in audience, (user.cohort, user_id)
            assert user_id not in sent, (user.cohort, user_id)
            continue
        segment, reason = segments[user_id]
        if user.cohort == "dropped":
            assert segment == "dormant", (user_id, segment, reason)
            assert "visits" in reason, reason
        elif user.cohort == "quiet":
            assert segment == "dormant", (user_id, segment, reason)
        else:  # readers too: their sign-ins and refreshes alone show their use
            assert segment == "active", (user.cohort, user_id, segment, reason)
        name, visits, events, actions = snapshot[user_id]
        assert name == user.full_name
        # Every source counted, inserted or updated in place, and none twice.
        assert visits == visits_in_the_last_week(app, user), (user.cohort, user_id)
        assert (events > 0) == (user.cohort != "reader" and visits > 0), (user.cohort, user_id)
        if app == "nestjs_boilerplate" and history.creates_projects(user):
            assert actions == ["project.created"], (user_id, actions)  # the second table
    assert audience & sent  # the treated part of the audience was emailed


def snapshot_of_the_day_before(
    app: str, app_database, monkeypatch, tmp_path: Path
) -> tuple[ModuleType, str, date]:
    """The app's history up to the run day, installed by its example, and the run day's
    snapshot materialized by Dagster: the history module, the database URL and the day."""
    url = app_database(app)
    history = history_of(app)
    day = run_day()
    example = EXAMPLES / APPS[app] / "retention.yaml"
    monkeypatch.setenv("RETENTION_DATABASE_URL", url)
    monkeypatch.setenv("RETENTION_UNSUBSCRIBE_SECRET", "unsubscribe-secret-for-tests")
    monkeypatch.setenv("RETENTION_START_DATE", str(day - timedelta(days=7)))
    load_until_the_day_before(url, history, day)
    assert main(["--config", str(example), "db", "upgrade"]) == 0
    resources = {
        "app_database": AppDatabase(config_path=str(example)),
        "email": OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@example.com"),
    }
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            DAILY[:1], partition_key=day.isoformat(), instance=instance, resources=resources
        ).success
    return history, url, day


def test_subscription_figures_of_the_supabase_stripe_mirror(app_database, monkeypatch, tmp_path):
    app = "supabase_stripe_sync"
    history, url, day = snapshot_of_the_day_before(app, app_database, monkeypatch, tmp_path)
    figures = {
        user_id: (status, cents)
        for user_id, status, cents in rows(
            url,
            "SELECT user_id, subscription_status, monthly_amount_cents "
            "FROM retention.user_activity_snapshot WHERE partition_date = :day",
            day=day,
        )
    }
    for user in history.USERS[: history.CUSTOMERS]:
        amount, interval = history.PRICES[history.price_of(user)]
        monthly = amount * history.quantity_of(user) // (12 if interval == "year" else 1)
        status = history.SUBSCRIPTION_STATUS[user.index % 5]
        assert figures[history.user_id(user)] == (status, monthly), user.index
    for user in history.USERS[history.CUSTOMERS :]:
        if not user.exclusion:
            assert figures[history.user_id(user)] == (None, None)


# Each app's expected (status, plan) of a user, by the fixture's own billing of their team.
DOCUMENSO_STATUS = {"ACTIVE": "active", "PAST_DUE": "past_due", "INACTIVE": "canceled"}
CALCOM_STATUS = {"paid": "active", "pending": "incomplete", "free": None}


def _team_billing(app: str, history: ModuleType, user) -> tuple[str | None, str | None]:
    if app == "documenso":
        number = history.team_organisation(user)
        if number is None:
            return None, None
        return DOCUMENSO_STATUS[history.SUBSCRIPTION_STATUS[number % 4]], "price_teams_monthly"
    number = history.team_of(user)
    if number is None:
        return None, None
    return CALCOM_STATUS[history.TEAM_BILLING[number % 4]], None  # cal.com stores no plan


@pytest.mark.parametrize("app", ["documenso", "calcom"])
def test_a_team_subscription_reaches_each_member_with_no_amount_stored(
    app, app_database, monkeypatch, tmp_path
):
    """documenso bills an organisation, cal.com a team (only those whose checkout began), and
    neither stores an amount: every member gets the team's status, no made-up revenue."""
    history, url, day = snapshot_of_the_day_before(app, app_database, monkeypatch, tmp_path)
    figures = {
        user_id: (status, plan, cents)
        for user_id, status, plan, cents in rows(
            url,
            "SELECT user_id, subscription_status, subscription_plan, monthly_amount_cents "
            "FROM retention.user_activity_snapshot WHERE partition_date = :day",
            day=day,
        )
    }
    billed = 0
    for user in history.USERS:
        if user.exclusion:
            continue
        status, plan = _team_billing(app, history, user)
        expected = (status, plan if status else None, None)
        assert figures[history.user_id(user)] == expected, (user.index, expected)
        billed += status is not None
    assert billed >= 60  # most of the first 100 users are in a billed team


def test_the_shorthand_mapping_of_nestjs_boilerplate_reproduces_the_issue(
    app_database, tmp_path: Path
):
    """What issue 16 measured on main's code with the shorthand alone (`events` on the generated
    comment table, `sessions` on the session table's creation time): no user has a session
    baseline, so the drop rule cannot fire, and soft-deleted users reach the audience."""
    app = "nestjs_boilerplate"
    url = app_database(app)
    history = history_of(app)
    day = run_day()
    load_until_the_day_before(url, history, day)
    engine = create_engine(url)
    with engine.begin() as connection:  # what main needed: a stub, as the app bills nothing
        connection.exec_driver_sql(
            "CREATE VIEW subscriptions AS SELECT NULL::integer AS user_id, NULL::text AS status, "
            "NULL::text AS plan, NULL::integer AS amount_cents, NULL::text AS billing_interval, "
            "NULL::text AS currency, NULL::timestamp AS updated_at WHERE false"
        )
    tables = {
        "users": {
            "table": "user",
            "columns": {
                "id": "id",
                "email": "email",
                "name": "firstName",
                "created_at": "createdAt",
            },
        },
        "events": {
            "table": "comment",
            "columns": {"user_id": "authorId", "name": "body", "created_at": "createdAt"},
        },
        "sessions": {
            "table": "session",
            "columns": {"user_id": "userId", "created_at": "createdAt"},
        },
    }
    path = write_config(tmp_path, url, tables=tables)
    config = load_config(str(path))
    install(engine, config)
    with engine.begin() as connection:
        history.load(connection, day, first_offset=0, last_offset=0)
    update_rollup(engine, config)
    engine.dispose()
    resources = {
        "app_database": AppDatabase(config_path=str(path)),
        "email": OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@example.com"),
    }
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            DAILY, partition_key=day.isoformat(), instance=instance, resources=resources
        ).success

    (with_baseline,) = rows(
        url,
        "SELECT count(*) FILTER (WHERE baseline_sessions_per_week >= 3) "
        "FROM retention.user_activity_snapshot WHERE partition_date = :day",
        day=day,
    )
    assert with_baseline == (0,)
    dropped = {history.user_id(user) for user in history.USERS if user.cohort == "dropped"}
    dormant_dropped = rows(
        url,
        "SELECT user_id FROM retention.engagement_segments "
        "WHERE partition_date = :day AND segment = 'dormant' AND user_id = ANY(:users)",
        day=day,
        users=sorted(dropped),
    )
    assert dormant_dropped == []  # their use fell by 90%: invisible to a session count
    soft_deleted = {
        history.user_id(user) for user in history.USERS if user.exclusion == "soft_deleted"
    }
    audience = {row[0] for row in rows(url, "SELECT user_id FROM retention.reengagement_audience")}
    assert soft_deleted & audience  # the issue's "soft-deleted users in the audience"
    assert (
        rows(url, "SELECT count(*) FROM retention.user_activity_snapshot WHERE name = 'Ada'")[0][0]
        > 0
    )  # a first name only: the shorthand cannot build "Ada Lovelace"
