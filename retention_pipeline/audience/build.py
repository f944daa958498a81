"""Who gets which step of a loop on one day, and who is held out, in SQL.

An episode starts on the day a user first matches the loop's condition and ends on the day they
come back (any activity after the episode started). During an episode the loop's steps fall due
`delay` days after its start; each step reaches a user at most once per episode. A user who came
back may start a new episode only `cooldown_days` after the last one ended.

One mailbox is one person (`recipients.addresses.normalize_address`: blanks around the address
removed, lower case). Users who share a mailbox are one person to the loop: while one of them is
in an episode the others start none (counted as `shared_address`), nor while one is in its
cooldown (`cooldown`), and of several starting on the same day only the lowest user id (as text)
does (`shared_address`). A mailbox gets at most one step of a loop a day (the earliest
episode's, then the lowest user id's), the frequency cap counts mailboxes as well as users, and
a suppression covers the mailbox.

Every eligible user is assigned, by a hash of their mailbox and the loop's salt, to the treatment
or the holdout arm (both are recorded; only treatment is emailed), so users sharing a mailbox can
never land in different arms; an episode keeps the arm of its first step, whatever the address
or the holdout fraction became since. A later step (the second on) of a treated episode is
withheld, by a hash of the mailbox, the salt and the step, from the loop's `step_holdout` share:
recorded with the arm `withheld`, not emailed. A withheld step counts as passed, as a sent one
does: the user's next step comes at its delay, and the frequency cap counts it, so recipients and
withheld users of a step go on alike but for that one email. Each user also gets a template
variant. The exclusions (suppressed address, no usable address, shared address, frequency cap)
apply to every arm alike, so the holdout and the withheld stay comparable on the day; but the
suppressions and the cap come partly from the loop's own earlier emails, which only treated
mailboxes got, so a mailbox's later episodes keep fewer of the treated who left (README,
Suppressions).

Each episode belongs to the experiment period its loop was in on the day it started
(`audience.experiment`): its steps (delays, templates, variants) and its holdout draw are that
period's design until it ends, whatever the configuration says since, and each of its assignments
carries the period.

Unless the loop says `adjust: false`, the audience follows the latest decision made before its
day for the step's id in the episode's period (see `outcomes.decisions`): a paused step is sent
to nobody, and variants get the decided shares of the step, drawn by a hash of the user and the
decision's day (the holdout's hash does not change, so the shares never move a user between
arms).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import Connection, text

from retention_pipeline.audience.experiment import (
    ExperimentPeriod,
    open_periods,
    period_loop,
    record_period,
)
from retention_pipeline.config.models import LearnedSendTime, Loop, RetentionConfig
from retention_pipeline.database.batch import tune_for_batch
from retention_pipeline.outcomes.decisions import decisions_in_force
from retention_pipeline.recipients.addresses import (
    EMAIL_ADDRESS_SQL_PATTERN,
    mailbox_sql,
    trimmed_address_sql,
)
from retention_pipeline.recipients.suppressions import (
    any_suppressed_by_hash,
    covers_loop_sql,
    personal_suppression_sql,
    suppressed_by_hash_sql,
)
from retention_pipeline.segments.calendar import within_send_window
from retention_pipeline.sending.compose import day_end
from retention_pipeline.sending.send_log import take_claim_turn

EXCLUSION_REASONS = (
    "no_email",
    "suppressed",
    "shared_address",
    "frequency_cap",
    "cooldown",
    "step_paused",
    "no_step_due",
)

# The holdout draw: a mailbox's bucket in [0, 10000) from the mailbox and the loop's salt,
# whatever the step, decision or user, so one person stays in one arm. (The demo generator draws
# its true email effect with it too.)
HOLDOUT_BUCKET_SQL = (
    "('x' || substr(md5({mailbox} || '/' || {salt}), 1, 8))::bit(32)::bigint % 10000"
)

# The plan (`_variant_plan`) the episodes of a period follow, by the SQL expression of the period.
PLAN = "(CAST(:plans AS jsonb) -> {period}::text)"

# A usable address, once trimmed: something@domain.tld with no spaces. Anything else is not worth
# a bounce.


@dataclass(frozen=True)
class AudienceSummary:
    candidates: int
    treatment: int
    holdout: int
    withheld: int
    returned: int
    by_step: dict[int, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    simulated: bool = False


# The send-time draw of a loop that learns its send times: a user's bucket in [0, 10000) from the
# user and the loop's salt, independent of the holdout's (which hashes the mailbox).
SEND_TIME_BUCKET_SQL = (
    "('x' || substr(md5({user} || '/' || {salt} || '/send_time'), 1, 8))::bit(32)::bigint % 10000"
)
# The rollup's 5-minute slots of one hour.
SLOTS_PER_HOUR = 12

# The step holdout's draw for a later step of a treated episode: the holdout's hash under a salt
# of the step's own, so it is independent of the holdout and of every other step's draw (step k's
# recipients and withheld users had the same earlier steps, in the same proportions). Like the
# holdout it is the mailbox's: users sharing one stay together.
STEP_HOLDOUT_BUCKET_SQL = HOLDOUT_BUCKET_SQL.format(
    mailbox="{mailbox}", salt="({salt} || '/step_holdout/' || {step})"
)


def _undo_day(connection: Connection, s: str, loop: str, day: date) -> None:
    """Take back what a previous run of this day did, so the day can be built again: a day
    none of whose emails was claimed when the build began (`_emails_began`). A day whose
    audience rows are taken back is recorded (`audience_days_rebuilt`): a send run's claim
    committing meanwhile leaves its emails without their rows, and the frequency cap then
    reads them from the send log."""
    params = {"loop": loop, "day": day}
    # The episodes whose steps of the day are taken back no longer know their next step.
    connection.execute(
        text(f"""
            WITH taken_back AS (
                DELETE FROM {s}.reengagement_audience
                WHERE partition_date = :day AND loop_name = :loop
                RETURNING user_id, episode_start
            ),
            rebuilt AS (
                INSERT INTO {s}.audience_days_rebuilt (loop_name, partition_date)
                SELECT :loop, :day WHERE EXISTS (SELECT FROM taken_back)
                ON CONFLICT DO NOTHING
            )
            UPDATE {s}.episodes AS e SET next_step_on = NULL
            FROM taken_back
            WHERE e.loop_name = :loop AND e.user_id = taken_back.user_id
              AND e.started_on = taken_back.episode_start"""),
        params,
    )
    connection.execute(
        text(f"""DELETE FROM {s}.episodes AS e
                 WHERE e.loop_name = :loop AND e.started_on = :day AND NOT EXISTS (
                     SELECT FROM {s}.email_send_log AS sent
                     WHERE sent.loop_name = e.loop_name AND sent.user_id = e.user_id
                       AND sent.episode_start = e.started_on)"""),
        params,
    )
    connection.execute(
        text(f"""UPDATE {s}.episodes AS e SET ended_on = NULL, end_reason = NULL
                 WHERE e.loop_name = :loop AND e.ended_on = :day AND NOT EXISTS (
                     SELECT FROM {s}.episodes AS later
                     WHERE later.loop_name = e.loop_name AND later.user_id = e.user_id
                       AND later.started_on > e.started_on)"""),
        params,
    )


# The due fields of an audience member (see `record_due_times`) and what send runs made of them.
DUE_FIELDS = ("due_at", "first_due_at", "stale_at", "skipped_at", "send_timezone", "send_time_arm")


def _assigned_on_the_day_sql(s: str, user_id: str) -> str:
    """SQL: whether the user `user_id` (an SQL expression) has the loop's row of the day, on a
    day kept (`_emails_began`)."""
    return f"""EXISTS (SELECT FROM {s}.reengagement_audience AS assigned
                       WHERE assigned.partition_date = :day AND assigned.loop_name = :loop
                         AND assigned.user_id = {user_id})"""


def _assignment_counts(
    connection: Connection, s: str, loop: str, day: date
) -> list[tuple[str, int]]:
    """The loop's assignments of `day` per arm and per step, keyed as the build counts them."""
    return [
        tuple(row)
        for row in connection.execute(
            text(f"""
                SELECT 'arm:' || arm, count(*) FROM {s}.reengagement_audience
                WHERE partition_date = :day AND loop_name = :loop GROUP BY arm
                UNION ALL
                SELECT 'step:' || step, count(*) FROM {s}.reengagement_audience
                WHERE partition_date = :day AND loop_name = :loop GROUP BY step"""),
            {"loop": loop, "day": day},
        )
    ]


def _emails_began(connection: Connection, s: str, loop: str, day: date) -> bool:
    """Whether any email of the loop's audience of `day` was claimed (its send began)."""
    return bool(
        connection.execute(
            text(f"""SELECT EXISTS (SELECT FROM {s}.email_send_log
                     WHERE loop_name = :loop AND partition_date = :day)"""),
            {"loop": loop, "day": day},
        ).scalar()
    )


def _keep_due_times(connection: Connection, s: str, loop: str, day: date) -> None:
    """Keep, in the temporary table `audience_due_kept`, the due fields of the day's members
    from its previous build, before `_undo_day` deletes them: a rebuild must not forget who
    was skipped as stale nor move anyone's due time (`_restore_due_times`)."""
    connection.execute(
        text(f"""
            CREATE TEMP TABLE audience_due_kept ON COMMIT DROP AS
            SELECT user_id, episode_start, step, {", ".join(DUE_FIELDS)}
            FROM {s}.reengagement_audience
            WHERE partition_date = :day AND loop_name = :loop AND due_at IS NOT NULL"""),
        {"loop": loop, "day": day},
    )


def _restore_due_times(connection: Connection, s: str, loop: str, day: date) -> None:
    """Give the members of the rebuilt day who were in its previous build, for the same step of
    the same episode, the due fields they had; the others keep the fresh ones."""
    connection.execute(
        text(f"""
            UPDATE {s}.reengagement_audience AS a
            SET {", ".join(f"{name} = kept.{name}" for name in DUE_FIELDS)}
            FROM audience_due_kept AS kept
            WHERE a.partition_date = :day AND a.loop_name = :loop
              AND a.user_id = kept.user_id AND a.episode_start = kept.episode_start
              AND a.step = kept.step"""),
        {"loop": loop, "day": day},
    )


def _variant_plan(
    connection: Connection,
    schema: str,
    loop: Loop,
    period: ExperimentPeriod,
    day: date,
    current: int,
) -> dict:
    """What the episodes of `period` follow on `day`: its holdout, and per step of its design
    its template and delay, whether it is paused, the variants with the upper end of each one's
    share of [0, 1), and the day of the decision that set the shares (None for an even split).
    A step paused by the period in force (`current`) is paused for an earlier period's open
    episodes too: they would get it until they end, and only the new period measures it."""
    measured = period_loop(loop, period)
    configured = {step.action.template for step in loop.steps}
    decisions = (
        decisions_in_force(connection, schema, measured, day, period.number) if loop.adjust else {}
    )
    paused_later = (
        {
            index
            for index, decision in decisions_in_force(
                connection, schema, measured, day, current
            ).items()
            if decision.paused
        }
        if loop.adjust and current > period.number
        else set()
    )
    plan = []
    for index, step in enumerate(measured.steps):
        variants = step.action.variants
        decision = decisions.get(index)
        shares = [1 / len(variants)] * len(variants)
        decided_on = None
        if decision is not None and set(decision.variant_shares) == set(variants):
            shares = [decision.variant_shares[variant] for variant in variants]
            decided_on = decision.decided_on.isoformat()
        upper, bounds = 0.0, []
        for variant, share in zip(variants, shares, strict=True):
            upper += share / sum(shares)
            bounds.append([variant, upper])
        bounds[-1][1] = 1.0  # every hash in [0, 1) finds a variant, whatever the rounding
        plan.append(
            {
                "template": step.action.template,
                "delay_days": step.delay_days,
                # A step taken out of the configuration is sent to nobody any more.
                "paused": bool(decision and decision.paused)
                or index in paused_later
                or step.action.template not in configured,
                "bounds": bounds,
                "decided_on": decided_on,
            }
        )
    holdout = period.design["holdout"]
    return {
        "salt": holdout["salt"],
        "holdout_per_10000": round(holdout["fraction"] * 10000),
        "step_holdout_per_10000": round(period.design["step_holdout"] * 10000),
        "steps": plan,
    }


def _simulated(
    connection: Connection, s: str, loop: str, day: date, now: datetime | None, timezone: str
) -> bool:
    """Whether the audience of `day`, built at `now`, is a simulation: no email of it can go out
    (the day is older than the send window, as in a backfill), and no earlier build of the day
    was an experiment (re-materializing a day that was emailed keeps it one). A day built within
    the window stays an experiment even when its send comes late or never: intention to treat,
    `emailed` says who got an email. `now` None: the day is built as its own morning does."""
    if now is None or within_send_window(day, now, timezone):
        return False
    return not connection.execute(
        text(f"""SELECT EXISTS (SELECT FROM {s}.reengagement_audience
                 WHERE loop_name = :loop AND partition_date = :day AND NOT simulated)"""),
        {"loop": loop, "day": day},
    ).scalar_one()


def _open_episodes_due(connection: Connection, s: str, params: dict) -> None:
    """The temporary table `audience_due`: per open episode of the loop with a step due by the
    day, or whose next step is not known (`episodes.next_step_on`; those started today
    included), its period, whether its first assignment was to the holdout (`held_out`, None
    before one), its earliest step due and not had yet (None when none is, or only paused ones:
    `paused_step_due`), and the day its next step falls due: as recorded (`known_next_step_on`),
    as it stands (`next_step_on`) and once that step is had (`next_step_after`); NULL when none
    is left. Joins and aggregates that hash, linear in the episodes read, then statistics of its
    own, so the statement that judges them plans for their real number whatever the episodes'
    statistics say (this transaction just started some). Episodes that have had every step are
    not read: a loop keeps one open for every user who never came back."""
    read = """e.loop_name = :loop AND e.ended_on IS NULL
              AND (e.next_step_on IS NULL OR e.next_step_on <= :day)"""
    connection.execute(
        text(f"""
        CREATE TEMP TABLE audience_due ON COMMIT DROP AS
        WITH open_episodes AS (
            SELECT e.user_id, e.started_on, e.period, e.next_step_on AS known_next_step_on
            FROM {s}.episodes AS e
            WHERE {read}
        ),
        past AS (
            -- An episode has one assignment a day: its first is the one of its first day. The
            -- episodes are read from their table, not from `open_episodes`: PostgreSQL knows
            -- nothing of a WITH query's values, so it hashed the loop's whole history of
            -- assignments to look a few episodes up (0.2 s of the shipped loop at 1M users).
            SELECT had.user_id, array_agg(had.step) AS steps,
                   min(had.partition_date) AS first_day,
                   min(had.partition_date) FILTER (WHERE had.arm = 'holdout') AS first_held_out
            FROM {s}.episodes AS e
            JOIN {s}.reengagement_audience AS had ON had.loop_name = :loop
                AND had.user_id = e.user_id AND had.episode_start = e.started_on
            WHERE {read}
            GROUP BY had.user_id
        )
        SELECT o.user_id, o.started_on, o.period, o.known_next_step_on,
               CASE WHEN past.user_id IS NOT NULL
                    THEN past.first_held_out IS NOT DISTINCT FROM past.first_day END AS held_out,
               open_steps.step, open_steps.paused_step_due,
               next_steps.next_step_on, next_steps.next_step_after
        FROM open_episodes AS o
        LEFT JOIN past ON past.user_id = o.user_id
        CROSS JOIN LATERAL (
            SELECT (min(planned.i - 1) FILTER (
                        WHERE NOT (planned.step ->> 'paused')::boolean))::int AS step,
                   coalesce(bool_or((planned.step ->> 'paused')::boolean), false)
                       AS paused_step_due
            FROM jsonb_array_elements({PLAN.format(period="o.period")} -> 'steps')
                WITH ORDINALITY AS planned(step, i)
            WHERE (planned.step ->> 'delay_days')::int <= :day - o.started_on
              AND NOT coalesce(planned.i - 1 = ANY(past.steps), false)
        ) AS open_steps
        CROSS JOIN LATERAL (
            SELECT min(o.started_on + (planned.step ->> 'delay_days')::int) AS next_step_on,
                   min(o.started_on + (planned.step ->> 'delay_days')::int) FILTER (
                       WHERE planned.i - 1 IS DISTINCT FROM open_steps.step) AS next_step_after
            FROM jsonb_array_elements({PLAN.format(period="o.period")} -> 'steps')
                WITH ORDINALITY AS planned(step, i)
            WHERE NOT coalesce(planned.i - 1 = ANY(past.steps), false)
        ) AS next_steps"""),
        params,
    )
    connection.execute(text("ANALYZE audience_due"))


def record_due_times(
    connection: Connection,
    s: str,
    config: RetentionConfig,
    loop: Loop,
    day: date,
    built_at: datetime,
) -> None:
    """Give each member of the loop's audience of `day` its due time: the first `local_time`
    after `built_at` in the member's timezone (the snapshot's, unless PostgreSQL does not know
    it: then the loops'), or `built_at` itself for a loop sending after its run; moved to the
    end of the member's quiet hours when it falls in them; `first_due_at` keeps it (a late send
    run may move `due_at`). `stale_at` is `email.max_delay` after the local time, whatever quiet
    hours did: past it, the email is skipped, never sent late.

    A loop that learns its send times (`send_at: {learn: true}`) draws each member, by a hash of
    the user and the loop's salt, into the `fixed` share (the loop's `local_time`) or the
    `learned` rest: the hour of the loops' day they were active on most days of the last `weeks`
    (the rollup's 5-minute slots; the earliest such hour on a tie), or the local time for one
    never active then."""
    send_at = loop.send_at
    quiet = config.email.quiet_hours
    learn = isinstance(send_at, LearnedSendTime)
    if send_at == "after_run":
        intended = "m.built_at"
    elif learn:
        # The usual hour is one of the rollup's days, in the loops' timezone.
        intended = f"""CASE WHEN usual.hour IS NOT NULL
                            THEN {s}.next_local_time(m.built_at, make_time(usual.hour, 0, 0), :tz)
                            ELSE {s}.next_local_time(m.built_at, :at, m.zone) END"""
    else:
        intended = f"{s}.next_local_time(m.built_at, :at, m.zone)"
    due = (
        f"""CASE WHEN {s}.in_quiet_hours(i.intended, i.zone, :quiet_from, :quiet_to)
                 THEN {s}.next_local_time(i.intended, :quiet_to, i.zone)
                 ELSE i.intended END"""
        if quiet is not None
        else "i.intended"
    )
    fixed_bucket = SEND_TIME_BUCKET_SQL.format(user="a.user_id", salt=":salt")
    usual_hours = f"""
        active_hours AS (
            SELECT d.user_id, h.hour, count(*) AS days
            FROM members AS m
            JOIN {s}.activity_daily AS d
                ON d.user_id = m.user_id AND d.day BETWEEN :since AND :day
            CROSS JOIN generate_series(0, 23) AS h(hour)
            WHERE m.send_time_arm = 'learned'
              AND bit_count(substring(d.active_slots FROM h.hour * {SLOTS_PER_HOUR} + 1
                                      FOR {SLOTS_PER_HOUR})) > 0
            GROUP BY d.user_id, h.hour
        ),
        usual AS (
            SELECT DISTINCT ON (user_id) user_id, hour FROM active_hours
            ORDER BY user_id, days DESC, hour
        ),"""
    connection.execute(
        text(f"""
        WITH known_zones AS (SELECT name FROM pg_timezone_names),
        claimed AS (
            -- Due times from past the loop's claims' marks (a claim may have committed with a
            -- later `now` than this build's, or on a host whose clock is ahead), or the next
            -- claims, which read only past their mark, would never read these members.
            SELECT max(claimed_through) + interval '1 microsecond' AS through
            FROM {s}.send_due_claims WHERE loop_name = :loop
        ),
        members AS (
            SELECT a.user_id, coalesce(known.name, :tz) AS zone,
                   greatest(CAST(:built_at AS timestamptz), claimed.through) AS built_at,
                   {
            f"CASE WHEN {fixed_bucket} < :fixed_per_10000 THEN 'fixed' ELSE 'learned' END"
            if learn
            else "CAST(NULL AS text)"
        } AS send_time_arm
            FROM {s}.reengagement_audience AS a
            LEFT JOIN {s}.user_activity_snapshot AS snap
                ON snap.partition_date = a.partition_date AND snap.user_id = a.user_id
            -- PostgreSQL reads zone names in any case ('europe/paris'); stored as it spells them.
            LEFT JOIN known_zones AS known ON lower(known.name) = lower(snap.timezone)
            CROSS JOIN claimed
            WHERE a.partition_date = :day AND a.loop_name = :loop
        ),
        {usual_hours if learn else ""}
        intended AS (
            SELECT m.user_id, m.zone, m.send_time_arm, {intended} AS intended
            FROM members AS m
            {"LEFT JOIN usual ON usual.user_id = m.user_id" if learn else ""}
        )
        UPDATE {s}.reengagement_audience AS a
        SET send_timezone = i.zone, due_at = {due}, first_due_at = {due},
            stale_at = i.intended + CAST(:max_delay AS interval),
            send_time_arm = i.send_time_arm
        FROM intended AS i
        WHERE a.partition_date = :day AND a.loop_name = :loop AND a.user_id = i.user_id"""),
        {
            "day": day,
            "loop": loop.name,
            "tz": config.timezone,
            "built_at": built_at,
            "at": None if send_at == "after_run" else send_at.at,
            "quiet_from": quiet.start if quiet else None,
            "quiet_to": quiet.end if quiet else None,
            "max_delay": config.email.max_delay_interval,
            "salt": loop.holdout_salt,
            "fixed_per_10000": round(send_at.fixed_share * 10000) if learn else None,
            "since": day - timedelta(days=7 * send_at.weeks - 1) if learn else None,
        },
    )


def build_audiences(
    connection: Connection,
    *,
    config: RetentionConfig,
    loops: Sequence[Loop],
    day: date,
    candidates: Mapping[str, set[str]],
    now: datetime | None = None,
) -> dict[str, AudienceSummary]:
    """Replace the audiences of `loops` on `day`, loop by loop, each from its `candidates` (by
    loop name: the users its condition selects), in the caller's transaction (whose rest runs
    under the batch settings, `tune_for_batch`: no JIT; and ANALYZE samples a tenth of its
    default). The day's snapshot of the users they read is read once for all of them
    (`_read_people`), not once per loop: finding them scans the whole day's snapshot, at a
    million users a fifth of what a loop cost. Built at `now` outside the send window, a loop's
    assignments are `simulated` (see `_simulated`): history that never enters the performance,
    the decisions or the variant shares. Raises DesignChangeRefused when a loop's design differs
    from the one the day (or a later one) was assigned under (see `audience.experiment`)."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    tune_for_batch(connection)
    # The temporary tables' statistics are for their row counts and the share of each kind of
    # row, which a tenth of the default sample tells as well: ANALYZE of the default sample
    # took 0.4 s of the build at 1M users, this one a sixth of that.
    connection.execute(text("SET LOCAL default_statistics_target = 10"))
    _read_people(connection, s, day, loops, candidates)
    _read_recent_audiences(
        connection,
        s,
        day,
        loops,
        config,
        sends=now is None or within_send_window(day, now, config.timezone),
    )
    # A mailbox is hashed only while the suppression list holds any hash.
    any_hashed = bool(any_suppressed_by_hash(connection, config.database.schema_))
    return {
        loop.name: _build_loop(
            connection,
            config=config,
            loop=loop,
            day=day,
            candidates=candidates[loop.name],
            now=now,
            any_hashed=any_hashed,
        )
        for loop in loops
    }


def build_audience(
    connection: Connection,
    *,
    config: RetentionConfig,
    loop: Loop,
    day: date,
    candidates: set[str],
    now: datetime | None = None,
) -> AudienceSummary:
    """`build_audiences` of one loop."""
    return build_audiences(
        connection,
        config=config,
        loops=[loop],
        day=day,
        candidates={loop.name: candidates},
        now=now,
    )[loop.name]


def _read_people(
    connection: Connection,
    s: str,
    day: date,
    loops: Sequence[Loop],
    candidates: Mapping[str, set[str]],
) -> None:
    """The temporary tables `audience_conditions`, each loop's candidates (sent once: the
    loops' union and each loop's set were sent apart, a third of a second more at 1M users),
    and `audience_people`: the day's snapshot of the users the loops' builds read (their
    candidates, and the users of their episodes open or in their cooldown, or ended on the day,
    which a build of the day taken back reopens), with the address an email goes to (trimmed),
    its mailbox, and whether it is usable; read once, with statistics of its own. Every build
    joins it by user: a user it holds needlessly changes nothing. Each set of users is looked up
    by a hash of its own, not their union made distinct first (0.2 s less at 1M users)."""
    connection.execute(
        text("CREATE TEMP TABLE audience_conditions (loop_name text, user_id text) ON COMMIT DROP")
    )
    for loop in loops:
        # Sent as one JSON text: an array parameter's elements are quoted one by one in Python
        # (0.5 s for the three loops' 310,000 candidates at 1M users).
        connection.execute(
            text("""INSERT INTO audience_conditions
                    SELECT :loop, jsonb_array_elements_text(CAST(:ids AS jsonb))"""),
            {"loop": loop.name, "ids": json.dumps(list(candidates[loop.name]), ensure_ascii=False)},
        )
    connection.execute(text("ANALYZE audience_conditions"))
    connection.execute(
        text(f"""
        CREATE TEMP TABLE audience_people ON COMMIT DROP AS
        SELECT trimmed.user_id, trimmed.last_activity_at, trimmed.address,
               {mailbox_sql("trimmed.address")} AS mailbox,
               trimmed.address ~ :email_pattern AS usable
        FROM (
            SELECT snap.user_id, snap.last_activity_at,
                   {trimmed_address_sql("snap.email")} AS address
            FROM {s}.user_activity_snapshot AS snap
            WHERE snap.partition_date = :day
              AND (snap.user_id IN (SELECT user_id FROM audience_conditions)
                   OR snap.user_id IN (
                       SELECT e.user_id FROM {s}.episodes AS e
                       WHERE e.loop_name = ANY(CAST(:loops AS text[]))
                         AND (e.ended_on IS NULL OR e.ended_on >= :day - :cooldown)))
            -- Kept apart (OFFSET 0), so the address is trimmed once, not once per column.
            OFFSET 0
        ) AS trimmed"""),
        {
            "day": day,
            "loops": [loop.name for loop in loops],
            "cooldown": max((loop.cooldown_days for loop in loops), default=0),
            "email_pattern": EMAIL_ADDRESS_SQL_PATTERN,
        },
    )
    connection.execute(text("ANALYZE audience_people"))


def _emails_of_days_rebuilt(s: str) -> str:
    """The emails of the days built again (`audience_days_rebuilt`, as `rebuilt`) that went
    out or may have: claimed, sent, or failed once their request was made, as `audience_recent`
    rows; its WHERE is open for the caller to narrow."""
    return f"""
        SELECT log.partition_date, log.loop_name, log.user_id,
               CASE WHEN log.email <> '' THEN {mailbox_sql("log.email")} END, TRUE
        FROM {s}.audience_days_rebuilt AS rebuilt
        JOIN {s}.email_send_log AS log
          ON log.loop_name = rebuilt.loop_name AND log.partition_date = rebuilt.partition_date
        WHERE (log.status <> 'failed' OR log.first_attempt_at IS NOT NULL)"""


def _read_recent_audiences(
    connection: Connection,
    s: str,
    day: date,
    loops: Sequence[Loop],
    config: RetentionConfig,
    *,
    sends: bool,
) -> None:
    """The temporary tables `audience_recent`: who was in an audience of any loop, or was
    emailed by one, in the frequency cap's days up to `day` (by user and by mailbox), and, for
    a build whose emails can go out (`sends`), in the cap's days after it: a day built late
    (its run missed, then launched once the next day's had emailed) sends today too. And
    `audience_erased_sent`: who was emailed in the longest of the cap's and the loops' cooldowns
    and erased since (by user: the address is gone; erasure took their episodes and audience
    rows, and an account excluded for a while comes back), read once for all the loops built.
    Each loop's build takes its audience rows of the day out of `audience_recent` when it takes
    the day back and puts the new ones in (`_build_loop`), so the next loop judges by what the
    database then holds. Reading them, mailboxes made, and finding each one once again for every
    loop took a third of a second per loop at 1M users. The emails that went out stay (`sent`):
    those of erased users, and on the days recorded in `audience_days_rebuilt` (the only days
    whose audience rows may lack an email's: taken back by a rebuild while a send run's claim
    committed, built again before rebuilds kept the days that had emails, restored by a
    reinstall, or with an erased user's email that may have been delivered) every email
    claimed, sent, or failed once its request was made (unanswered ones may have been
    delivered; those Resend refused count too). The send log is read for those days alone: its
    rows carry the rendered email, and reading every email of the cap's days cost 0.3-0.9 s at
    1M users."""
    cap_days = config.email.frequency_cap_days
    connection.execute(
        text(f"""
        CREATE TEMP TABLE audience_erased_sent ON COMMIT DROP AS
        SELECT log.partition_date, log.loop_name, log.user_id, log.sent_at
        FROM {s}.email_send_log AS log
        WHERE log.status = 'sent' AND log.email = ''
          AND log.sent_at >= (CAST(:day AS date) - :days + 1)::timestamp AT TIME ZONE :tz"""),
        {
            "day": day,
            "days": max([cap_days, *(loop.cooldown_days for loop in loops)]),
            "tz": config.timezone,
        },
    )
    connection.execute(text("ANALYZE audience_erased_sent"))
    connection.execute(
        text(f"""
        CREATE TEMP TABLE audience_recent ON COMMIT DROP AS
        SELECT recent.partition_date, recent.loop_name, recent.user_id,
               {mailbox_sql("recent.email")} AS mailbox, FALSE AS sent
        FROM {s}.reengagement_audience AS recent
        WHERE recent.partition_date > :day - :cap AND recent.partition_date <= :until
        UNION ALL
        SELECT erased.partition_date, erased.loop_name, erased.user_id, NULL, TRUE
        FROM audience_erased_sent AS erased
        WHERE erased.partition_date > :day - :cap AND erased.partition_date <= :until
        UNION ALL
        {_emails_of_days_rebuilt(s)}
          AND rebuilt.partition_date > :day - :cap AND rebuilt.partition_date <= :until"""),
        {
            "day": day,
            "cap": cap_days,
            "until": day + timedelta(days=cap_days - 1) if sends else day,
        },
    )
    connection.execute(text("ANALYZE audience_recent"))


def _build_loop(
    connection: Connection,
    *,
    config: RetentionConfig,
    loop: Loop,
    day: date,
    candidates: set[str],
    now: datetime | None,
    any_hashed: bool,
) -> AudienceSummary:
    """The loop's audience of `day`, its people read (`_read_people`); `any_hashed`: whether
    the suppression list holds a mailbox by its hash (`any_suppressed_by_hash`)."""
    schema = config.database.schema_
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    simulated = _simulated(connection, s, loop.name, day, now, config.timezone)
    period = record_period(connection, schema, config, loop, day)
    if config.sends_on_due_times(loop):
        # The loop's claims of due members wait for this build's due times (`sending.due`).
        take_claim_turn(connection, schema, loop.name)
        _keep_due_times(connection, s, loop.name, day)
    # Once the day's emails began going out, its assignments are what is measured, in both
    # arms (intention to treat): a rebuild keeps every one and adds the users new to the day.
    # Taking them back dropped emailed users who had since returned or unsubscribed (their
    # episode kept for the email), and no held-out one.
    kept = _emails_began(connection, s, loop.name, day)
    if not kept:
        _undo_day(connection, s, loop.name, day)
        connection.execute(
            text(
                "DELETE FROM audience_recent "
                "WHERE partition_date = :day AND loop_name = :loop AND NOT sent"
            ),
            {"day": day, "loop": loop.name},
        )
    kept_counts = _assignment_counts(connection, s, loop.name, day) if kept else []
    # Open episodes follow the design of the period they started in.
    followed = {p.number: p for p in open_periods(connection, schema, loop.name)}
    followed[period.number] = period
    params = {
        "loop": loop.name,
        "day": day,
        "tz": config.timezone,
        "cooldown": loop.cooldown_days,
        "period": period.number,
        "plans": json.dumps(
            {
                str(number): _variant_plan(
                    connection, schema, loop, followed[number], day, period.number
                )
                for number in followed
            }
        ),
        "simulated": simulated,
        "configured_loops": config.loop_names,
    }
    returned = connection.execute(
        text(f"""
        UPDATE {s}.episodes AS e SET ended_on = :day, end_reason = 'returned'
        FROM audience_people AS snap
        WHERE e.loop_name = :loop AND e.ended_on IS NULL AND e.started_on < :day
          AND snap.user_id = e.user_id
          AND snap.last_activity_at >= (e.started_on + 1)::timestamp AT TIME ZONE :tz"""),
        params,
    ).rowcount
    # An episode is the mailbox's: a candidate starts none while any user of that mailbox is in
    # one or in its cooldown, and of the mailbox's candidates only the lowest id starts one.
    # Candidates in an episode of their own (most of them, on a loop running for a while) are
    # set aside first, with statistics of their own: judging every recent episode's mailbox
    # took a second per loop at 1M users, and reading every recent episode of the loop a third
    # of one. Only the episodes of the candidates left and of the users of their mailboxes are
    # read (`sharing`: the users of their mailboxes, found once). Of a mailbox with one in an
    # episode, the others are held back by it, so the lowest id is taken among the candidates
    # left. A candidate without a usable address has no mailbox: nobody shares it.
    connection.execute(
        text(f"""
        CREATE TEMP TABLE audience_pending ON COMMIT DROP AS
        SELECT c.user_id, CASE WHEN snap.usable THEN snap.mailbox END AS mailbox
        FROM audience_conditions AS c
        LEFT JOIN audience_people AS snap ON snap.user_id = c.user_id
        WHERE c.loop_name = :loop AND NOT EXISTS (
            SELECT FROM {s}.episodes AS e
            WHERE e.loop_name = :loop AND e.user_id = c.user_id AND e.ended_on IS NULL)
        {f"AND NOT {_assigned_on_the_day_sql(s, 'c.user_id')}" if kept else ""}"""),
        params,
    )
    connection.execute(text("ANALYZE audience_pending"))
    held_back = connection.execute(
        text(f"""
        WITH sharing AS MATERIALIZED (
            SELECT snap.user_id, snap.mailbox FROM audience_people AS snap
            WHERE snap.mailbox IN (SELECT mailbox FROM audience_pending)
        ),
        recent_episodes AS (
            SELECT e.user_id, e.ended_on FROM {s}.episodes AS e
            WHERE e.loop_name = :loop AND (e.ended_on IS NULL OR e.ended_on > :day - :cooldown)
              AND e.user_id IN (
                  SELECT user_id FROM audience_pending UNION SELECT user_id FROM sharing)
        ),
        -- An erased user's episodes are gone; their emails' send times are what is left.
        in_cooldown AS (
            SELECT r.user_id FROM recent_episodes AS r
            WHERE r.user_id IN (SELECT user_id FROM audience_pending)
            UNION
            SELECT erased.user_id FROM audience_erased_sent AS erased
            WHERE erased.loop_name = :loop
              AND erased.sent_at >= (:day - :cooldown + 1)::timestamp AT TIME ZONE :tz
              AND erased.user_id IN (SELECT user_id FROM audience_pending)
        ),
        by_mailbox AS (
            SELECT sharing.mailbox, bool_or(r.ended_on IS NULL) AS in_episode
            FROM recent_episodes AS r
            JOIN sharing ON sharing.user_id = r.user_id
            GROUP BY 1
        ),
        judged AS (
            SELECT p.user_id,
                CASE
                    WHEN box.in_episode THEN 'shared_address'
                    WHEN own.user_id IS NOT NULL OR box.mailbox IS NOT NULL THEN 'cooldown'
                    WHEN p.user_id > min(p.user_id) OVER (PARTITION BY p.mailbox)
                        AND p.mailbox IS NOT NULL THEN 'shared_address'
                END AS held_back
            FROM audience_pending AS p
            LEFT JOIN in_cooldown AS own ON own.user_id = p.user_id
            LEFT JOIN by_mailbox AS box ON box.mailbox = p.mailbox
        ),
        started AS (
            INSERT INTO {s}.episodes (loop_name, user_id, started_on, period)
            SELECT :loop, user_id, :day, :period FROM judged WHERE held_back IS NULL
        )
        SELECT held_back, count(*) FROM judged
        WHERE held_back IN ('cooldown', 'shared_address') GROUP BY held_back"""),
        params,
    ).all()
    d_plan = PLAN.format(period="d.period")
    salt = f"({d_plan} ->> 'salt')"
    holdout_bucket = HOLDOUT_BUCKET_SQL.format(mailbox="d.mailbox", salt=salt)
    step_bucket = STEP_HOLDOUT_BUCKET_SQL.format(mailbox="d.mailbox", salt=salt, step="d.step")
    _open_episodes_due(connection, s, params)
    if kept:
        # Its members keep their step of the day: none is judged again (a later step of theirs
        # may have fallen due since, for a catch-up step given that day).
        connection.execute(
            text(
                "DELETE FROM audience_due AS due "
                f"WHERE {_assigned_on_the_day_sql(s, 'due.user_id')}"
            ),
            params,
        )
    # A bound FALSE folds the hash probe away when the statement is planned; the text stays the
    # same, for `check` to plan.
    configured = "CAST(:configured_loops AS text[])"
    hashed = suppressed_by_hash_sql(s, "snap.mailbox", ":loop", configured)
    # The loop's own emails of the day are what this build decides again, not a cap on it.
    others_sent = "NOT (recent.sent AND recent.loop_name = :loop AND recent.partition_date = :day)"
    counts = connection.execute(
        text(f"""
        WITH suppressed AS (
            SELECT DISTINCT sup.email AS mailbox FROM {s}.email_suppressions AS sup
            WHERE sup.email IS NOT NULL AND {covers_loop_sql("sup", ":loop", configured)}
        ),
        judged AS (
            SELECT due.*, snap.address AS email, snap.mailbox,
                CASE
                    WHEN snap.usable IS NOT TRUE THEN 'no_email'
                    WHEN sup.mailbox IS NOT NULL
                        OR (CAST(:any_hashed AS boolean) AND {hashed})
                        OR {personal_suppression_sql(s, "due.user_id", ":loop", configured)}
                            IS NOT NULL
                        THEN 'suppressed'
                    WHEN EXISTS (SELECT FROM audience_recent AS recent
                                 WHERE recent.user_id = due.user_id AND {others_sent})
                        OR EXISTS (SELECT FROM audience_recent AS recent
                                   WHERE recent.mailbox = snap.mailbox AND {others_sent})
                        THEN 'frequency_cap'
                END AS excluded
            FROM audience_due AS due
            LEFT JOIN audience_people AS snap ON snap.user_id = due.user_id
            LEFT JOIN suppressed AS sup ON sup.mailbox = snap.mailbox
            -- The episodes with no step due are counted, not judged (below).
            WHERE due.step IS NOT NULL
        ),
        -- One step a day per mailbox: the earliest episode's (users of one mailbox in episodes
        -- of their own predate one mailbox, one person), then the lowest user id's. Ranked and
        -- drawn among the users not excluded alone: on a loop whose due users were mostly
        -- emailed by another loop, ranking and drawing them all took 0.4 s at 1M users.
        decided AS (
            SELECT j.*,
                CASE WHEN row_number() OVER (PARTITION BY j.mailbox
                          ORDER BY j.started_on, j.user_id) > 1
                         THEN 'shared_address'
                END AS reason,
                ('x' || substr(md5(j.user_id || '/' || ({PLAN.format(period="j.period")}
                    ->> 'salt') || '/variant' || coalesce('/' || ({PLAN.format(period="j.period")}
                    -> 'steps' -> j.step ->> 'decided_on'), '')),
                    1, 8))::bit(32)::bigint / 4294967296.0 AS variant_position
            FROM judged AS j WHERE j.excluded IS NULL
        ),
        inserted AS (
            INSERT INTO {s}.reengagement_audience (partition_date, loop_name, user_id, email,
                episode_start, step, template, arm, variant, decided_on, period, simulated)
            SELECT :day, :loop, d.user_id, d.email, d.started_on, d.step,
                   {d_plan} -> 'steps' -> d.step ->> 'template',
                   CASE
                       -- An episode keeps the arm of its first step (a withheld step is one of
                       -- a treated episode).
                       WHEN coalesce(
                           d.held_out,
                           {holdout_bucket} < ({d_plan} ->> 'holdout_per_10000')::int)
                           THEN 'holdout'
                       WHEN d.step > 0
                           AND {step_bucket} < ({d_plan} ->> 'step_holdout_per_10000')::int
                           THEN 'withheld'
                       ELSE 'treatment'
                   END,
                   (SELECT bound ->> 0
                    FROM jsonb_array_elements({d_plan} -> 'steps' -> d.step -> 'bounds') AS bound
                    WHERE (bound ->> 1)::float8 > d.variant_position
                    ORDER BY (bound ->> 1)::float8 LIMIT 1),
                   ({d_plan} -> 'steps' -> d.step ->> 'decided_on')::date,
                   d.period,
                   :simulated
            FROM decided AS d WHERE d.reason IS NULL
            ORDER BY d.user_id
            RETURNING user_id, email, arm, step
        ),
        recorded AS (
            INSERT INTO audience_recent (partition_date, loop_name, user_id, mailbox, sent)
            SELECT :day, :loop, user_id, {mailbox_sql("email")}, FALSE FROM inserted
        ),
        -- The day each episode read has its next step due (`infinity` once it had every one),
        -- where that changed: a step given today, or not known before.
        remembered AS (
            UPDATE {s}.episodes AS e
            SET next_step_on = coalesce(
                CASE WHEN given.user_id IS NULL THEN due.next_step_on
                     ELSE due.next_step_after END,
                'infinity')
            FROM audience_due AS due
            LEFT JOIN inserted AS given ON given.user_id = due.user_id
            WHERE e.loop_name = :loop AND e.user_id = due.user_id
              AND e.started_on = due.started_on
              AND (due.known_next_step_on IS NULL OR given.user_id IS NOT NULL)
        )
        SELECT 'arm:' || arm, count(*) FROM inserted GROUP BY arm
        UNION ALL SELECT 'step:' || step, count(*) FROM inserted GROUP BY step
        UNION ALL SELECT 'excluded:' || reason, count(*) FROM decided
                  WHERE reason IS NOT NULL GROUP BY reason
        UNION ALL SELECT 'excluded:' || excluded, count(*) FROM judged
                  WHERE excluded IS NOT NULL GROUP BY excluded
        UNION ALL SELECT CASE WHEN paused_step_due THEN 'excluded:step_paused'
                              ELSE 'excluded:no_step_due' END, count(*)
                  FROM audience_due WHERE step IS NULL GROUP BY paused_step_due
        UNION ALL SELECT 'excluded:no_step_due', count(*) FROM {s}.episodes AS unread
                  WHERE unread.loop_name = :loop AND unread.ended_on IS NULL
                    AND unread.next_step_on > :day"""),
        {**params, "any_hashed": any_hashed},
    ).all()
    counts = [*counts, *kept_counts]
    if config.sends_on_due_times(loop) and not simulated:
        # A day built again after its send window stays an experiment, but its newcomers are
        # history, never due: due times are stamped only within the window.
        if now is None or within_send_window(day, now, config.timezone):
            built_at = now if now is not None else day_end(day, config.timezone)
            record_due_times(connection, s, config, loop, day, built_at)
        _restore_due_times(connection, s, loop.name, day)
    # The next loop makes tables of these names of its own.
    connection.execute(text("DROP TABLE audience_pending, audience_due"))
    if config.sends_on_due_times(loop):
        connection.execute(text("DROP TABLE audience_due_kept"))
    tallies: dict[str, int] = {}
    for key, count in counts:
        tallies[key] = tallies.get(key, 0) + count
    held = dict(held_back)
    excluded = {reason: int(tallies.get(f"excluded:{reason}", 0)) for reason in EXCLUSION_REASONS}
    excluded["cooldown"] = int(held.get("cooldown", 0))
    excluded["shared_address"] += int(held.get("shared_address", 0))
    return AudienceSummary(
        candidates=len(candidates),
        treatment=int(tallies.get("arm:treatment", 0)),
        holdout=int(tallies.get("arm:holdout", 0)),
        withheld=int(tallies.get("arm:withheld", 0)),
        returned=int(returned),
        by_step={
            int(key.split(":")[1]): int(value)
            for key, value in tallies.items()
            if key.startswith("step:")
        },
        excluded=excluded,
        simulated=simulated,
    )
