"""`check`'s preflight plans the statements a run executes, so it catches what the catalog does
not show: a table the pipeline's role may not read, a pipeline table gone missing."""

from __future__ import annotations

import copy

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from retention_pipeline.config import parse_config
from retention_pipeline.database import migrate
from retention_pipeline.database.connection import create_app_engine
from retention_pipeline.preflight import preflight
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT, login_role, make_config


def test_a_healthy_installation_plans_every_statement(app_database_url):
    config = make_config(app_database_url)
    engine = create_app_engine(app_database_url)
    with engine.begin() as connection:
        # Enums for event names and statuses, as Prisma schemas often have, are fine.
        connection.execute(text("CREATE TYPE event_kind AS ENUM ('signed_in', 'exported')"))
        connection.execute(text("ALTER TABLE events ALTER name TYPE event_kind USING NULL"))
        connection.execute(text("CREATE TYPE sub_status AS ENUM ('active', 'canceled')"))
        connection.execute(
            text("ALTER TABLE subscriptions ALTER status TYPE sub_status USING NULL")
        )
    install(engine, config)
    report = preflight(engine, config)
    engine.dispose()
    assert report.problems == []
    assert report.unchecked is None
    # 2 app reads, the snapshot, the segments' (the rules the loop reads, forgotten and
    # recorded, its classification, its counts), 19 audience (the experiment period's, the
    # question whether the suppression list holds hashes, and the emails of the day if it was
    # built again among them; its temporary tables are made, not planned), 2 outcome and 4
    # performance statements (the episodes, every one and first ones alike, the counts, the
    # revenue per currency, the variants per day), the condition query.
    assert report.planned == 46


def test_a_missing_pipeline_table_fails_the_audience_plan(app_database_url):
    config = make_config(app_database_url)
    engine = create_app_engine(app_database_url)
    install(engine, config)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE retention.email_suppressions RENAME TO gone"))
    report = preflight(engine, config)
    engine.dispose()
    assert report.problems == [
        "loops.re_engagement: the audience would fail: "
        'relation "retention.email_suppressions" does not exist'
    ]


def test_an_install_the_code_has_moved_past_is_what_every_run_would_stop_at(app_database_url):
    config = make_config(app_database_url)
    engine = create_app_engine(app_database_url)
    install(engine, config)
    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "-1")
        behind = migrate.current_revision(connection, "retention")
    report = preflight(engine, config)
    engine.dispose()
    assert report.problems == [
        f"database.schema: schema 'retention' is at revision {behind}, expected "
        f"{migrate.head_revision()}: run `retention-pipeline db upgrade`; until then the "
        "snapshot, segments, audience, outcomes and condition queries cannot be planned"
    ]
    assert report.unchecked is None


def test_a_table_the_role_may_not_read_is_one_line(app_database_url):
    config = make_config(app_database_url)
    owner = create_engine(app_database_url)
    install(owner, config)
    grants = [
        "GRANT USAGE ON SCHEMA retention TO {role}",
        "GRANT ALL ON ALL TABLES IN SCHEMA retention TO {role}",
        "GRANT SELECT ON users, events, sessions TO {role}",
    ]
    try:
        with login_role(owner, app_database_url, grants) as (role, reader):
            report = preflight(reader, make_config(app_database_url))
    finally:
        owner.dispose()
    assert report.problems == [
        # Every right on the pipeline's tables, but the daily tables' partitions and the
        # drain's functions are their owner's to make.
        f"database.schema: role {role} does not own table retention.classified_segments and "
        "4 more, which the runs alter (a day's partitions, the drain's capture functions) and "
        "only the owner may: run the pipeline as the role that ran `db upgrade`, or grant that "
        "role to this one",
        "database.tables.subscriptions: the snapshot's read would fail: "
        f"role {role} lacks SELECT on table public.subscriptions",
    ]


def test_the_demo_keeps_its_placeholders_and_its_own_secret_and_nothing_else_does(
    tmp_path, monkeypatch
):
    """What stops a send run (and `check`): nothing in the demo, whose database is the embedded
    server `dev` hands its Dagster processes; the same file on any other database, everything
    a real audience's emails need."""
    from retention_pipeline.config import load_config
    from retention_pipeline.config.loader import project_root
    from retention_pipeline.database import embedded
    from retention_pipeline.email.secrets import unsubscribe_secret
    from retention_pipeline.resources.email import email_resource, send_run_problems

    monkeypatch.setenv("RETENTION_HOME", str(tmp_path))
    monkeypatch.delenv("RESEND_API_KEY", raising=False)
    monkeypatch.delenv("RETENTION_UNSUBSCRIBE_SECRET", raising=False)
    shipped = project_root() / "retention.yaml"
    demo_url = embedded.sqlalchemy_url(
        f"postgresql://postgres:@/postgres?host={embedded.data_directory()}", "app"
    )
    monkeypatch.setenv("RETENTION_DATABASE_URL", demo_url)
    demo = load_config(shipped)
    assert send_run_problems(demo, email_resource(demo)) == []
    # A production secret left exported never signs the demo's links.
    monkeypatch.setenv("RETENTION_UNSUBSCRIBE_SECRET", "the-production-secret")
    demo_secret = unsubscribe_secret(load_config(shipped))
    assert demo_secret == (tmp_path / "unsubscribe_secret").read_text().strip()
    assert demo_secret != "the-production-secret"
    monkeypatch.delenv("RETENTION_UNSUBSCRIBE_SECRET")

    monkeypatch.setenv("RETENTION_DATABASE_URL", "postgresql://app@db.internal/app")
    production = load_config(shipped)
    problems = send_run_problems(production, email_resource(production))
    assert [problem.split(":")[0] for problem in problems] == [
        "email.from",
        "email.product_name",
        "email.app_url",
        "email.company_address",
        "email.unsubscribe_url",
        "email.unsubscribe_secret",
        "RESEND_API_KEY is not set",
    ]


def test_a_rollup_of_another_timezone_or_still_rebuilding_is_what_every_run_would_stop_at(
    app_database_url,
):
    config = make_config(app_database_url)
    engine = create_app_engine(app_database_url)
    install(engine, config)
    reports = []
    for change in (
        "UPDATE retention.tracking_state SET timezone = 'Europe/Berlin'",
        "UPDATE retention.tracking_state SET timezone = 'UTC', rebuild_pending = true",
    ):
        with engine.begin() as connection:
            connection.execute(text(change))
        reports.append(preflight(engine, config).problems)
    engine.dispose()
    assert config.timezone == "UTC"
    assert reports == [
        [
            "schema 'retention' buckets days in Europe/Berlin, the loops use UTC: "
            "run `retention-pipeline db upgrade`"
        ],
        [
            "the activity rollup is being rebuilt (0 of ? day ranges done): wait for the "
            "running `retention-pipeline db upgrade`, or run it again if it stopped"
        ],
    ]


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        (
            "SELECT user_id FROM public.events",
            "loops.re_engagement.success.query: returns no at column",
        ),
        (
            "DELETE FROM public.events RETURNING user_id, created_at AS at",
            "loops.re_engagement.success.query: the query must be a single SELECT (got DELETE)",
        ),
        (
            "SELECT user_id, created_at AS at FROM public.purchases",
            'loops.re_engagement.success.query: relation "public.purchases" does not exist',
        ),
    ],
)
def test_a_success_query_every_evaluation_would_fail_on_is_a_problem_line(
    app_database_url, query, problem
):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = app_database_url
    document["loops"][0]["success"] = {"type": "query", "query": query}
    config = parse_config(document, environ={})
    engine = create_app_engine(app_database_url)
    install(engine, config)
    report = preflight(engine, config)
    engine.dispose()
    (found,) = report.problems
    assert found.startswith(problem), found
