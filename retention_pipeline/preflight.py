"""What `retention-pipeline check` verifies: that a run would not fail on this database.

It checks the mapping against the catalog (every table and column, and what kind of values each
holds), then plans with EXPLAIN the statements a daily run executes (the snapshot, each loop's
segments, audience and condition query) with the values a run binds, in read-only transactions
under the run's timeouts; nothing is written. Of the app's rows it reads what says whether the
mapping means what it claims: a sample of each activity source's last days
(`tracking.source_checks`: whether its user column reaches users, whether its action column
names kinds, what it reads of the last day), the subscriptions (rows that reach users, amounts
that are amounts), and how many users `database.tables.users.exclude` keeps out. Every problem
is one line naming the table, column or loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from psycopg.errors import InsufficientPrivilege
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.sql.elements import TextClause

from retention_pipeline.audience.build import build_audience
from retention_pipeline.config.models import (
    SHORTHAND_SOURCES,
    QueryCondition,
    QuerySuccess,
    RetentionConfig,
)
from retention_pipeline.database.activity_sources import inspect_sources
from retention_pipeline.database.app_tables import (
    ResolvedTable,
    inspect_app_tables,
    subscription_parts,
)
from retention_pipeline.database.excluded_users import count_excluded, describe
from retention_pipeline.database.migrate import current_revision, installation_problem
from retention_pipeline.database.privileges import lacking_right
from retention_pipeline.database.replica import (
    COPIED_TABLES,
    copy_source_sql,
    subscriptions_source_sql,
)
from retention_pipeline.outcomes.evaluate import check_success_query, evaluate_outcomes
from retention_pipeline.outcomes.performance import performance_rows
from retention_pipeline.segments.conditions import (
    ConditionError,
    condition_statement,
    explain_condition,
    single_select,
)
from retention_pipeline.segments.rules import classify_day
from retention_pipeline.segments.snapshot.billing import billing_parameters, meaning_problems
from retention_pipeline.segments.snapshot.full import app_reads_sql, snapshot_sql
from retention_pipeline.segments.snapshot.names import AppNames
from retention_pipeline.segments.snapshot.statement import snapshot_parameters
from retention_pipeline.tracking.source_checks import read_sources
from retention_pipeline.tracking.sources import (
    erasure_trigger_problem,
    installed_sources,
    sources_problem,
    trigger_right_problems,
)
from retention_pipeline.tracking.sql import TrackingSql
from retention_pipeline.tracking.state import rollup_problem


@dataclass
class PreflightReport:
    problems: list[str] = field(default_factory=list)
    # What could not be checked, and why (the pipeline's schema is not installed yet).
    unchecked: str | None = None
    planned: int = 0
    # What each activity source reads of the last day, one line each.
    sources: list[str] = field(default_factory=list)
    # How many users `database.tables.users.exclude` keeps out, one line per exclusion after
    # the total; empty when none is configured or the users table cannot be read.
    exclusions: list[str] = field(default_factory=list)


def preflight(
    engine: Engine, config: RetentionConfig, read_engine: Engine | None = None
) -> PreflightReport:
    """Check everything a daily run of yesterday would execute, on the app database and on its
    read replica (`read_engine`, when `database.read_url` names one); collect every problem."""
    report = PreflightReport()
    if read_engine is not None:
        _check_replica(read_engine, config, report)
    day = datetime.now(ZoneInfo(config.timezone)).date() - timedelta(days=1)
    schema = config.database.schema_
    upgrade_problems: list[str] = []
    with engine.connect() as connection:
        mapping = inspect_app_tables(connection, config.database.tables)
        sources = inspect_sources(connection, config.database, mapping.resolved.get("users"))
        not_installed = installation_problem(connection, schema)
        ever_installed = current_revision(connection, schema) is not None
        if "users" in mapping.resolved and not sources.problems:
            tracking = TrackingSql(
                connection.dialect, schema, mapping.resolved["users"], tuple(sources.resolved)
            )
            reading = read_sources(connection, tracking, mapping.resolved["users"], config.timezone)
            report.sources = reading.lines
            sources.problems.extend(reading.problems)
            # What `db upgrade` needs, and the line every run stops with until it has run:
            # neither keeps the statements below from being planned.
            installed = None if not_installed else installed_sources(connection, tracking)
            upgrade_problems = trigger_right_problems(connection, tracking, installed)
            erasure = erasure_trigger_problem(connection, tracking, config.database.tracking)
            upgrade_problems.extend([erasure] if erasure else [])
            if installed is not None:
                not_upgraded = rollup_problem(
                    connection, schema, config.timezone
                ) or sources_problem(connection, tracking)
                upgrade_problems.extend([not_upgraded] if not_upgraded else [])
        unowned = None if not_installed else _ownership_problem(connection, schema)
        connection.rollback()
    report.problems.extend(mapping.problems)
    report.problems.extend(sources.problems)
    report.problems.extend(upgrade_problems)
    report.problems.extend([unowned] if unowned else [])
    billing = config.database.tables.subscriptions
    if (
        billing is not None
        and "users" in mapping.resolved
        and all(
            part in mapping.resolved for part in subscription_parts(config.database.tables, billing)
        )
    ):
        with engine.connect() as connection:
            try:
                report.problems.extend(
                    meaning_problems(connection, AppNames(connection, mapping.resolved))
                )
            except DBAPIError as error:
                # A right the role lacks is named by the plan of the subscriptions' read below;
                # anything else (a value no cast takes) the run would meet too.
                if not isinstance(error.orig, InsufficientPrivilege):
                    report.problems.append(
                        f"database.tables.subscriptions: reading the subscriptions failed: "
                        f"{_first_line(error)}"
                    )
            finally:
                connection.rollback()
    parameters = snapshot_parameters(config, day)
    tables = mapping.resolved
    every_table_resolved = all(
        name in tables
        for name, _ in config.database.tables.items()
        if name not in SHORTHAND_SOURCES
    )
    if "users" in tables and config.database.tables.users.exclude:
        report.exclusions = _exclusions(engine, tables["users"], config, report)
    if "users" in tables:
        with engine.connect() as connection:
            reads = app_reads_sql(connection, tables)
        reads_plan = [
            _plan(engine, report, f"database.tables.{table}: the snapshot's read", sql, parameters)
            for table, sql in reads.items()
        ]
        mapped = every_table_resolved and not sources.problems
        if not_installed is None and mapped and all(reads_plan):
            with engine.connect() as connection:
                sql = snapshot_sql(connection, config, tables)
            _plan(engine, report, "the snapshot", sql, parameters)
    for loop in config.loops:
        where = f"loops.{loop.name}"
        if not_installed is None:
            _plan_recorded(
                engine,
                report,
                f"{where}: the segments",
                lambda c, loop=loop: classify_day(c, schema, [loop], config.timezone, day),
            )

            def audience(c, loop=loop):
                return build_audience(c, config=config, loop=loop, day=day, candidates=set())

            # A rebuild of a day whose emails began reads what the first build wrote: planned
            # when the first build would pass (its failure would be said twice otherwise).
            if _plan_recorded(engine, report, f"{where}: the audience", audience):
                _plan_recorded(
                    engine,
                    report,
                    f"{where}: the audience built again once its emails began going out",
                    audience,
                    answer=True,
                )
            _plan_recorded(
                engine,
                report,
                f"{where}: the outcomes",
                lambda c, loop=loop: evaluate_outcomes(
                    c, config=config, loop=loop, day=day, successes=[]
                ),
            )
            _plan_recorded(
                engine,
                report,
                f"{where}: the performance",
                lambda c, loop=loop: performance_rows(c, schema, loop, through=day),
            )
            try:
                if explain_condition(engine, schema, loop, day):
                    report.planned += 1
            except ConditionError as error:
                report.problems.append(str(error))
            if isinstance(loop.success, QuerySuccess):
                try:
                    check_success_query(engine, schema, loop, loop.success, day)
                    report.planned += 1
                except ConditionError as error:
                    report.problems.append(str(error))
        else:
            # Without the schema its views are missing; the parser still judges the queries.
            try:
                if isinstance(loop.condition, QueryCondition):
                    condition_statement(loop, loop.condition)
                if isinstance(loop.success, QuerySuccess):
                    single_select(loop.success.query, f"{where}.success.query")
            except ConditionError as error:
                report.problems.append(str(error))
    if not_installed is not None:
        unplanned = (
            f"database.schema: {not_installed}; until then the snapshot, segments, audience, "
            "outcomes and condition queries cannot be planned"
        )
        # Before the first install, `check` is how a mapping is tried out; an install the code
        # has moved past is what stops every run after a deploy.
        if ever_installed:
            report.problems.append(unplanned)
        else:
            report.unchecked = unplanned
    return report


def _ownership_problem(connection: Connection, schema: str) -> str | None:
    """What every run alters that only its owner may, where the role is not (a member of) the
    owner: a daily table, each day a new partition of it; a capture (trigger) function, which
    the drain replaces. No right granted stands in for owning them, and no plan shows it."""
    role, unowned = connection.execute(
        text("""
            SELECT current_user,
                   array_agg(what ORDER BY kind, what) FILTER (WHERE NOT owned)
            FROM (
                SELECT 1 AS kind, format('table %I.%I', n.nspname, c.relname) AS what,
                       pg_has_role(c.relowner, 'USAGE') AS owned
                FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                WHERE n.nspname = :schema AND c.relkind = 'p'
                UNION ALL
                SELECT 2, format('function %I.%I', n.nspname, p.proname),
                       pg_has_role(p.proowner, 'USAGE')
                FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
                WHERE n.nspname = :schema AND p.prorettype = CAST('trigger' AS regtype)
            ) AS altered"""),
        {"schema": schema},
    ).one()
    if not unowned:
        return None
    more = f" and {len(unowned) - 1} more" if len(unowned) > 1 else ""
    return (
        f"database.schema: role {role} does not own {unowned[0]}{more}, which the runs alter "
        "(a day's partitions, the drain's capture functions) and only the owner may: run the "
        "pipeline as the role that ran `db upgrade`, or grant that role to this one"
    )


def _exclusions(
    engine: Engine, users: ResolvedTable, config: RetentionConfig, report: PreflightReport
) -> list[str]:
    """What the exclusions keep out of the app's users, counted in a read-only transaction; a
    count that fails (as every read of the users table would) is a problem of the report."""
    with engine.connect() as connection:
        connection.execute(text("SET TRANSACTION READ ONLY"))
        try:
            counted = count_excluded(connection, users)
        except DBAPIError as error:
            report.problems.append(
                f"database.tables.users.exclude: reading the users failed: {_first_line(error)}"
            )
            return []
        finally:
            connection.rollback()
    return [
        str(counted),
        *(
            f"  database.tables.users.exclude.{index} ({describe(predicate)}): "
            f"{count:,} user{'' if count == 1 else 's'}"
            for index, (predicate, count) in enumerate(
                zip(config.database.tables.users.exclude, counted.per_exclusion, strict=True)
            )
        ),
    ]


def _check_replica(read_engine: Engine, config: RetentionConfig, report: PreflightReport) -> None:
    """The replica has the mapped tables and columns, and the snapshot's copies of users and
    subscriptions plan there."""
    try:
        with read_engine.connect() as replica:
            mapping = inspect_app_tables(replica, config.database.tables)
            sources = {
                f"the copy of {name}": copy_source_sql(replica, mapping.resolved[name])
                for name in COPIED_TABLES
                if name in mapping.resolved
            }
            if "subscriptions" in mapping.resolved:
                sources["the subscriptions' read"] = subscriptions_source_sql(
                    replica, mapping.resolved
                )
            replica.rollback()
    except OperationalError as error:
        report.problems.append(f"database.read_url: cannot connect: {_first_line(error)}")
        return
    report.problems.extend(f"database.read_url: {problem}" for problem in mapping.problems)
    parameters = billing_parameters(config.database.tables.subscriptions)
    for what, sql in sources.items():
        _plan(read_engine, report, f"database.read_url: {what}", sql, parameters)


def _plan(engine: Engine, report: PreflightReport, what: str, sql: str, parameters: dict) -> bool:
    return _explain(engine, report, what, [(text(sql), parameters)])


def _plan_recorded(
    engine: Engine,
    report: PreflightReport,
    what: str,
    build: Callable[[Connection], object],
    answer: object = None,
) -> bool:
    """Plan the statements a build function executes, recorded by running it against a
    recorder instead of a connection (it binds the same values a run does); `answer` is what
    its `scalar()` reads get."""
    recorder = _StatementRecorder(engine.dialect, answer)
    build(recorder)  # type: ignore[arg-type]
    return _explain(engine, report, what, recorder.statements)


def _explain(
    engine: Engine,
    report: PreflightReport,
    what: str,
    statements: list[tuple[TextClause, dict]],
) -> bool:
    """EXPLAIN each statement in order, in one transaction rolled back at the end; the first
    failure is a problem. What prepares the statements after it is run for real: a temporary
    table (created empty: its rows cost a run's time, and its plan checks the same rights), its
    ANALYZE, its drop, a setting of the transaction. They have no plan."""
    with engine.connect() as connection:
        try:
            for clause, parameters in statements:
                if _prepares(clause):
                    connection.execute(_empty(clause), parameters)
                    continue
                connection.execute(text(f"EXPLAIN {clause.text}"), parameters)
                report.planned += 1
        except DBAPIError as error:
            # PostgreSQL's permission error names neither the right nor the object's schema.
            statement = " ".join((error.statement or "").split()).removeprefix("EXPLAIN ")
            lacking = lacking_right(error, engine.url.username, statement)
            report.problems.append(f"{what} would fail: {lacking or _first_line(error)}")
            return False
        finally:
            connection.rollback()
    return True


def _prepares(clause: TextClause) -> bool:
    # Only the build's own temporary tables are dropped for real: a DROP of anything else would
    # lock a real table while `check` runs.
    statement = clause.text.lstrip().upper()
    return statement.startswith(("CREATE TEMP", "ANALYZE ", "SET ", "DROP TABLE AUDIENCE_"))


def _empty(clause: TextClause) -> TextClause:
    """A `CREATE TEMP TABLE ... AS` query that creates the table without its rows."""
    sql = clause.text.rstrip().rstrip(";")
    filled = re.match(r"\s*CREATE TEMP TABLE .*? AS\b", sql, re.IGNORECASE | re.DOTALL)
    if filled and not sql.upper().endswith("WITH NO DATA"):
        return text(f"{sql} WITH NO DATA")
    return clause


def _first_line(error: DBAPIError) -> str:
    message = str(error.orig).strip()
    return message.splitlines()[0] if message else type(error.orig).__name__


class _NoRows:
    """What a recorded statement returns: nothing, so the build function goes on; `scalar()`
    answers `answer`, to follow the branch a build takes on what it reads that way."""

    rowcount = 0

    def __init__(self, answer: object):
        self.answer = answer

    def scalar_one(self) -> int:
        return 0

    def scalar(self) -> object:
        return self.answer

    def all(self) -> list:
        return []

    def __iter__(self):
        return iter(())


class _StatementRecorder:
    """Stands in for a connection: keeps each statement and its values instead of running it;
    what `scalar()` reads is `answer`."""

    def __init__(self, dialect: Dialect, answer: object = None):
        self.dialect = dialect
        self.answer = answer
        self.statements: list[tuple[TextClause, dict]] = []

    def execute(self, statement: TextClause, parameters: dict | None = None) -> _NoRows:
        self.statements.append((statement, dict(parameters or {})))
        return _NoRows(self.answer)
