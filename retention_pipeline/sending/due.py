"""The hourly send of a loop whose members have due times of their own (`send_at: {local_time}`,
or quiet hours): claim exactly the members due since the previous claim.

The audience build gives each member `due_at` (see `audience.build.record_due_times`). Each
send run of the loop's shard claims the members due after the shard's `claimed_through` and by
`now`, and moves `claimed_through` to `now` in the same transaction: the partial index on
(loop, due time) reads only those members, never the day's whole audience, and a member is read
by one claim only (the send log's keys would keep a second from sending twice anyway). Of them:

- those whose email would go out after `stale_at` (`email.max_delay` past their local send time:
  the runs stopped for a day) are skipped, `skipped_at` set, and counted, never sent late;
- those for whom `now` is in their quiet hours (a run that comes late) get the end of them as
  their new due time, later than `claimed_through`, so a later claim reads them again; skipped
  when that end is past `stale_at`;
- the others are rendered and claimed in the send log, in the batches of their audience day.

A run's `now` is when it runs, not the hour it was launched for: a Dagster re-run of an earlier
hour's run passes its own `datetime.now`, so it claims what is due since the mark and by then,
as the current hour's tick would. A run whose `now` is not after `claimed_through` (its clock
behind the last claim's) claims nothing. Either way each member is read by one claim, at or
after their due time.

The audience build of a loop takes the loop's claim lock (`send_log.take_claim_turn`) before it
undoes the day and gives due times past the loop's latest `claimed_through`, so a claim never
moves the mark past members whose build has not committed yet.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, text

from retention_pipeline.config.models import Loop, RetentionConfig
from retention_pipeline.segments.calendar import SEND_WINDOW_DAYS
from retention_pipeline.sending.compose import day_end, loop_templates
from retention_pipeline.sending.send_log import claim_rows, take_claim_turn
from retention_pipeline.sending.shards import WHOLE_LOOP, Shard, user_in_shard


@dataclass(frozen=True)
class DueClaim:
    """What one claim of due members did, by audience day."""

    after: datetime | None
    """The shard's `claimed_through` before this claim (None: it never claimed)."""
    by: datetime
    """This claim's `now`: members due after `after` and by `by` were read."""
    claimed: Counter[date] = field(default_factory=Counter)
    deferred: Counter[date] = field(default_factory=Counter)
    """Due while their quiet hours held: waiting for the end of them."""
    skipped: Counter[date] = field(default_factory=Counter)
    """Not sent within `email.max_delay` of their local send time: never sent."""

    def __str__(self) -> str:
        since = self.after.isoformat() if self.after else "ever"
        sentence = (
            f"members due after {since} and by {self.by.isoformat()}: "
            f"{self.claimed.total()} claimed"
        )
        if self.deferred:
            sentence += f", {self.deferred.total()} waiting for the end of their quiet hours"
        if self.skipped:
            sentence += f", {self.skipped.total()} skipped (not sent within email.max_delay)"
        return sentence


def oldest_due_day(config: RetentionConfig, now: datetime) -> date:
    """The oldest audience day whose members may still be due at `now`: a day's members are due
    within about a day of its build, and stay sendable for `email.max_delay` after that."""
    spare_days = math.ceil(config.email.max_delay_interval / timedelta(days=1))
    today = now.astimezone(ZoneInfo(config.timezone)).date()
    return today - timedelta(days=SEND_WINDOW_DAYS + spare_days)


def claim_floor(config: RetentionConfig, *, after: datetime | None, now: datetime) -> datetime:
    """The due time a claim at `now` reads after: the shard's `claimed_through`, or for a shard
    that never claimed (new, or the shard count changed) the start of `oldest_due_day`, whose
    members, built after it, are due after that: a range of the index either way, never the
    loop's whole history."""
    if after is not None:
        return after
    return day_end(oldest_due_day(config, now) - timedelta(days=1), config.timezone)


def claim_due(
    engine: Engine,
    *,
    config: RetentionConfig,
    loop: Loop,
    now: datetime,
    unsubscribe_secret: str,
    shard: Shard = WHOLE_LOOP,
) -> DueClaim:
    """Claim, in one transaction, the loop's members of `shard` due since the shard's previous
    claim and by `now` (see the module's docstring), and return what became of them."""
    schema = config.database.schema_
    with engine.begin() as connection:
        s = connection.dialect.identifier_preparer.quote_schema(schema)
        key = {"loop": loop.name, "shard_index": shard.index, "shard_count": shard.count}
        # Not while a build of the loop's audience is stamping due times: they may be earlier
        # than this claim's `now`, and must not fall behind the mark unread.
        take_claim_turn(connection, schema, loop.name)
        connection.execute(
            text(f"""
                INSERT INTO {s}.send_due_claims (loop_name, send_shard, shard_count,
                    claimed_through)
                VALUES (:loop, :shard_index, :shard_count, NULL)
                ON CONFLICT DO NOTHING"""),
            key,
        )
        after = connection.execute(
            text(f"""
                SELECT claimed_through FROM {s}.send_due_claims
                WHERE loop_name = :loop AND send_shard = :shard_index
                  AND shard_count = :shard_count
                FOR UPDATE"""),
            key,
        ).scalar_one()
        if after is not None and after >= now:
            return DueClaim(after=after, by=now)
        params = {
            "loop": loop.name,
            "now": now,
            "after": claim_floor(config, after=after, now=now),
            "oldest": oldest_due_day(config, now),
            "templates": loop_templates(loop),
            **shard.params,
        }
        due = due_members_sql(s)
        skipped = Counter(
            connection.execute(
                text(f"""
                    UPDATE {s}.reengagement_audience AS a SET skipped_at = :now
                    WHERE {due} AND a.stale_at <= :now
                    RETURNING a.partition_date"""),
                params,
            ).scalars()
        )
        deferred: Counter[date] = Counter()
        quiet = config.email.quiet_hours
        if quiet is not None:
            moved = connection.execute(
                text(f"""
                    WITH held AS (
                        SELECT a.partition_date, a.user_id,
                               {s}.next_local_time(:now, :quiet_to, a.send_timezone) AS quiet_end
                        FROM {s}.reengagement_audience AS a
                        WHERE {due}
                          AND {s}.in_quiet_hours(:now, a.send_timezone, :quiet_from, :quiet_to)
                    )
                    UPDATE {s}.reengagement_audience AS a
                    SET due_at = CASE WHEN held.quiet_end < a.stale_at THEN held.quiet_end
                                      ELSE a.due_at END,
                        skipped_at = CASE WHEN held.quiet_end >= a.stale_at THEN :now END
                    FROM held
                    WHERE a.loop_name = :loop AND a.partition_date = held.partition_date
                      AND a.user_id = held.user_id
                    RETURNING a.partition_date, a.skipped_at IS NOT NULL"""),
                {**params, "quiet_from": quiet.start, "quiet_to": quiet.end},
            ).all()
            for day, was_skipped in moved:
                (skipped if was_skipped else deferred)[day] += 1
        claimed: Counter[date] = Counter()
        for day, rows in _due_rows_by_day(connection, s, due, params).items():
            claimed[day] = claim_rows(
                connection,
                config=config,
                loop=loop,
                day=day,
                rows=rows,
                unsubscribe_secret=unsubscribe_secret,
                shard=shard,
            )
        connection.execute(
            text(f"""
                UPDATE {s}.send_due_claims
                SET claimed_through = greatest(claimed_through, :now), updated_at = now()
                WHERE loop_name = :loop AND send_shard = :shard_index
                  AND shard_count = :shard_count"""),
            {**key, "now": now},
        )
    return DueClaim(after=after, by=now, claimed=claimed, deferred=deferred, skipped=skipped)


def due_members_sql(s: str) -> str:
    """The condition on `a` (the audience) of a treated member of the loop's shard, due after
    `:after` and by `:now`, at a step of `:templates` (the loop's as configured: a step taken
    out since is sent to nobody), not claimed nor skipped yet; written so the partial index on
    (loop, due time) answers it."""
    return f"""a.loop_name = :loop AND a.arm = 'treatment' AND a.due_at IS NOT NULL
              AND a.due_at <= :now AND a.due_at > :after
              AND a.partition_date >= :oldest AND a.skipped_at IS NULL
              AND a.template = ANY(CAST(:templates AS text[]))
              AND {user_in_shard("a.user_id")}
              AND NOT EXISTS (
                  SELECT FROM {s}.email_send_log AS log
                  WHERE log.loop_name = a.loop_name AND log.user_id = a.user_id
                    AND log.episode_start = a.episode_start AND log.step = a.step)"""


def _due_rows_by_day(
    connection: Connection, s: str, due: str, params: dict
) -> dict[date, list[dict]]:
    """The due members as `compose.treatment_rows` gives them, by audience day, in user-id
    order."""
    result = connection.execute(
        text(f"""
            SELECT a.partition_date, a.user_id, a.email, a.episode_start, a.step, a.template,
                   a.variant, snap.name, snap.timezone, snap.signed_up_at,
                   snap.last_activity_at, coalesce(snap.last_actions, '[]'::jsonb) AS last_actions
            FROM {s}.reengagement_audience AS a
            LEFT JOIN {s}.user_activity_snapshot AS snap
                ON snap.partition_date = a.partition_date AND snap.user_id = a.user_id
            WHERE {due}
            ORDER BY a.partition_date, a.user_id"""),
        params,
    )
    by_day: dict[date, list[dict]] = {}
    for row in result.mappings():
        record = dict(row)
        by_day.setdefault(record.pop("partition_date"), []).append(record)
    return by_day


@dataclass(frozen=True)
class DueHour:
    """The members of one audience day due in one hour (UTC), and where each stands."""

    hour: datetime
    sent: int
    failed: int
    claimed: int
    """In the send log, not confirmed yet (a retry sends them)."""
    waiting: int
    """Not claimed yet: not due yet, or due and waiting for the next send."""
    skipped: int


def due_hours(connection: Connection, *, schema: str, loop_name: str, day: date) -> list[DueHour]:
    """Per hour of due time, the loop's treated members of `day` and where each stands."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""
            SELECT date_trunc('hour', a.due_at, 'UTC') AS hour,
                   count(*) FILTER (WHERE log.status = 'sent') AS sent,
                   count(*) FILTER (WHERE log.status = 'failed') AS failed,
                   count(*) FILTER (WHERE log.status = 'claimed') AS claimed,
                   count(*) FILTER (WHERE log.status IS NULL AND a.skipped_at IS NULL)
                       AS waiting,
                   count(*) FILTER (WHERE log.status IS NULL AND a.skipped_at IS NOT NULL)
                       AS skipped
            FROM {s}.reengagement_audience AS a
            LEFT JOIN {s}.email_send_log AS log
                ON log.loop_name = a.loop_name AND log.user_id = a.user_id
               AND log.episode_start = a.episode_start AND log.step = a.step
            WHERE a.loop_name = :loop AND a.partition_date = :day AND a.arm = 'treatment'
              AND a.due_at IS NOT NULL
            GROUP BY 1 ORDER BY 1"""),
        {"loop": loop_name, "day": day},
    ).mappings()
    return [DueHour(**row) for row in rows]


def due_hours_markdown(hours: list[DueHour]) -> str:
    """A table of `due_hours` for the send job's metadata."""
    lines = [
        "| due (UTC) | sent | failed | claimed | waiting | skipped (stale) |",
        "|---|---|---|---|---|---|",
    ]
    for each in hours:
        lines.append(
            f"| {each.hour.astimezone(UTC):%Y-%m-%d %H:00} | {each.sent} | {each.failed} | "
            f"{each.claimed} | {each.waiting} | {each.skipped} |"
        )
    return "\n".join(lines)


PREVIEW_MEMBERS = 20


def due_preview(connection: Connection, *, schema: str, loop_name: str, day: date) -> str:
    """A Markdown table of the loop's treated members of `day` (the first `PREVIEW_MEMBERS` by
    due time, one per timezone first, so the table shows the spread): each one's timezone and
    due time in UTC and in their own time."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""
            WITH first_per_zone AS (
                SELECT DISTINCT ON (a.send_timezone) a.user_id
                FROM {s}.reengagement_audience AS a
                WHERE a.loop_name = :loop AND a.partition_date = :day AND a.arm = 'treatment'
                  AND a.due_at IS NOT NULL
                ORDER BY a.send_timezone, a.due_at, a.user_id
            )
            SELECT a.user_id, a.send_timezone,
                   to_char(a.due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') AS due_utc,
                   to_char(a.due_at AT TIME ZONE a.send_timezone, 'YYYY-MM-DD HH24:MI')
                       AS due_local,
                   to_char(a.stale_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') AS stale_utc
            FROM {s}.reengagement_audience AS a
            LEFT JOIN first_per_zone AS first ON first.user_id = a.user_id
            WHERE a.loop_name = :loop AND a.partition_date = :day AND a.arm = 'treatment'
              AND a.due_at IS NOT NULL
            ORDER BY first.user_id IS NULL, a.due_at, a.user_id
            LIMIT :limit"""),
        {"loop": loop_name, "day": day, "limit": PREVIEW_MEMBERS},
    ).all()
    lines = [
        "| user | timezone | due (UTC) | due (local) | skipped if not sent by (UTC) |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(str(value) for value in row)} |" for row in rows),
    ]
    return "\n".join(lines)
