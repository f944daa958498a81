"""Who gets which step of a loop on one day, and who is held out, in SQL.

An episode starts on the day a user first matches the loop's condition and ends on the day they
come back (any activity after the episode started). During an episode the loop's steps fall due
`delay` days after its start; each step reaches a user at most once per episode. A user who came
back may start a new episode only `cooldown_days` after the last one ended.

Every eligible user is assigned, by a hash of their id and the loop's salt, to the treatment or
the holdout arm (both are recorded; only treatment is emailed) and to a template variant. The
exclusions (suppressed address, no usable address, frequency cap) apply to both arms alike, so
the holdout stays comparable.

Unless the loop says `adjust: false`, the audience follows the latest decision made before its
day (see `outcomes.decisions`): a paused step is sent to nobody, and variants get the decided
shares of the step, drawn by a hash of the user and the decision's day (the holdout's hash does
not change, so the shares never move a user between arms).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.config.models import Loop, RetentionConfig
from retention_pipeline.outcomes.decisions import decisions_in_force

EXCLUSION_REASONS = (
    "no_email",
    "suppressed",
    "frequency_cap",
    "cooldown",
    "step_paused",
    "no_step_due",
)

# The holdout draw: a user's bucket in [0, 10000) from their id and the loop's salt, whatever the
# step or decision, so a user stays in one arm. (The demo generator draws its true email effect
# with it too.)
HOLDOUT_BUCKET_SQL = (
    "('x' || substr(md5({user_id} || '/' || {salt}), 1, 8))::bit(32)::bigint % 10000"
)

# A usable address: something@domain.tld with no spaces. Anything else is not worth a bounce.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


@dataclass(frozen=True)
class AudienceSummary:
    candidates: int
    treatment: int
    holdout: int
    returned: int
    by_step: dict[int, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)


def _undo_day(connection: Connection, s: str, loop: str, day: date) -> None:
    """Take back what a previous run of this day did, so the day can be built again."""
    params = {"loop": loop, "day": day}
    connection.execute(
        text(
            f"DELETE FROM {s}.reengagement_audience WHERE partition_date = :day "
            "AND loop_name = :loop"
        ),
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


def _variant_plan(connection: Connection, schema: str, loop: Loop, day: date) -> list[dict]:
    """Per step: whether it is paused, the variants with the upper end of each one's share of
    [0, 1), and the day of the decision that set the shares (None for an even split)."""
    decisions = decisions_in_force(connection, schema, loop, day) if loop.adjust else {}
    plan = []
    for index, step in enumerate(loop.steps):
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
                "paused": bool(decision and decision.paused),
                "bounds": bounds,
                "decided_on": decided_on,
            }
        )
    return plan


def build_audience(
    connection: Connection, *, config: RetentionConfig, loop: Loop, day: date, candidates: set[str]
) -> AudienceSummary:
    """Replace the loop's audience of `day`, in the caller's transaction."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    _undo_day(connection, s, loop.name, day)
    connection.execute(
        text("CREATE TEMP TABLE audience_candidates (user_id text PRIMARY KEY) ON COMMIT DROP")
    )
    connection.execute(
        text("INSERT INTO audience_candidates SELECT DISTINCT unnest(CAST(:ids AS text[]))"),
        {"ids": sorted(candidates)},
    )
    params = {
        "loop": loop.name,
        "day": day,
        "tz": config.timezone,
        "cooldown": loop.cooldown_days,
        "cap": config.email.frequency_cap_days,
        "delays": [step.delay_days for step in loop.steps],
        "templates": [step.action.template for step in loop.steps],
        "salt": loop.holdout_salt,
        "holdout_per_10000": round(loop.holdout.fraction * 10000),
        "email_pattern": EMAIL_PATTERN,
        "plan": json.dumps(_variant_plan(connection, config.database.schema_, loop, day)),
    }
    returned = connection.execute(
        text(f"""
        UPDATE {s}.episodes AS e SET ended_on = :day, end_reason = 'returned'
        FROM {s}.user_activity_snapshot AS snap
        WHERE e.loop_name = :loop AND e.ended_on IS NULL AND e.started_on < :day
          AND snap.partition_date = :day AND snap.user_id = e.user_id
          AND snap.last_activity_at >= (e.started_on + 1)::timestamp AT TIME ZONE :tz"""),
        params,
    ).rowcount
    cooldown = connection.execute(
        text(f"""
        SELECT count(*) FROM audience_candidates AS c
        WHERE NOT EXISTS (SELECT FROM {s}.episodes AS e WHERE e.loop_name = :loop
                            AND e.user_id = c.user_id AND e.ended_on IS NULL)
          AND EXISTS (SELECT FROM {s}.episodes AS e WHERE e.loop_name = :loop
                        AND e.user_id = c.user_id AND e.ended_on > :day - :cooldown)"""),
        params,
    ).scalar_one()
    connection.execute(
        text(f"""
        INSERT INTO {s}.episodes (loop_name, user_id, started_on)
        SELECT :loop, c.user_id, :day FROM audience_candidates AS c
        WHERE NOT EXISTS (SELECT FROM {s}.episodes AS e WHERE e.loop_name = :loop
                            AND e.user_id = c.user_id
                            AND (e.ended_on IS NULL OR e.ended_on > :day - :cooldown))"""),
        params,
    )
    counts = connection.execute(
        text(f"""
        WITH open_steps AS (
            SELECT e.user_id, e.started_on, i - 1 AS step,
                   (CAST(:plan AS jsonb) -> (i - 1) ->> 'paused')::boolean AS paused
            FROM {s}.episodes AS e
            CROSS JOIN generate_subscripts(CAST(:delays AS int[]), 1) AS i
            WHERE e.loop_name = :loop AND e.ended_on IS NULL
              AND (CAST(:delays AS int[]))[i] <= :day - e.started_on
              AND NOT EXISTS (
                  SELECT FROM {s}.reengagement_audience AS past
                  WHERE past.loop_name = :loop AND past.user_id = e.user_id
                    AND past.episode_start = e.started_on AND past.step = i - 1)
        ),
        due AS (
            SELECT e.user_id, e.started_on,
                   (SELECT min(o.step) FROM open_steps AS o WHERE o.user_id = e.user_id
                      AND NOT o.paused) AS step,
                   EXISTS (SELECT FROM open_steps AS o WHERE o.user_id = e.user_id AND o.paused)
                       AS paused_step_due
            FROM {s}.episodes AS e
            WHERE e.loop_name = :loop AND e.ended_on IS NULL
        ),
        judged AS (
            SELECT due.*, snap.email,
                CASE
                    WHEN due.step IS NULL AND due.paused_step_due THEN 'step_paused'
                    WHEN due.step IS NULL THEN 'no_step_due'
                    WHEN snap.email IS NULL OR snap.email !~ :email_pattern THEN 'no_email'
                    WHEN EXISTS (SELECT FROM {s}.email_suppressions AS sup
                                 WHERE sup.email = lower(snap.email)
                                   AND (sup.loop_name IS NULL OR sup.loop_name = :loop))
                        THEN 'suppressed'
                    WHEN EXISTS (SELECT FROM {s}.reengagement_audience AS recent
                                 WHERE recent.user_id = due.user_id
                                   AND recent.partition_date > :day - :cap
                                   AND recent.partition_date <= :day) THEN 'frequency_cap'
                END AS excluded,
                {HOLDOUT_BUCKET_SQL.format(user_id="due.user_id", salt=":salt")} AS arm_bucket,
                ('x' || substr(md5(due.user_id || '/' || :salt || '/variant'
                    || coalesce('/' || (CAST(:plan AS jsonb) -> due.step ->> 'decided_on'), '')),
                    1, 8))::bit(32)::bigint / 4294967296.0 AS variant_position
            FROM due
            LEFT JOIN {s}.user_activity_snapshot AS snap
                ON snap.partition_date = :day AND snap.user_id = due.user_id
        ),
        inserted AS (
            INSERT INTO {s}.reengagement_audience (partition_date, loop_name, user_id, email,
                episode_start, step, template, arm, variant, decided_on)
            SELECT :day, :loop, j.user_id, j.email, j.started_on, j.step,
                   (CAST(:templates AS text[]))[j.step + 1],
                   CASE WHEN j.arm_bucket < :holdout_per_10000 THEN 'holdout' ELSE 'treatment' END,
                   (SELECT bound ->> 0
                    FROM jsonb_array_elements(CAST(:plan AS jsonb) -> j.step -> 'bounds') AS bound
                    WHERE (bound ->> 1)::float8 > j.variant_position
                    ORDER BY (bound ->> 1)::float8 LIMIT 1),
                   (CAST(:plan AS jsonb) -> j.step ->> 'decided_on')::date
            FROM judged AS j WHERE j.excluded IS NULL
            ORDER BY j.user_id
            RETURNING arm, step
        )
        SELECT 'arm:' || arm, count(*) FROM inserted GROUP BY arm
        UNION ALL SELECT 'step:' || step, count(*) FROM inserted GROUP BY step
        UNION ALL SELECT 'excluded:' || excluded, count(*) FROM judged
                  WHERE excluded IS NOT NULL GROUP BY excluded"""),
        params,
    ).all()
    tallies = dict(counts)
    excluded = {reason: int(tallies.get(f"excluded:{reason}", 0)) for reason in EXCLUSION_REASONS}
    excluded["cooldown"] = int(cooldown)
    return AudienceSummary(
        candidates=len(candidates),
        treatment=int(tallies.get("arm:treatment", 0)),
        holdout=int(tallies.get("arm:holdout", 0)),
        returned=int(returned),
        by_step={
            int(key.split(":")[1]): int(value)
            for key, value in tallies.items()
            if key.startswith("step:")
        },
        excluded=excluded,
    )
