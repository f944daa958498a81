"""Local-time delivery at scale: a day's emails sent by 24 hourly runs, each claiming the members
due in its hour, against the same emails sent by the one send run after the daily run.

    python -m benchmarks local-time --users N [--audience-share S] [--repeats R] [--url URL]
        [--bigint-ids] [--output benchmarks/RESULTS-local-time.md]

seeds a scratch database (`bench_local_time_…`, dropped at the end): the pipeline's schema, the
app's users table (ids text, as uuid-keyed apps have; `--bigint-ids`: the demo's bigints, whose
check before each batch reads the whole users table, the ids being compared as text) and a day's
snapshot of N users spread over 24 timezones (every UTC offset from
-11 to +14 that has a 09:00 in a different UTC hour, the 30- and 45-minute ones included), and
the treated audience of one loop: S of the users (default 2%), with a week of earlier audience
days of the same size behind it, already sent, as a running loop has. Then, alternating, R times:

- daily: the loop sends right after its run (`send_at: after_run`), one `send_loop_day` that
  renders, claims and sends the whole day;
- hourly: the loop sends at 09:00 local (`send_at: {local_time: '09:00'}`); the due times are
  recorded as the build records them (timed apart), then 24 `send_loop_day` runs at the top of
  each hour claim and send the members due.

Both send to a local stand-in for Resend (a real HTTP server on a thread), unthrottled, so the
figures are the pipeline's own cost. Between measurements the day's send log is emptied. Last,
EXPLAIN ANALYZE of one hourly run's claim (the due members' query) shows the index it reads and
how many rows, against the day's audience.
"""

from __future__ import annotations

import copy
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from retention_pipeline.audience.build import record_due_times
from retention_pipeline.config import RetentionConfig, parse_config
from retention_pipeline.database.day_partitions import ensure_day_partition
from retention_pipeline.database.migrate import upgrade
from retention_pipeline.email.resend_sender import ResendSender
from retention_pipeline.sending import send_loop_day
from retention_pipeline.sending.compose import loop_templates
from retention_pipeline.sending.due import due_members_sql, oldest_due_day
from retention_pipeline.sending.shards import WHOLE_LOOP
from retention_pipeline_tests.email.fake_resend import serve_fake_resend
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT

SCHEMA = "retention"
APP_SCHEMA = Path(__file__).resolve().parents[1] / "retention_pipeline" / "demo" / "schema.sql"
LOOP = "re_engagement"
DAY = date(2026, 11, 20)
BUILT_AT = datetime(2026, 11, 21, 9, 4, tzinfo=UTC)
HISTORY_DAYS = 7
# One zone per UTC hour of its 09:00 (and the half- and quarter-hour ones).
ZONES = (
    "Pacific/Kiritimati", "Pacific/Tongatapu", "Pacific/Auckland", "Pacific/Noumea",
    "Australia/Sydney", "Australia/Adelaide", "Asia/Tokyo", "Asia/Shanghai", "Asia/Bangkok",
    "Asia/Kathmandu", "Asia/Kolkata", "Asia/Karachi", "Asia/Dubai", "Europe/Moscow",
    "Africa/Cairo", "Europe/Berlin", "UTC", "Atlantic/Azores", "America/Noronha",
    "America/Sao_Paulo", "America/St_Johns", "America/New_York", "America/Chicago",
    "America/Denver", "America/Los_Angeles", "America/Anchorage", "Pacific/Honolulu",
    "Pacific/Pago_Pago",
)  # fmt: skip
API_KEY = "re_bench_key"
FROM = "Acme <hello@acme.test>"
SECRET = "bench-unsubscribe-secret"


def loop_config(url: str, send_at: object) -> RetentionConfig:
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    document["loops"][0]["send_at"] = send_at
    return parse_config(document, environ={})


def seed(engine: Engine, users: int, audience_share: float, text_ids: bool) -> int:
    """The schema, the app's users (their ids text, as uuid-keyed apps have, or the demo's
    bigints), the snapshot of DAY and the loop's audiences; returns the size of DAY's treated
    audience."""
    every = max(1, round(1 / audience_share))
    zones = list(ZONES)
    with engine.begin() as connection:
        upgrade(connection, SCHEMA)
        # The demo app's tables: each batch of a send run reads the users table.
        connection.exec_driver_sql(APP_SCHEMA.read_text().replace("{schema}", "public"))
        if text_ids:
            connection.execute(text("ALTER TABLE public.users ALTER id DROP IDENTITY"))
            connection.execute(text("ALTER TABLE public.users ALTER id TYPE text"))
        id_type = "text" if text_ids else "bigint"
        connection.execute(
            text(f"""
                INSERT INTO public.users (id, email, name, timezone)
                SELECT CAST(u AS {id_type}), 'user' || u || '@example.com', 'User ' || u,
                       (CAST(:zones AS text[]))[1 + u % cardinality(CAST(:zones AS text[]))]
                FROM generate_series(1, :users) AS u"""),
            {"users": users, "zones": zones},
        )
        for back in range(HISTORY_DAYS + 1):
            day = DAY - timedelta(days=back)
            partition = ensure_day_partition(connection, SCHEMA, "user_activity_snapshot", day)
            # Only DAY needs every user; the history days hold their own audience's.
            connection.execute(
                text(f"""
                    INSERT INTO {partition} (partition_date, user_id, email, name, timezone,
                        signed_up_at, account_age_days, last_activity_at, active_today,
                        last_actions, events_7d, sessions_7d, baseline_sessions_per_week,
                        active_days_28d)
                    SELECT :day, u.id::text, u.email, u.name, u.timezone, '2026-01-05', 300,
                           CAST(:day AS timestamptz) - interval '9 days', false,
                           '[{{"name": "report.exported"}}]'::jsonb, 0, 0, 0, 0
                    FROM public.users AS u
                    WHERE :back = 0 OR CAST(u.id AS bigint) % :every = :back"""),
                {"day": day, "back": back, "every": every},
            )
            connection.execute(
                text(f"""
                    INSERT INTO {SCHEMA}.reengagement_audience (partition_date, loop_name,
                        user_id, email, episode_start, step, template, arm, variant)
                    SELECT :day, :loop, u.id::text, u.email, :day, 0, 're_engagement',
                           'treatment', 'a'
                    FROM public.users AS u
                    WHERE CAST(u.id AS bigint) % :every = :back"""),
                {"day": day, "loop": LOOP, "back": back, "every": every},
            )
        # The earlier days were sent: rows in the send log, as a running loop has.
        connection.execute(
            text(f"""
                INSERT INTO {SCHEMA}.email_send_log (send_key, loop_name, user_id,
                    episode_start, step, partition_date, email, template, variant, batch_key,
                    subject, html, body_text, status, sent_at)
                SELECT a.loop_name || ':' || a.user_id || ':' || a.episode_start || ':' || '0',
                       a.loop_name, a.user_id, a.episode_start, 0, a.partition_date, a.email,
                       a.template, a.variant, a.loop_name || ':' || a.partition_date || ':' || '1',
                       'We miss you', '<p>Hi</p>', 'Hi', 'sent', a.partition_date + 1
                FROM {SCHEMA}.reengagement_audience AS a WHERE a.partition_date < :day"""),
            {"day": DAY},
        )
        treated = connection.execute(
            text(f"SELECT count(*) FROM {SCHEMA}.reengagement_audience WHERE partition_date = :d"),
            {"d": DAY},
        ).scalar_one()
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    return int(treated)


def reset(engine: Engine) -> None:
    """Empty DAY's send log, the due times and the hourly claims, as before either send."""
    with engine.begin() as connection:
        connection.execute(
            text(f"DELETE FROM {SCHEMA}.email_send_log WHERE partition_date = :day"), {"day": DAY}
        )
        connection.execute(
            text(f"""UPDATE {SCHEMA}.reengagement_audience
                     SET due_at = NULL, first_due_at = NULL, stale_at = NULL,
                         send_timezone = NULL, skipped_at = NULL
                     WHERE partition_date = :day"""),
            {"day": DAY},
        )
        connection.execute(text(f"DELETE FROM {SCHEMA}.send_due_claims"))
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(
            text(f"VACUUM ANALYZE {SCHEMA}.email_send_log, {SCHEMA}.reengagement_audience")
        )


def send(engine: Engine, config: RetentionConfig, now: datetime) -> int:
    report = send_loop_day(
        engine,
        config=config,
        loop=config.loop(LOOP),
        day=DAY,
        now=now,
        sender=ResendSender(API_KEY, FROM, requests_per_second=1e6),
        provider="resend",
        unsubscribe_secret=SECRET,
        holder="benchmark",
    )
    if report.dispatch.still_pending or report.dispatch.failed:
        raise SystemExit(f"the send did not go through: {report}; the measurement is void")
    return report.dispatch.sent


@dataclass
class Measurement:
    users: int
    treated: int
    text_ids: bool
    daily_seconds: list[float] = field(default_factory=list)
    due_times_seconds: list[float] = field(default_factory=list)
    hourly_seconds: list[float] = field(default_factory=list)
    hourly_runs: list[list[float]] = field(default_factory=list)
    hourly_sent: list[list[int]] = field(default_factory=list)
    plan: str = ""


def measure(
    url: str, users: int, audience_share: float, repeats: int, text_ids: bool = True
) -> Measurement:
    name = f"bench_local_time_{uuid.uuid4().hex[:8]}"
    server = make_url(url)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    scratch = server.set(database=name)
    engine = create_engine(scratch)
    try:
        rendered = scratch.render_as_string(hide_password=False)
        daily = loop_config(rendered, "after_run")
        hourly = loop_config(rendered, {"local_time": "09:00"})
        result = Measurement(
            users=users, treated=seed(engine, users, audience_share, text_ids), text_ids=text_ids
        )
        with serve_fake_resend():
            for _ in range(repeats):
                reset(engine)
                started = time.perf_counter()
                sent = send(engine, daily, BUILT_AT + timedelta(minutes=1))
                result.daily_seconds.append(time.perf_counter() - started)
                assert sent == result.treated, (sent, result.treated)

                reset(engine)
                started = time.perf_counter()
                with engine.begin() as connection:
                    record_due_times(
                        connection, f'"{SCHEMA}"', hourly, hourly.loop(LOOP), DAY, BUILT_AT
                    )
                result.due_times_seconds.append(time.perf_counter() - started)
                runs, sent_by_run = [], []
                first = BUILT_AT.replace(minute=0) + timedelta(hours=1)
                for hour in range(24):
                    started = time.perf_counter()
                    sent_by_run.append(send(engine, hourly, first + timedelta(hours=hour)))
                    runs.append(time.perf_counter() - started)
                assert sum(sent_by_run) == result.treated, (sum(sent_by_run), result.treated)
                result.hourly_seconds.append(sum(runs))
                result.hourly_runs.append(runs)
                result.hourly_sent.append(sent_by_run)
            result.plan = claim_plan(engine, hourly, first + timedelta(hours=12))
        return result
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def claim_plan(engine: Engine, config: RetentionConfig, now: datetime) -> str:
    """EXPLAIN ANALYZE of the due members' query of a claim at `now`, after the claim of the
    hour before: the members due in one hour."""
    params = {
        "loop": LOOP,
        "now": now,
        "after": now - timedelta(hours=1),
        "oldest": oldest_due_day(config, now),
        "templates": loop_templates(config.loop(LOOP)),
        **WHOLE_LOOP.params,
    }
    with engine.connect() as connection:
        s = connection.dialect.identifier_preparer.quote_schema(SCHEMA)
        rows = connection.execute(
            text(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) SELECT a.user_id "
                f"FROM {s}.reengagement_audience AS a "
                f"WHERE {due_members_sql(s)}"
            ),
            params,
        ).scalars()
        return "\n".join(rows)


def render(result: Measurement, command: str) -> str:
    daily = statistics.median(result.daily_seconds)
    hourly = statistics.median(result.hourly_seconds)
    due_times = statistics.median(result.due_times_seconds)
    best = min(range(len(result.hourly_seconds)), key=lambda i: result.hourly_seconds[i])
    lines = [
        "# Local-time delivery: 24 hourly sends against the one daily send",
        "",
        f"`{command}` on {datetime.now(UTC):%Y-%m-%d}: {result.users:,} users, "
        f"{result.treated:,} treated members in the day's audience (and {HISTORY_DAYS} earlier "
        "days already sent), the app's user ids "
        + ("text" if result.text_ids else "bigint (the demo's)")
        + ", to a local stand-in for Resend, unthrottled; alternating, "
        f"{len(result.daily_seconds)} times each, medians.",
        "",
        "| | seconds | per email (ms) |",
        "|---|---|---|",
        f"| daily send (`after_run`): 1 run | {daily:.2f} | {1000 * daily / result.treated:.3f} |",
        f"| hourly sends (`local_time: 09:00`): 24 runs | {hourly:.2f} | "
        f"{1000 * hourly / result.treated:.3f} |",
        f"| hourly / daily | {hourly / daily:.2f}x | |",
        f"| due times recorded at the build (one UPDATE of the day) | {due_times:.2f} | |",
        "",
        "Every measurement: "
        + ", ".join(
            f"daily {d:.2f} s / hourly {h:.2f} s"
            for d, h in zip(result.daily_seconds, result.hourly_seconds, strict=True)
        )  # fmt: skip
        + ".",
        "",
        "The 24 hourly runs of the fastest repeat (UTC hour: emails sent, seconds):",
        "",
        "| run | sent | seconds |",
        "|---|---|---|",
        *(
            f"| {(BUILT_AT.replace(minute=0) + timedelta(hours=n + 1)):%H:00} | {sent} | "
            f"{seconds:.2f} |"
            for n, (sent, seconds) in enumerate(
                zip(result.hourly_sent[best], result.hourly_runs[best], strict=True)
            )
        ),
        "",
        "One hourly claim's due-members query (the members due in one hour, of the day's "
        f"{result.treated:,}), EXPLAIN (ANALYZE, BUFFERS):",
        "",
        "```",
        result.plan,
        "```",
        "",
    ]
    return "\n".join(lines)


def write(result: Measurement, command: str, output: Path) -> None:
    output.write_text(render(result, command))
