"""`retention-pipeline`: the product's command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from retention_pipeline.config.loader import (
    CONFIG_ENV_VAR,
    DATABASE_URL_ENV_VAR,
    ConfigError,
    default_config_path,
    load_config,
    project_root,
)
from retention_pipeline.database.app_tables import MappingError
from retention_pipeline.database.privileges import permission_problem
from retention_pipeline.tracking.state import TrackingError

DEV_INSTANCE_YAML = """\
# Written by `retention-pipeline dev` on every start: a local instance (SQLite storage under this
# folder). Production uses the project's deploy/dagster.yaml instead; see the README.
# Run retries only for crashed workers: a failing step retries as its loop's `recovery` says.
run_retries:
  enabled: true
  max_retries: 3
  retry_on_asset_or_op_failure: false
# A run whose worker died fails (or, if terminated, ends canceled) instead of blocking its loop,
# and a minute after a run ends its `resend` pool slot is freed should its process not have.
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_runtime_seconds: 10800
  max_resume_run_attempts: 0
  poll_interval_seconds: 60
  free_slots_after_run_end_seconds: 60
telemetry:
  enabled: false
"""

# Warnings a user of `dev` can do nothing about: `dagster dev` calls itself superseded by
# `dg dev`, Dagster passes a beta parameter to the sensors it builds, and the daily assets' single-
# run backfill policy is a beta parameter. (PYTHONWARNINGS entries match the message's start.)
DAGSTER_INTERNAL_WARNINGS = (
    "ignore:Function `dev_command` is superseded",
    "ignore:Parameter `owners` of initializer `SensorDefinition.__init__` is currently in beta",
    "ignore:Parameter `backfill_policy` of function `asset` is currently in beta",
)


def _engine(config):
    from retention_pipeline.database.connection import create_app_engine, resolve_database_url

    return create_app_engine(resolve_database_url(config), config.database.statement_timeout)


def cmd_suppress(args: argparse.Namespace) -> int:
    from retention_pipeline.recipients.addresses import normalize_address
    from retention_pipeline.recipients.suppressions import suppress

    address = normalize_address(args.email)
    config = load_config(args.config)
    with _engine(config).begin() as connection:
        _require_installed(connection, config)
        added = suppress(
            connection,
            schema=config.database.schema_,
            email=args.email,
            reason=args.reason,
            source="cli",
        )
    print(f"{address}: {args.reason}" + ("" if added else " (already suppressed)"))
    return 0


def _require_installed(connection, config) -> None:
    from retention_pipeline.database.migrate import installation_problem

    problem = installation_problem(connection, config.database.schema_)
    if problem:
        raise ValueError(problem)


def cmd_report(args: argparse.Namespace) -> int:
    from retention_pipeline.audience.experiment import period_loop, periods
    from retention_pipeline.outcomes.decisions import decisions_in_force
    from retention_pipeline.outcomes.performance import (
        performance_frame,
        performance_rows,
        simulated_assignments,
    )

    config = load_config(args.config)
    loops = [config.loop(args.loop)] if args.loop else config.loops
    schema = config.database.schema_
    with _engine(config).connect() as connection:
        _require_installed(connection, config)
        for loop in loops:
            recorded = periods(connection, schema, loop.name)
            period = recorded[-1] if recorded else None
            if args.period is not None:
                period = next((p for p in recorded if p.number == args.period), None)
                if period is None:
                    raise ValueError(
                        f"--period: {loop.name} has no period {args.period} "
                        f"(it has {len(recorded) or 'none yet'})"
                    )
            measured = loop if period is None else period_loop(loop, period)
            number = 1 if period is None else period.number
            rows = performance_rows(connection, schema, measured, since=args.since, period=number)
            since = f" since {args.since}" if args.since else ""
            simulated = simulated_assignments(connection, schema, loop, since=args.since)
            not_counted = (
                f"{simulated} simulated assignments (days built when no email could go out, "
                "as in a backfill) are not counted\n"
                if simulated
                else ""
            )
            if not rows:
                print(f"{loop.name}: no assignments{since} yet\n{not_counted}")
                continue
            print(f"{loop.name}: outcomes of the assignments{since}")
            for first_episodes in (False, True):
                headline = next(
                    (
                        row
                        for row in rows
                        if row.step is None and row.first_episodes == first_episodes
                    ),
                    None,
                )
                if headline is not None:
                    print(
                        f"the {headline.scope}, within {headline.window_days} days: "
                        f"{headline.verdict} "
                        f"({headline.treatment.finished} treated and "
                        f"{headline.holdout.finished} held-out episodes known)"
                    )
            if period is not None:
                others = "" if len(recorded) == 1 else f" of {len(recorded)}: see --period"
                print(f"experiment {period}{others}")
            print(performance_frame(rows).drop(columns="loop").to_string(index=False))
            decisions = decisions_in_force(connection, schema, measured, date.max, number)
            if not loop.adjust:
                print("adjust: false; variants share traffic evenly, no step is paused")
            # Decided while the loop adjusted, or measured since: the audience follows none.
            unapplied = "" if loop.adjust else " (not applied: adjust: false)"
            for decision in decisions.values():
                print(f"decided {decision.decided_on}{unapplied}: {decision}")
            print(not_counted)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from retention_pipeline.database.connection import create_app_engine
    from retention_pipeline.preflight import preflight
    from retention_pipeline.resources.email import email_resource, send_run_problems

    config = load_config(args.config)
    engine = _engine(config)
    read_url = config.database.read_url
    read_engine = (
        create_app_engine(read_url, config.database.statement_timeout, "database.read_url")
        if read_url
        else None
    )
    try:
        report = preflight(engine, config, read_engine)
        start_date_problem = _start_date_problem(engine, config)
    finally:
        engine.dispose()
        if read_engine is not None:
            read_engine.dispose()
    # The send op asks the same question of the same sender before it claims anything.
    problems = [
        *report.problems,
        *filter(None, [start_date_problem]),
        *send_run_problems(config, email_resource(config)),
    ]
    assets = 0
    if start_date_problem is None:
        import dagster as dg

        from retention_pipeline.defs import build_definitions

        defs = build_definitions(config)
        dg.Definitions.validate_loadable(defs)
        assets = len(defs.resolve_asset_graph().get_all_asset_keys())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    for line in report.sources:
        print(line)
    if report.unchecked:
        print(f"not checked: {report.unchecked}")
    for line in report.exclusions:
        print(line)
    if problems:
        return 2
    print(
        f"ok: {len(config.loops)} loop(s); the app tables match the mapping; "
        f"{report.planned} statement(s) of a daily run planned; "
        f"the Dagster definitions ({assets} assets) load"
    )
    return 0


def _start_date_problem(engine, config) -> str | None:
    """Why the definitions would not load for want of start_date (with the line to add), or
    None when the partitions have their first day."""
    from retention_pipeline.defs.partitions import START_DATE_ENV_VAR, start_date_missing
    from retention_pipeline.tracking.state import first_data_day

    if config.start_date or os.environ.get(START_DATE_ENV_VAR):
        return None
    with engine.connect() as connection:
        return start_date_missing(first_data_day(connection, config.database.schema_))


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from retention_pipeline.tracking.install import install

    config = load_config(args.config)
    report = install(
        _engine(config),
        config,
        progress=lambda line: print(line, flush=True),
        rebuild_history=args.rebuild_history,
        second_install=args.second_install,
    )
    for line in report.sources:
        print(line)
    print(
        f"schema {config.database.schema_} at revision {report.revision}; tracking: {report.mode} "
        f"({report.timezone}); rollup rows: {report.rollup_rows}"
        + (
            f"; rebuilt from the app tables in {report.rebuilt_chunks} day range(s)"
            if report.rebuilt_chunks
            else ""
        )
        + (
            f"; daily partitions start at {config.start_date} (start_date)"
            if config.start_date
            else ""
        )
    )
    if not config.start_date:
        from retention_pipeline.defs.partitions import start_date_missing

        print(start_date_missing(report.first_data_day))
    return 0


def cmd_db_refresh(args: argparse.Namespace) -> int:
    from retention_pipeline.tracking.drain import update_rollup
    from retention_pipeline.tracking.install import refresh_from

    config = load_config(args.config)
    engine = _engine(config)
    with engine.connect() as connection:
        _require_installed(connection, config)
    if args.since:
        added = refresh_from(engine, config, args.since)
        print(
            f"rollup recomputed from {args.since}: {added.events:,} events, "
            f"{added.sessions:,} sessions"
        )
        return 0
    update = update_rollup(engine, config)
    _forget_erased_emails(config, update.erased_send_keys)
    print(
        f"rollup updated: folded {update.events:,} event(s) and {update.sessions:,} session(s)"
        + (f" (polled: {', '.join(update.polled_sources)})" if update.polled_sources else "")
        + (f"; late rows for {', '.join(map(str, update.late_days))}" if update.late_days else "")
    )
    return 0


def cmd_db_erase_gone(args: argparse.Namespace) -> int:
    from retention_pipeline.tracking.drain import update_rollup

    config = load_config(args.config)
    if not args.yes:
        print(
            "error: this erases the history of every user your app deleted or now excludes, "
            "however many; pass --yes",
            file=sys.stderr,
        )
        return 2
    engine = _engine(config)
    with engine.connect() as connection:
        _require_installed(connection, config)
    update = update_rollup(engine, config, all_at_once=True)
    _forget_erased_emails(config, update.erased_send_keys)
    print(
        f"drained, and erased {update.erased_users:,} user(s) deleted from the app or now excluded"
    )
    return 0


def _forget_erased_emails(config, send_keys) -> None:
    """What the email provider keeps on this machine of the erased users' emails (the outbox's
    files) goes with them, as the drain asset does."""
    from retention_pipeline.resources.email import email_resource

    email_resource(config).forget(send_keys)


def cmd_db_uninstall(args: argparse.Namespace) -> int:
    from retention_pipeline.database.reinstall import kept_name
    from retention_pipeline.tracking.install import is_installed, uninstall

    config = load_config(args.config)
    if not args.yes:
        print("error: this drops the pipeline's schema and triggers; pass --yes", file=sys.stderr)
        return 2
    schema = config.database.schema_
    engine = _engine(config)
    if not is_installed(engine, config):
        print(
            f"nothing to uninstall: the pipeline is not installed in this database (no schema "
            f"{schema}, no tracking trigger)"
        )
        return 0
    kept = uninstall(
        engine,
        config,
        forget_suppressions=args.forget_suppressions,
        forget_send_history=args.forget_send_history,
    )
    if not kept:
        print(f"removed schema {schema} and the tracking triggers")
        return 0
    print(
        f"removed the tracking triggers and everything in schema {schema} but what the next "
        "`db upgrade` restores (--forget-suppressions, --forget-send-history drop it):"
    )
    rows_of = {
        "email_suppressions": "suppressed address(es)",
        "episodes": "episode(s)",
        "reengagement_audience": "audience row(s)",
        "email_send_log": "email(s) in the send log",
        "email_events": "delivery event(s)",
        "experiment_periods": "experiment period(s)",
        "campaign_decisions": "campaign decision(s)",
    }
    for table, rows in kept.items():
        print(f"  kept {rows} {rows_of[table]} in {schema}.{kept_name(table)}")
    return 0


def cmd_demo_seed(args: argparse.Namespace) -> int:
    from retention_pipeline.demo import EmailEffect, seed_demo
    from retention_pipeline.demo.seed import MAX_DAYS, MAX_USERS, MIN_DAYS

    # Before any database is started or touched.
    if not MIN_DAYS <= args.days <= MAX_DAYS:
        raise ValueError(
            f"--days: must be between {MIN_DAYS} and {MAX_DAYS}, got {args.days} (churned users "
            "need a few weeks of use and then 30 days of silence)"
        )
    if not 1 <= args.users <= MAX_USERS:
        raise ValueError(f"--users: must be between 1 and {MAX_USERS:,}, got {args.users}")
    config = load_config(args.config)
    end = (
        datetime.combine(args.end, time(), tzinfo=UTC)
        if args.end
        else datetime.now(UTC).replace(microsecond=0)
    )
    started = datetime.now(UTC)
    with _engine(config).begin() as connection:
        summary = seed_demo(
            connection,
            users=args.users,
            days=args.days,
            seed=args.seed,
            end=end,
            email_effect=EmailEffect.for_loop(config.loops[0]),
        )
    elapsed = (datetime.now(UTC) - started).total_seconds()
    print(f"{summary} in {elapsed:.1f}s")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from retention_pipeline.audience.assignment import assignment_of
    from retention_pipeline.database import embedded
    from retention_pipeline.email.secrets import unsubscribe_secret
    from retention_pipeline.sending.preview import preview_email

    config = load_config(args.config)
    loop = config.loop(args.loop) if args.loop else config.loops[0]
    with _engine(config).connect() as connection:
        _require_installed(connection, config)
        assigned = assignment_of(
            connection, config.database.schema_, loop.name, args.user, args.day
        )
        # The assigned variant is its step's: another template's preview shows that step's first.
        variant = args.variant or (
            assigned.variant if assigned and assigned.template == args.template else None
        )
        day, email = preview_email(
            connection,
            config=config,
            loop=loop,
            template=args.template,
            user_id=args.user,
            day=args.day or (assigned.day if assigned else None),
            variant=variant,
            unsubscribe_secret=unsubscribe_secret(config),
        )
    out = (
        Path(args.out)
        if args.out
        else (embedded.retention_home() / "preview" / f"{args.template}-{args.user}.html")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(email.html)
    shown = f"variant {variant}" if variant else "the step's first variant"
    assignment = (
        f"assigned on {assigned.day}: {assigned}"
        if assigned
        else f"not in the {loop.name} audience of {day}"
    )
    print(f"subject: {email.subject}\n{assignment}; shown: {shown}\nas of {day}; written to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from retention_pipeline.email.secrets import unsubscribe_secret, webhook_secret
    from retention_pipeline.web.server import serve

    config = load_config(args.config)
    # Both before anything listens: without either, the service cannot do its job.
    link_secret, event_secret = unsubscribe_secret(config), webhook_secret(config)
    engine = _engine(config)
    try:
        serve(
            engine,
            schema=config.database.schema_,
            unsubscribe_secret=link_secret,
            previous_unsubscribe_secrets=config.email.previous_unsubscribe_secrets,
            webhook_secret=event_secret,
            product_name=config.email.product_name,
            loop_names=config.loop_names,
            host=args.host,
            port=args.port,
        )
    finally:
        engine.dispose()
    return 0


def write_dev_instance(dagster_home: Path) -> None:
    """The local Dagster instance `dev` runs on, rewritten on every start so that an upgrade of
    this project reaches existing homes."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(DEV_INSTANCE_YAML)


def cmd_dev(args: argparse.Namespace) -> int:
    from retention_pipeline.database import embedded
    from retention_pipeline.database.connection import configured_database_url, redact
    from retention_pipeline.defs.partitions import START_DATE_ENV_VAR
    from retention_pipeline.dev import (
        prepare_database,
        require_free_port,
        run_until_signalled,
        single_dev,
        stopping_the_embedded_server_at_the_end,
    )

    # Absolute, so that the code servers and run workers read this very file from any folder.
    config_path = Path(args.config or default_config_path()).resolve()
    config = load_config(config_path)
    configured = configured_database_url(config)
    if configured and not args.demo and not embedded.is_embedded_url(configured) and not args.live:
        raise ConfigError(
            f"dev: database.url is set (or ${DATABASE_URL_ENV_VAR}): dev would install the "
            "pipeline in that database and run its schedules and send sensor from this machine, "
            "emailing its users; unset it for the demo, or pass --live to run on it"
        )
    home = embedded.retention_home()
    url = f"http://{args.host}:{args.port}"
    with single_dev(home, url), stopping_the_embedded_server_at_the_end(config):
        require_free_port(args.host, args.port)  # before anything starts
        print("preparing the app database ...", flush=True)
        if args.demo or configured_database_url(config) is None:
            _use_the_demo_database(config)
        prepared = prepare_database(config)
        prepared.engine.dispose()
        print(
            f"database: {redact(prepared.url)}"
            + (" (demo data seeded)" if prepared.seeded else "")
            + f"; rollup rows: {prepared.install.rollup_rows}",
            flush=True,
        )
        dagster_home = home / "dagster_home"
        write_dev_instance(dagster_home)
        environment = {
            **os.environ,
            "DAGSTER_HOME": str(dagster_home),
            # Dagster's processes start in the Dagster home: from there, an installed package
            # would look for .retention under it (`project_root`).
            embedded.HOME_ENV_VAR: str(home),
            "RETENTION_DATABASE_URL": prepared.url,
            CONFIG_ENV_VAR: str(config_path),
            # Without start_date, the partitions start at the first day of the data prepared.
            **(
                {}
                if config.start_date
                else {START_DATE_ENV_VAR: prepared.install.first_data_day.isoformat()}
            ),
            "PYTHONWARNINGS": ",".join(
                filter(None, [os.environ.get("PYTHONWARNINGS"), *DAGSTER_INTERNAL_WARNINGS])
            ),
        }
        command = [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            "-w",
            str(project_root() / "workspace.yaml"),
            "-h",
            args.host,
            "-p",
            str(args.port),
        ]
        # Again: preparing a first demo database takes a minute, in which the port may go.
        require_free_port(args.host, args.port)
        # Started from the Dagster home, whatever folder `dev` was started from: Dagster warns
        # that it ignores a dagster.yaml it finds in its working folder (deploy/ has one).
        return run_until_signalled(command, environment, cwd=dagster_home)


def _use_the_demo_database(config) -> None:
    """Make the embedded demo server this process's app database, started now: through
    $RETENTION_DATABASE_URL, for this command, the definitions it loads and the Dagster processes
    `dev` starts. The demo has its own database, never one configured."""
    from retention_pipeline.config.loader import DATABASE_URL_ENV_VAR
    from retention_pipeline.database import embedded
    from retention_pipeline.database.connection import configured_database_url

    configured = configured_database_url(config)
    if configured and not embedded.is_embedded_url(configured):
        raise ConfigError(
            f"--demo: database.url is set, and the demo runs on its own embedded PostgreSQL: "
            f"leave database.url (and ${DATABASE_URL_ENV_VAR}) unset for the demo"
        )
    os.environ[DATABASE_URL_ENV_VAR] = embedded.start()


def _chooses_the_demo(args: argparse.Namespace) -> bool:
    """`--demo`, or a `demo` command with no database URL configured (which seeds the demo)."""
    from retention_pipeline.database.connection import configured_database_url

    if args.demo:
        return True
    return args.command == "demo" and configured_database_url(load_config(args.config)) is None


@contextlib.contextmanager
def _on_the_demo_database_when_chosen(args: argparse.Namespace) -> Iterator[None]:
    """Run the command on the embedded demo server when it chooses the demo (see
    `_chooses_the_demo`); any other command needs a database URL."""
    if not _chooses_the_demo(args):
        yield
        return
    with _stopping_the_embedded_server_it_starts():
        _use_the_demo_database(load_config(args.config))
        yield


@contextlib.contextmanager
def _stopping_the_embedded_server_it_starts() -> Iterator[None]:
    """Stop the embedded PostgreSQL when the command ends if the command started it, unless a
    running `dev` now uses it."""
    from retention_pipeline.database import embedded
    from retention_pipeline.dev import running_dev

    was_running = embedded.is_running()
    try:
        yield
    finally:
        if (
            not was_running
            and embedded.is_running()
            and running_dev(embedded.retention_home()) is None
        ):
            embedded.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retention-pipeline", description=__doc__)
    config_help = (
        f"loop configuration (default: ${CONFIG_ENV_VAR}, else retention.yaml at the project root)"
    )
    demo_help = (
        "run on the demo: an embedded PostgreSQL with made-up users (the one `dev` starts when "
        "no database URL is configured), emails to the outbox"
    )
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--demo", action="store_true", help=demo_help)
    # Every subcommand takes --config and --demo too, so they may come before or after the
    # subcommand; there they default to "not given" rather than a value that would erase one
    # given before.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    config_option.add_argument(
        "--demo", action="store_true", default=argparse.SUPPRESS, help=demo_help
    )
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser(
        "dev",
        parents=[config_option],
        help="start the Dagster UI on the configured database; with none, the demo's embedded one",
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.add_argument(
        "--live",
        action="store_true",
        help="run on the configured database: install the pipeline there and run its "
        "schedules and send sensor, emailing its users",
    )
    dev.set_defaults(handler=cmd_dev)

    check = commands.add_parser(
        "check", parents=[config_option], help="validate the configuration and the table mapping"
    )
    check.set_defaults(handler=cmd_check)

    db = commands.add_parser(
        "db", parents=[config_option], help="the pipeline's schema in the app database"
    )
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", parents=[config_option], help="apply migrations, install triggers, backfill"
    )
    upgrade.add_argument(
        "--rebuild-history",
        action="store_true",
        help="after a change of the loops' timezone, rebuild the rollup from the app tables even "
        "where a source captured by `updates` or polled loses what it counted",
    )
    upgrade.add_argument(
        "--second-install",
        action="store_true",
        help="install in `database.schema` even though another schema of this database holds "
        "the pipeline's install, whose suppressions and send log the new one does not read",
    )
    upgrade.set_defaults(handler=cmd_db_upgrade)
    refresh = db_commands.add_parser(
        "refresh",
        parents=[config_option],
        help="fold the captured activity in and poll the polled sources, or recompute days "
        "from the app tables",
    )
    refresh.add_argument(
        "--since",
        type=date.fromisoformat,
        help="recompute every day from this one on from the app tables (a repair, refused while "
        "a source is captured other than by `inserts`); without it, drain the capture and poll "
        "the polled sources",
    )
    refresh.set_defaults(handler=cmd_db_refresh)
    erase_gone = db_commands.add_parser(
        "erase-gone",
        parents=[config_option],
        help="drain, erasing every user the app deleted or now excludes however many (a drain "
        "stops instead when most of the users it knows are to be erased at once)",
    )
    erase_gone.add_argument("--yes", action="store_true", help="they did go: erase them")
    erase_gone.set_defaults(handler=cmd_db_erase_gone)
    uninstall = db_commands.add_parser(
        "uninstall", parents=[config_option], help="remove everything the pipeline added"
    )
    uninstall.add_argument("--yes", action="store_true")
    uninstall.add_argument(
        "--forget-suppressions",
        action="store_true",
        help="drop the suppression list too (kept by default, so that nobody who unsubscribed, "
        "bounced or complained is emailed after a reinstall)",
    )
    uninstall.add_argument(
        "--forget-send-history",
        action="store_true",
        help="drop the send log, episodes, audiences and delivery events too (kept by default, so "
        "that a re-run after a reinstall emails nobody twice and the frequency cap holds)",
    )
    uninstall.set_defaults(handler=cmd_db_uninstall)

    preview = commands.add_parser(
        "preview", parents=[config_option], help="render one email for one user to a file"
    )
    preview.add_argument("--template", required=True)
    preview.add_argument("--user", required=True, help="the user's id")
    preview.add_argument("--loop", help="default: the first loop")
    preview.add_argument("--day", type=date.fromisoformat, help="default: the latest snapshot")
    preview.add_argument("--variant")
    preview.add_argument("--out", help="default: .retention/preview/TEMPLATE-USER.html")
    preview.set_defaults(handler=cmd_preview)

    report = commands.add_parser(
        "report",
        parents=[config_option],
        help="how each loop performs against its holdout, with a verdict per line",
    )
    report.add_argument("--loop", help="default: every loop")
    report.add_argument(
        "--since", type=date.fromisoformat, help="only assignments from this day (YYYY-MM-DD) on"
    )
    report.add_argument(
        "--period",
        type=int,
        help="the experiment period to show (default: the current one; README: Outcomes)",
    )
    report.set_defaults(handler=cmd_report)

    suppress = commands.add_parser(
        "suppress",
        parents=[config_option],
        help="never email an address again (a bounce, a complaint, a request)",
    )
    suppress.add_argument("email")
    suppress.add_argument(
        "--reason", choices=["unsubscribed", "bounced", "complained"], default="unsubscribed"
    )
    suppress.set_defaults(handler=cmd_suppress)

    serve = commands.add_parser(
        "serve",
        parents=[config_option],
        help="the web service: Resend's delivery webhooks, unsubscribe links, a health check",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8025)
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser(
        "demo",
        parents=[config_option],
        help="demo data (in the configured database; with none, the demo's embedded one)",
    )
    demo_commands = demo.add_subparsers(dest="demo_command", required=True)
    seed = demo_commands.add_parser(
        "seed", parents=[config_option], help="generate a deterministic SaaS history"
    )
    seed.add_argument("--users", type=int, default=2000)
    seed.add_argument(
        "--days", type=int, default=120, help="days of history, at least 56 (default: 120)"
    )
    seed.add_argument("--seed", type=int, default=42)
    seed.add_argument("--end", type=date.fromisoformat, help="last day (default: now)")
    seed.set_defaults(handler=cmd_demo_seed)
    return parser


def main(argv: list[str] | None = None) -> int:
    # platformdirs warns on every embedded-server start where XDG_RUNTIME_DIR is unset (as
    # root, in containers); it falls back to /tmp, which is fine.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    for entry in DAGSTER_INTERNAL_WARNINGS:  # `check` loads the definitions in this process
        warnings.filterwarnings("ignore", message=entry.removeprefix("ignore:"))
    args = build_parser().parse_args(argv)
    try:
        if args.handler is cmd_dev:  # dev keeps the embedded server running until it stops
            return args.handler(args)
        with _on_the_demo_database_when_chosen(args):
            return args.handler(args)
    except (ConfigError, MappingError, TrackingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else "unreachable"
        print(f"error: database.url: cannot use the app database: {reason}", file=sys.stderr)
        return 2
    except DBAPIError as error:
        problem = permission_problem(error, _database_role(args), _command_name(args))
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2


def _command_name(args: argparse.Namespace) -> str:
    subcommand = getattr(args, "db_command", None) or getattr(args, "demo_command", None)
    return f"{args.command} {subcommand}" if subcommand else args.command


def _database_role(args: argparse.Namespace) -> str | None:
    """The role the command connected as: the configured URL's user (None when it names none
    and libpq picked the default)."""
    url = load_config(args.config).database.url or os.environ.get(DATABASE_URL_ENV_VAR)
    return make_url(url).username if url else None


if __name__ == "__main__":
    sys.exit(main())
