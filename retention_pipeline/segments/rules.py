"""Engagement segments: exactly one per user, loop and day, with the reason, in SQL.

Rules, first match wins (thresholds per loop, `SegmentRules`):

1. churned: subscription canceled and no activity for `churned_after_days`
2. new: signed up fewer than `new_user_days` days ago
3. never_activated: older than that and no activity at all
4. resurrected: active today after `dormant_after_days` or more without activity
5. dormant: no activity for `dormant_after_days`, or sessions in the last 7 days fell by
   `dormant_session_drop` or more against a baseline of at least
   `minimum_baseline_sessions_per_week`
6. at_risk: sessions fell by `at_risk_session_drop` or more against such a baseline
7. active: everyone else

"Sessions" are what the day's snapshot counted (`activity.baseline`): visits or logins (auth
sessions), and the reason names which.

Loops with the same thresholds share one classification: a day's users are classified and
written once per set of thresholds (`classified_segments`, under the first loop that has them),
and `segment_rules_used` says whose rows each loop reads; the view `engagement_segments` shows
one row per user, loop and day, as it always has.
"""

from __future__ import annotations

import json
from datetime import date

import pandas as pd
from sqlalchemy import Connection, text

from retention_pipeline.config.models import SEGMENTS, Loop, SegmentRules
from retention_pipeline.database.day_partitions import analyze_day_partition, empty_day_partition

# The day partitions of the classified segments (`database.day_partitions`).
CLASSIFIED_SEGMENTS = "classified_segments"

CLASSIFY = """
    WITH bounds AS (
        SELECT CAST(:day AS date) AS day,
               (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz AS day_end,
               CAST(:day AS date)::timestamp AT TIME ZONE :tz AS day_start
    ),
    counted AS (
        -- What the snapshot's session figures count, in the reasons' words. A snapshot that
        -- records no build (written by hand) counted logins, as every snapshot before visits.
        SELECT CASE coalesce((SELECT build.counted FROM {schema}.snapshot_builds AS build
                              WHERE build.partition_date = CAST(:day AS date)), 'logins')
                   WHEN 'visits' THEN 'visits'
                   ELSE 'auth sessions'
               END AS what
    ),
    measured AS (
        SELECT snap.*,
               floor(extract(epoch FROM b.day_end - coalesce(snap.last_activity_at,
                                                             snap.signed_up_at)) / 86400)::integer
                   AS days_inactive,
               b.day_end - snap.last_activity_at
                   >= make_interval(days => CAST(:dormant_days AS integer)) AS inactive_long,
               b.day_start - snap.previous_activity_at
                   >= make_interval(days => CAST(:dormant_days AS integer)) AS was_away,
               -- Above zero whatever the minimum: none in the last 7 days against none before
               -- is no drop.
               snap.baseline_sessions_per_week > 0
                   AND snap.baseline_sessions_per_week >= CAST(:minimum_baseline AS numeric)
                   AS has_baseline,
               CASE WHEN snap.baseline_sessions_per_week > 0
                    THEN round(100 * (1 - snap.sessions_7d / snap.baseline_sessions_per_week))
               END AS drop_percent
        FROM {schema}.user_activity_snapshot AS snap, bounds AS b
        WHERE snap.partition_date = CAST(:day AS date)  -- the bound value: one partition read
    ),
    -- The day before's segment as the loops read it then: of a loop that had these thresholds
    -- already, else of the first loop there was (thresholds changed, or not known before
    -- revision 0019). Read once and merged in user order: looked up user by user, the day
    -- before's rows took 3 s of the 7.6 s classification at 1M users.
    previous AS MATERIALIZED (
        SELECT p.user_id, p.segment, p.entered_on FROM {schema}.classified_segments AS p
        WHERE p.partition_date = CAST(:day AS date) - 1
          AND p.rules_loop = (
              SELECT used.rules_loop FROM {schema}.segment_rules_used AS used
              WHERE used.partition_date = CAST(:day AS date) - 1
                AND used.loop_name = ANY(CAST(:loops AS text[]))
              ORDER BY used.thresholds IS NOT DISTINCT FROM CAST(:thresholds AS jsonb) DESC,
                       array_position(CAST(:loops AS text[]), used.loop_name)
              LIMIT 1)
    ),
    classified AS (
        SELECT
            CASE
                WHEN m.subscription_status = 'canceled'
                     AND m.days_inactive >= CAST(:churned_days AS integer) THEN 'churned'
                WHEN m.account_age_days < CAST(:new_days AS integer) THEN 'new'
                WHEN m.last_activity_at IS NULL
                     AND m.account_age_days >= CAST(:never_days AS integer) THEN 'never_activated'
                WHEN m.active_today AND m.was_away THEN 'resurrected'
                WHEN m.inactive_long THEN 'dormant'
                WHEN m.has_baseline AND m.sessions_7d * 100
                     <= m.baseline_sessions_per_week * (100 - CAST(:dormant_drop AS numeric))
                    THEN 'dormant'
                WHEN m.has_baseline AND m.sessions_7d * 100
                     <= m.baseline_sessions_per_week * (100 - CAST(:at_risk_drop AS numeric))
                    THEN 'at_risk'
                WHEN m.last_activity_at IS NULL THEN 'new'
                ELSE 'active'
            END AS segment,
            m.*
        FROM measured AS m
    )
    INSERT INTO {schema}.classified_segments
        (partition_date, rules_loop, user_id, segment, reason, entered_on)
    SELECT CAST(:day AS date), CAST(:rules_loop AS text), c.user_id, c.segment,
        CASE c.segment
            WHEN 'churned' THEN format('subscription canceled; no activity for %s days',
                                       c.days_inactive)
            WHEN 'new' THEN format('signed up %s day(s) ago', c.account_age_days)
            WHEN 'never_activated' THEN format('signed up %s days ago; no activity yet',
                                               c.account_age_days)
            WHEN 'resurrected' THEN format('active today after %s days away',
                floor(extract(epoch FROM c.last_activity_at - c.previous_activity_at) / 86400))
            WHEN 'dormant' THEN CASE
                WHEN c.inactive_long THEN format('no activity for %s days (threshold %s)',
                                                 c.days_inactive, CAST(:dormant_days AS integer))
                ELSE format('%s down %s%% (%s in the last 7 days vs %s a week before)',
                            counted.what, c.drop_percent, c.sessions_7d,
                            c.baseline_sessions_per_week)
                END
            WHEN 'at_risk' THEN format(
                '%s down %s%% (%s in the last 7 days vs %s a week before)',
                counted.what, c.drop_percent, c.sessions_7d, c.baseline_sessions_per_week)
            ELSE format('active %s of the last 28 days', c.active_days_28d)
        END,
        CASE WHEN previous.segment = c.segment THEN previous.entered_on ELSE CAST(:day AS date) END
    FROM classified AS c
    CROSS JOIN counted
    LEFT JOIN previous ON previous.user_id = c.user_id
    -- In key order, each row lands at the end of the partition's primary key, not at random.
    ORDER BY c.user_id
"""


def classification(rules: SegmentRules) -> tuple:
    """What decides a user's segment: loops equal in it share one classification (the jump
    warning only judges the counts)."""
    return tuple(sorted(rules.model_dump(exclude={"dormant_jump_warning_factor"}).items()))


def classify_day(
    connection: Connection, schema: str, loops: list[Loop], timezone: str, day: date
) -> dict[str, dict[str, int]]:
    """Write `day`'s segments of the loops into its emptied partition, once per set of
    thresholds, and record whose rows each loop reads; counts per loop and segment.

    `entered_on` carries over from the previous day's row, so run days in order (the schedule
    and single-run backfills do). Loops that share thresholds share that history too: the day
    before's rows of one of them that had the same thresholds then (the first listed), else of
    the first listed that existed."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    connection.execute(
        text(f"DELETE FROM {s}.segment_rules_used WHERE partition_date = :day"), {"day": day}
    )
    sharing: dict[tuple, list[Loop]] = {}
    for loop in loops:
        sharing.setdefault(classification(loop.segments), []).append(loop)
    counts: dict[str, dict[str, int]] = {}
    for first, *others in sharing.values():
        rules = first.segments
        names = [loop.name for loop in (first, *others)]
        thresholds = json.dumps(dict(classification(rules)))
        connection.execute(
            text(f"""INSERT INTO {s}.segment_rules_used
                         (partition_date, loop_name, rules_loop, thresholds)
                     SELECT :day, loop_name, :rules_loop, CAST(:thresholds AS jsonb)
                     FROM unnest(CAST(:loops AS text[])) AS loop_name"""),
            {"day": day, "rules_loop": first.name, "loops": names, "thresholds": thresholds},
        )
        connection.execute(
            text(CLASSIFY.format(schema=s)),
            {
                "day": day,
                "rules_loop": first.name,
                "loops": names,
                "thresholds": thresholds,
                "tz": timezone,
                "dormant_days": rules.dormant_after_days,
                "dormant_drop": round(rules.dormant_session_drop * 100, 4),
                "at_risk_drop": round(rules.at_risk_session_drop * 100, 4),
                "minimum_baseline": rules.minimum_baseline_sessions_per_week,
                "new_days": rules.new_user_days,
                "never_days": rules.never_activated_after_days,
                "churned_days": rules.churned_after_days,
            },
        )
        shared = segment_counts(connection, schema, first.name, day)
        counts.update(dict.fromkeys(names, shared))
    return counts


def build_day_segments(
    connection: Connection, schema: str, loops: list[Loop], timezone: str, day: date
) -> dict[str, dict[str, int]]:
    """Replace every segment of `day` with the loops' segments, in the caller's transaction:
    the day's partition is emptied, not deleted from row by row. Counts per loop and segment."""
    empty_day_partition(connection, schema, CLASSIFIED_SEGMENTS, day)
    counts = classify_day(connection, schema, loops, timezone, day)
    analyze_day_partition(connection, schema, CLASSIFIED_SEGMENTS, day)
    return counts


def forget_rules_used_before(connection: Connection, schema: str, first_kept: date) -> None:
    """Drop which rules the loops read on days whose segments are gone (`database.keep_days`)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    connection.execute(
        text(f"DELETE FROM {s}.segment_rules_used WHERE partition_date < :first_kept"),
        {"first_kept": first_kept},
    )


def segment_counts(
    connection: Connection, schema: str, loop_name: str, day: date
) -> dict[str, int]:
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""SELECT segment, count(*) FROM {s}.engagement_segments
                 WHERE partition_date = :day AND loop_name = :loop GROUP BY segment"""),
        {"day": day, "loop": loop_name},
    ).all()
    counts = dict.fromkeys(SEGMENTS, 0)
    counts.update({segment: count for segment, count in rows})
    return counts


def segment_examples(
    connection: Connection, schema: str, day: date, per_segment: int = 3
) -> pd.DataFrame:
    """A few users of each segment with their reason: a preview for people. Whichever rows the
    segment index finds first (ranking a million rows to pick the lowest ids took seconds)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""
            SELECT used.loop_name, picked.segment, picked.user_id, picked.reason,
                   picked.entered_on
            FROM {s}.segment_rules_used AS used
            CROSS JOIN unnest(CAST(:segments AS text[])) AS wanted (segment)
            CROSS JOIN LATERAL (
                SELECT seg.segment, seg.user_id, seg.reason, seg.entered_on
                FROM {s}.classified_segments AS seg
                WHERE seg.partition_date = :day AND seg.rules_loop = used.rules_loop
                  AND seg.segment = wanted.segment
                LIMIT :per_segment
            ) AS picked
            WHERE used.partition_date = :day
            ORDER BY used.loop_name, picked.segment, picked.user_id"""),
        {"day": day, "segments": list(SEGMENTS), "per_segment": per_segment},
    ).all()
    return pd.DataFrame(rows, columns=["loop", "segment", "user_id", "reason", "entered_on"])
