"""The audience step (`audience.build.build_audiences`) at scale: three loops of three steps over
a day's snapshot, with a month and more of episodes and assignments behind it.

    python -m benchmarks audience --users N [N ...] [--url URL] [--repeats R]

seeds a scratch database per size (`bench_audience_…`, dropped at the end): the pipeline's
schema and a day's `user_activity_snapshot` partition of N users (some sharing a mailbox, some
with no usable address); then prints a Markdown table of each loop's figures and of the step's
time (the three loops in one transaction, as the asset builds them). `measure` does the same on a
database whose snapshot of the day is already built: it adds the loops' history to it
(`seed_history`) and times the loops' first build of the day.

The audience's target is a share of the snapshot step's time at the same number of users, so the
scratch database also holds the demo app's N users with `MIN_DAYS` days of history, the pipeline
installed over them (`seed_app`), and each repeat times the snapshot step (`build_snapshot` of the
demo's last day, rolled forward from the day before's, as the daily run builds it) right before
the three loops: the ratio is taken repeat by repeat from figures measured next to each other.
The demo's days end well before the audience's day, so their snapshots never meet.

The history, per loop, set-based: open episodes of 3% of the users, started 1 to 40 days before
the day among users dormant since before their start (so some are due a step today, some had
every step, a tenth skipped their second step, which is overdue, and one in 20 came back),
ended episodes of another 3% (some ended within the cooldown), each with the assignments its
steps got (holdout, withheld and treatment arms); suppressions of about 1% of the mailboxes (a
third of them for one loop only). The candidates of a loop are the users of its open episodes,
those of a tenth of its ended ones and 0.3% more dormant users, as a dormant segment matches
them every day: about 0.5% of the users start an episode of each loop.
"""

from __future__ import annotations

import copy
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as clock
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.audience.build import AudienceSummary, build_audiences
from retention_pipeline.config import RetentionConfig, parse_config
from retention_pipeline.database.day_partitions import ensure_day_partition
from retention_pipeline.database.migrate import upgrade
from retention_pipeline.demo import seed_demo
from retention_pipeline.demo.seed import MIN_DAYS
from retention_pipeline.recipients.addresses import EMAIL_ADDRESS_SQL_PATTERN, mailbox_sql
from retention_pipeline.segments.snapshot.build import build_snapshot
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT

DAY = date(2026, 11, 10)
# Per loop, in hundredths of a percent of the users: open episodes, ended ones, candidates new
# to the loop.
OPEN_PER_10000 = 300
ENDED_PER_10000 = 300
NEW_PER_10000 = 30
# Episodes open up to this many days before the day, which covers every step's delay.
OPEN_DAYS = 40
# The day the snapshot step is timed on: the demo app's last day, long before the audience's.
SNAPSHOT_DAY = DAY - timedelta(days=60)


def loops_config(url: str, schema: str = "retention", loops: int = 3) -> RetentionConfig:
    """The shipped configuration pointed at `url`, its loop (3 steps: 0, 3 and 7 days) repeated
    `loops` times: `re_engagement`, `re_engagement_2`, …"""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    document["database"]["schema"] = schema
    shipped = document["loops"][0]
    document["loops"] = [
        dict(copy.deepcopy(shipped), name=shipped["name"] + (f"_{n + 1}" if n else ""))
        for n in range(loops)
    ]
    return parse_config(document, environ={})


def seed_snapshot(engine: Engine, schema: str, day: date, users: int) -> None:
    """The schema, and the snapshot of `day` for `users` users: a third of them dormant for 8 to
    60 days, one in 50 sharing the mailbox of the user before (written differently, dormant
    alike), one in 97 with an address that is not one and one in 89 with none."""
    with engine.begin() as connection:
        upgrade(connection, schema)
        partition = ensure_day_partition(connection, schema, "user_activity_snapshot", day)
        connection.execute(
            text(f"""
            INSERT INTO {partition} (partition_date, user_id, email, name, timezone,
                signed_up_at, account_age_days, last_activity_at, previous_activity_at,
                active_today, events_7d, sessions_7d, baseline_sessions_per_week,
                active_days_28d)
            SELECT :day, u::text,
                   CASE WHEN u % 89 = 0 THEN NULL
                        WHEN u % 97 = 0 THEN 'user' || u || '-at-example.com'
                        WHEN u % 50 = 0 THEN ' User' || (u - 1) || '@Example.com '
                        ELSE 'user' || u || '@example.com' END,
                   'User ' || u, 'UTC',
                   CAST(:day AS timestamp) - interval '400 days', 400,
                   CAST(:day AS timestamp) + interval '12 hours'
                       - make_interval(days => CASE WHEN person % 3 = 0 THEN 8 + u % 53
                                                    ELSE u % 7 END),
                   NULL, person % 3 <> 0 AND u % 7 = 0, 0, 0, 1, 0
            -- Users sharing a mailbox are one person: dormant or not alike.
            FROM generate_series(1, :users) AS u,
                 LATERAL (SELECT CASE WHEN u % 50 = 0 THEN u - 1 ELSE u END AS person) AS p"""),
            {"day": day, "users": users},
        )
        connection.execute(text(f"ANALYZE {partition}"))


def seed_app(engine: Engine, config: RetentionConfig, users: int) -> None:
    """The demo app's tables (schema public) with `users` users and `MIN_DAYS` days of history
    up to `SNAPSHOT_DAY`, the pipeline installed over them (its rollup built from them), and the
    snapshot of the day before `SNAPSHOT_DAY` built, so that the one of `SNAPSHOT_DAY` rolls
    forward from it as the daily run's does."""
    zone = ZoneInfo(config.timezone)
    end = datetime.combine(SNAPSHOT_DAY + timedelta(days=1), clock.min, tzinfo=zone)
    with engine.begin() as connection:
        seed_demo(connection, users=users, days=MIN_DAYS, seed=42, end=end)
    install(engine, config)
    with engine.begin() as connection:
        build_snapshot(connection, config, SNAPSHOT_DAY - timedelta(days=1))


def time_snapshot_step(engine: Engine, config: RetentionConfig) -> float:
    """Seconds to build the snapshot of `SNAPSHOT_DAY` (replacing the previous build's), rolled
    forward from the day before's, in one transaction as the asset does."""
    started = time.perf_counter()
    with engine.begin() as connection:
        summary = build_snapshot(connection, config, SNAPSHOT_DAY)
    seconds = time.perf_counter() - started
    if summary.path != "incremental":
        raise RuntimeError(f"the snapshot of {SNAPSHOT_DAY} was built {summary.path}, not rolled")
    return seconds


def seed_history(engine: Engine, config: RetentionConfig, day: date) -> dict[str, set[str]]:
    """Episodes, assignments and suppressions of `config`'s loops up to the day before `day`,
    from the users of the snapshot of `day` (replacing what the loops had); returns each loop's
    candidates of `day`."""
    s = engine.dialect.identifier_preparer.quote_schema(config.database.schema_)
    names = [loop.name for loop in config.loops]
    candidates = {}
    with engine.begin() as connection:
        for table in ("reengagement_audience", "episodes", "experiment_periods"):
            connection.execute(
                text(f"DELETE FROM {s}.{table} WHERE loop_name = ANY(:loops)"), {"loops": names}
            )
        connection.execute(
            text(f"""DELETE FROM {s}.email_suppressions
                     WHERE source = 'bench_audience'""")
        )
        users = connection.execute(
            text(f"SELECT count(*) FROM {s}.user_activity_snapshot WHERE partition_date = :day"),
            {"day": day},
        ).scalar_one()
        for loop in config.loops:
            delays = [step.delay_days for step in loop.steps]
            templates = [step.action.template for step in loop.steps]
            params = {
                "loop": loop.name,
                "day": day,
                # Ranks of the last open episode, the last ended one, the last new candidate.
                "open": users * OPEN_PER_10000 // 10000,
                "ended": users * (OPEN_PER_10000 + ENDED_PER_10000) // 10000,
                "new": users * (OPEN_PER_10000 + ENDED_PER_10000 + NEW_PER_10000) // 10000,
                "open_days": OPEN_DAYS,
                "delays": delays,
                "templates": templates,
                "email_pattern": EMAIL_ADDRESS_SQL_PATTERN,
            }
            # Users in an order of the loop's own; dormant ones (idle a week and more) first.
            connection.execute(
                text(f"""
                CREATE TEMP TABLE bench_ranked ON COMMIT DROP AS
                SELECT snap.user_id, snap.email,
                       coalesce(:day - (snap.last_activity_at AT TIME ZONE 'UTC')::date, 1000)
                           AS idle,
                       abs(hashtext(snap.draw_key || '/' || :loop)) AS draw,
                       row_number() OVER (
                           ORDER BY coalesce(snap.last_activity_at
                                             < CAST(:day AS timestamp) - interval '7 days', true)
                                    DESC,
                                    hashtext(snap.draw_key || '/' || :loop), snap.user_id)
                           AS rank
                FROM (
                    -- Users sharing a mailbox draw alike: their episodes are alike too (some
                    -- from before one mailbox was one person).
                    SELECT *, coalesce({mailbox_sql("email")}, user_id) AS draw_key
                    FROM {s}.user_activity_snapshot WHERE partition_date = :day
                ) AS snap"""),
                params,
            )
            connection.execute(text("ANALYZE bench_ranked"))
            connection.execute(
                text(f"""
                INSERT INTO {s}.episodes (loop_name, user_id, started_on, ended_on, end_reason)
                SELECT :loop, user_id,
                       CASE WHEN rank > :open THEN :day - 20 - draw % 60
                            -- One in 20 came back since (on their last activity): the day
                            -- ends their episode.
                            WHEN draw % 20 = 0 AND idle < 1000 THEN :day - idle - 1 - draw % 5
                            ELSE :day - 1 - draw % greatest(1, least(:open_days, idle - 7))
                       END AS started_on,
                       CASE WHEN rank > :open
                            THEN least(:day - 1, :day - 20 - draw % 60 + 1 + draw % 20) END,
                       CASE WHEN rank > :open THEN 'returned' END
                FROM bench_ranked WHERE rank <= :ended"""),
                params,
            )
            connection.execute(text(f"ANALYZE {s}.episodes"))
            # Each step on its day, before the day and the episode's end; a tenth of the
            # episodes skipped the second (frequency-capped, say), which is overdue.
            connection.execute(
                text(f"""
                INSERT INTO {s}.reengagement_audience (partition_date, loop_name, user_id, email,
                    episode_start, step, template, arm, variant)
                SELECT e.started_on + delays.delay, :loop, e.user_id,
                       lower(btrim(r.email)), e.started_on, delays.step - 1,
                       delays.template,
                       CASE WHEN r.draw / 7 % 10 = 0 THEN 'holdout'
                            WHEN delays.step > 1 AND r.draw / 3 % 10 = 0 THEN 'withheld'
                            ELSE 'treatment' END,
                       CASE WHEN delays.step = 1 AND r.draw % 2 = 1 THEN 'b' ELSE 'a' END
                FROM {s}.episodes AS e
                JOIN bench_ranked AS r ON r.user_id = e.user_id
                CROSS JOIN unnest(CAST(:delays AS int[]), CAST(:templates AS text[]))
                    WITH ORDINALITY AS delays(delay, template, step)
                WHERE e.loop_name = :loop
                  AND e.started_on + delays.delay < coalesce(e.ended_on, :day)
                  AND NOT (delays.step = 2 AND r.draw / 11 % 10 = 0)
                  AND btrim(r.email) ~ :email_pattern"""),
                params,
            )
            # As the loop's builds of the days before left them: the day each open episode's
            # next step falls due (`episodes.next_step_on`).
            connection.execute(
                text(f"""
                UPDATE {s}.episodes AS e
                SET next_step_on = coalesce((
                    SELECT min(e.started_on + delays.delay)
                    FROM unnest(CAST(:delays AS int[])) WITH ORDINALITY AS delays(delay, step)
                    WHERE NOT EXISTS (
                        SELECT FROM {s}.reengagement_audience AS had
                        WHERE had.loop_name = e.loop_name AND had.user_id = e.user_id
                          AND had.episode_start = e.started_on AND had.step = delays.step - 1)
                ), 'infinity')
                WHERE e.loop_name = :loop AND e.ended_on IS NULL"""),
                params,
            )
            candidates[loop.name] = set(
                connection.execute(
                    text("""
                    SELECT user_id FROM bench_ranked
                    WHERE rank <= :open
                       OR rank <= :ended AND draw % 10 = 0
                       OR rank > :ended AND rank <= :new"""),
                    params,
                ).scalars()
            )
            connection.execute(text("DROP TABLE bench_ranked"))
        connection.execute(
            text(f"""
            INSERT INTO {s}.email_suppressions (email, loop_name, reason, source)
            SELECT {mailbox_sql("snap.email")},
                   CASE WHEN hashtext(snap.user_id) % 3 = 0 THEN CAST(:loop AS text) END,
                   'unsubscribed', 'bench_audience'
            FROM {s}.user_activity_snapshot AS snap
            WHERE snap.partition_date = :day AND snap.email IS NOT NULL
              AND abs(hashtext(snap.user_id || '/suppressed')) % 100 = 0
            ON CONFLICT DO NOTHING"""),
            {"day": day, "loop": names[0]},
        )
    vacuum_history(engine, config.database.schema_)
    return candidates


def vacuum_history(engine: Engine, schema: str) -> None:
    """The tables the audience reads, vacuumed and analyzed as autovacuum leaves a history of
    days: no dead rows of the seeding or of a build taken back, statistics up to date."""
    s = engine.dialect.identifier_preparer.quote_schema(schema)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in ("episodes", "reengagement_audience", "email_suppressions"):
            connection.execute(text(f"VACUUM (ANALYZE) {s}.{table}"))


@dataclass
class Figures:
    users: int
    open_episodes: dict[str, int] = field(default_factory=dict)
    candidates: dict[str, int] = field(default_factory=dict)
    assigned: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    """Repeat by repeat, the time of the loops' build (`build_audiences`, one transaction)."""
    snapshot_seconds: list[float] = field(default_factory=list)
    """Repeat by repeat, the snapshot step's time, measured right before the loops'."""
    summaries: dict[str, AudienceSummary] = field(default_factory=dict)
    """Each loop's summary of its last build: who was assigned, who excluded and why."""

    @property
    def against_snapshot(self) -> list[float]:
        """Repeat by repeat, the loops' time over the snapshot step's (empty when the snapshot
        step was not measured)."""
        return [
            loops / snapshot
            for loops, snapshot in zip(self.seconds, self.snapshot_seconds, strict=False)
        ]


def take_back_day(engine: Engine, config: RetentionConfig, day: date) -> None:
    """What the loops' builds of `day` did, taken back and vacuumed (as `seed_history` left
    it, but that the episodes given a step no longer know their next: they are read, as they
    were), so that the next build is the day's first, as in the daily run."""
    s = engine.dialect.identifier_preparer.quote_schema(config.database.schema_)
    params = {"loops": [loop.name for loop in config.loops], "day": day}
    with engine.begin() as connection:
        connection.execute(
            text(f"""
                WITH taken_back AS (
                    DELETE FROM {s}.reengagement_audience
                    WHERE partition_date = :day AND loop_name = ANY(:loops)
                    RETURNING loop_name, user_id, episode_start
                )
                UPDATE {s}.episodes AS e SET next_step_on = NULL
                FROM taken_back
                WHERE e.loop_name = taken_back.loop_name AND e.user_id = taken_back.user_id
                  AND e.started_on = taken_back.episode_start"""),
            params,
        )
        connection.execute(
            text(f"""DELETE FROM {s}.episodes
                     WHERE started_on = :day AND loop_name = ANY(:loops)"""),
            params,
        )
        connection.execute(
            text(f"""UPDATE {s}.episodes SET ended_on = NULL, end_reason = NULL
                     WHERE ended_on = :day AND loop_name = ANY(:loops)"""),
            params,
        )
    vacuum_history(engine, config.database.schema_)


def measure(
    url: str,
    schema: str,
    day: date,
    users: int,
    loops: int = 3,
    repeats: int = 3,
    with_snapshot_step: bool = False,
) -> Figures:
    """Seed the loops' history over the snapshot of `day` already in the database at `url`,
    then build the loops' audiences of `day` (in one transaction, as the asset does), `repeats`
    times, each the day's first build (`take_back_day` between them), each
    right after the snapshot step (`time_snapshot_step`, on the database `seed_app` seeded) if
    `with_snapshot_step`."""
    config = loops_config(url, schema, loops)
    engine = create_engine(url)
    try:
        candidates = seed_history(engine, config, day)
        s = engine.dialect.identifier_preparer.quote_schema(schema)
        with engine.connect() as connection:
            open_episodes = dict(
                connection.execute(
                    text(f"""SELECT loop_name, count(*) FROM {s}.episodes
                             WHERE ended_on IS NULL GROUP BY loop_name""")
                ).all()
            )
        figures = Figures(users=users)
        for repeat in range(repeats):
            if repeat:
                take_back_day(engine, config, day)
            if with_snapshot_step:
                figures.snapshot_seconds.append(time_snapshot_step(engine, config))
            started = time.perf_counter()
            with engine.begin() as connection:
                summaries = build_audiences(
                    connection, config=config, loops=config.loops, day=day, candidates=candidates
                )
            figures.seconds.append(time.perf_counter() - started)
            if repeat and summaries != figures.summaries:
                raise RuntimeError(f"repeat {repeat + 1} built other audiences than the first")
            for loop in config.loops:
                summary = figures.summaries[loop.name] = summaries[loop.name]
                figures.candidates[loop.name] = summary.candidates
                figures.open_episodes[loop.name] = open_episodes.get(loop.name, 0)
                figures.assigned[loop.name] = summary.treatment + summary.holdout + summary.withheld
    finally:
        engine.dispose()
    return figures


def measure_scratch(server_url: str, users: int, repeats: int, day: date = DAY) -> Figures:
    """`measure` on a scratch database of its own, seeded with `users` users, dropped after."""
    name = f"bench_audience_{uuid.uuid4().hex[:6]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    quoted = admin.dialect.identifier_preparer.quote(name)
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {quoted}"))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        engine = create_engine(url)
        seed_app(engine, loops_config(url), users)
        seed_snapshot(engine, "retention", day, users)
        engine.dispose()
        return measure(url, "retention", day, users, repeats=repeats, with_snapshot_step=True)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        admin.dispose()


def render(results: list[Figures]) -> str:
    """One row per size and loop (its figures), and per size the loops together: their time,
    the snapshot step's and the ratio of the two, each as median (min–max) of the repeats (the
    ratio taken repeat by repeat); then the growth from the first size to the last."""

    def spread(values: list[float], unit: str = " s") -> str:
        return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}–{max(values):.2f})"

    lines = [
        "| users | loop | open episodes | candidates | assigned | build_audiences | "
        "snapshot step | audience / snapshot |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for figures in results:
        for loop in figures.summaries:
            lines.append(
                f"| {figures.users:,} | {loop} | {figures.open_episodes[loop]:,} | "
                f"{figures.candidates[loop]:,} | {figures.assigned[loop]:,} | | | |"
            )
        snapshot = (
            f"{spread(figures.snapshot_seconds)} | {spread(figures.against_snapshot, 'x')}"
            if figures.snapshot_seconds
            else "not measured | —"
        )
        lines.append(
            f"| {figures.users:,} | all {len(figures.summaries)} loops | | | | "
            f"{spread(figures.seconds)} | {snapshot} |"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        ratio = statistics.median(last.seconds) / statistics.median(first.seconds)
        lines += [
            "",
            f"{last.users:,} / {first.users:,} users: {ratio:.1f}x the time for "
            f"{last.users / first.users:g}x the users.",
        ]
    return "\n".join(lines)
