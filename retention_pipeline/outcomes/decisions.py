"""Adjusting a loop from its outcomes: the share of each step's treatment traffic each variant
gets, and whether a step is paused. Decided each day from the outcomes of the loop's first
window, stored with the numbers behind it, and followed by the audiences of the next days
(unless the loop says `adjust: false`).

- Variants share traffic by Thompson sampling on their treated users' returns, compared day by
  day (the shares and the base rate both move over time, so pooled counts would favour the
  variant that got the good days; see `stats.thompson_shares`), each keeping at least
  MINIMUM_VARIANT_SHARE. The holdout is drawn before and apart from the variants, so the shares
  never bias the lift. Simulated assignments have no outcomes, so they never move the shares.
- A step whose always-valid interval of the lift lies below zero, once both arms have at least
  MINIMUM_OUTCOMES_TO_PAUSE known outcomes, is paused: it is sent to nobody from the next day on,
  for the rest of the experiment period (`keep_pauses`).
  The lift is the step's own randomized comparison (see `performance`): the first step against
  the holdout, a later step's recipients against the users withheld from it, never a later step
  against the holdout, which the earlier emails made unlike the treated users still dormant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sqlalchemy import Connection, text

from retention_pipeline.audience.experiment import period_in_force, period_loop
from retention_pipeline.config.models import Loop
from retention_pipeline.outcomes.performance import (
    MINIMUM_OUTCOMES_TO_PAUSE,
    PerformanceRow,
    performance_rows,
)
from retention_pipeline.outcomes.stats import always_valid_difference, thompson_shares

MINIMUM_VARIANT_SHARE = 0.1


@dataclass(frozen=True)
class Decision:
    step: int
    decided_on: date
    variant_shares: dict[str, float]
    paused: bool
    reason: str
    evidence: dict

    def __str__(self) -> str:
        return f"step {self.step}: {self.reason}"


def harmful(
    treated_returned: ArrayLike,
    treated_outcomes: ArrayLike,
    control_returned: ArrayLike,
    control_outcomes: ArrayLike,
) -> NDArray:
    """Whether the pause rule finds a step harmful: both arms have at least
    MINIMUM_OUTCOMES_TO_PAUSE known outcomes and the always-valid interval of the lift lies
    wholly below zero. Elementwise, so a simulation can ask it of many runs at once."""
    _, upper = always_valid_difference(
        treated_returned, treated_outcomes, control_returned, control_outcomes
    )
    enough = np.minimum(treated_outcomes, control_outcomes) >= MINIMUM_OUTCOMES_TO_PAUSE
    return enough & (upper < 0)


def _seed(loop: str, step: int, day: date) -> int:
    """The same loop, step and day always draw the same shares."""
    digest = hashlib.sha256(f"{loop}/{step}/{day.isoformat()}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _variant_days(
    variants: list[str], rows: dict[str, PerformanceRow]
) -> tuple[np.ndarray, np.ndarray]:
    """Returns and known outcomes per assignment day (rows) and variant (columns)."""
    days = sorted({each.day for row in rows.values() for each in row.days})
    returned = np.zeros((len(days), len(variants)))
    finished = np.zeros((len(days), len(variants)))
    position = {each: index for index, each in enumerate(days)}
    for column, variant in enumerate(variants):
        for each in rows[variant].days if variant in rows else ():
            returned[position[each.day], column] = each.treated_returned
            finished[position[each.day], column] = each.treated_finished
    return returned, finished


def decide(loop: Loop, rows: list[PerformanceRow], day: date) -> list[Decision]:
    """Each step's decision as of `day`, from the performance rows of the loop's first window."""
    window = loop.window_days[0]
    decisions = []
    for step, definition in enumerate(loop.steps):
        variants = definition.action.variants
        at_window = [row for row in rows if row.step == step and row.window_days == window]
        whole = next((row for row in at_window if row.variant is None), None)
        by_variant = {row.variant: row for row in at_window if row.variant}
        returned = np.array(
            [by_variant[v].treatment.returned if v in by_variant else 0 for v in variants]
        )
        finished = np.array(
            [by_variant[v].treatment.finished if v in by_variant else 0 for v in variants]
        )
        returned_by_day, finished_by_day = _variant_days(variants, by_variant)
        shares = thompson_shares(
            returned_by_day,
            finished_by_day,
            minimum_share=MINIMUM_VARIANT_SHARE if len(variants) > 1 else 0,
            rng=np.random.default_rng(_seed(loop.name, step, day)),
        )
        variant_shares = {
            v: round(float(share), 4) for v, share in zip(variants, shares, strict=True)
        }
        evidence: dict = {
            "window_days": window,
            "variants": {
                v: {"returned": int(r), "outcomes": int(n)}
                for v, r, n in zip(variants, returned, finished, strict=True)
            },
        }
        paused = False
        reasons = []
        if len(variants) > 1:
            reasons.append(
                "shares "
                + ", ".join(
                    f"{v} {share:.0%} ({r}/{n} returned)"
                    for (v, share), r, n in zip(
                        variant_shares.items(), returned, finished, strict=True
                    )
                )
            )
        if whole is not None and whole.holdout.finished and whole.treatment.finished:
            lower, upper = whole.always_valid
            lift = whole.lift[0]
            control = whole.compared_with
            evidence["lift"] = {
                "compared_with": control,
                "treated_returned": whole.treatment.returned,
                "treated_outcomes": whole.treatment.finished,
                f"{control}_returned": whole.holdout.returned,
                f"{control}_outcomes": whole.holdout.finished,
                "lift": round(lift, 5),
                "always_valid_lower": round(lower, 5),
                "always_valid_upper": round(upper, 5),
            }
            if harmful(
                whole.treatment.returned,
                whole.treatment.finished,
                whole.holdout.returned,
                whole.holdout.finished,
            ):
                paused = True
                enough = min(whole.treatment.finished, whole.holdout.finished)
                reasons.insert(
                    0,
                    f"paused: lift {100 * lift:+.1f} points against the {control}, always-valid "
                    f"95% interval {100 * lower:+.1f} to {100 * upper:+.1f} after {enough}+ "
                    "outcomes per arm",
                )
        decisions.append(
            Decision(
                step=step,
                decided_on=day,
                variant_shares=variant_shares,
                paused=paused,
                reason="; ".join(reasons) or "one variant, not harmful",
                evidence=evidence,
            )
        )
    return decisions


def store_decisions(
    connection: Connection, schema: str, loop: Loop, day: date, decisions: list[Decision]
) -> None:
    """Replace the loop's decisions of `day`, in the experiment period in force that day (the
    first, before any), each under its step's id: `loop` has the steps the decisions' indexes
    count (the period's, `audience.experiment.period_loop`)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    period = _period_number(connection, schema, loop, day)
    connection.execute(
        text(
            f"DELETE FROM {s}.campaign_decisions "
            "WHERE loop_name = :loop AND period = :period AND decided_on = :day"
        ),
        {"loop": loop.name, "period": period, "day": day},
    )
    for decision in decisions:
        connection.execute(
            text(f"""
                INSERT INTO {s}.campaign_decisions (loop_name, period, step_id, step, decided_on,
                    variant_shares, paused, reason, evidence)
                VALUES (:loop, :period, :step_id, :step, :day, CAST(:shares AS jsonb), :paused,
                        :reason, CAST(:evidence AS jsonb))"""),
            {
                "loop": loop.name,
                "period": period,
                "step_id": loop.steps[decision.step].action.template,
                "step": decision.step,
                "day": day,
                "shares": json.dumps(decision.variant_shares),
                "paused": decision.paused,
                "reason": decision.reason,
                "evidence": json.dumps(decision.evidence),
            },
        )


def _period_number(connection: Connection, schema: str, loop: Loop, day: date) -> int:
    """The experiment period in force on `day` (the first, before any)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return connection.execute(
        text(f"""
            SELECT coalesce(
                (SELECT period FROM {s}.experiment_periods
                 WHERE loop_name = :loop AND started_on <= :day
                 ORDER BY started_on DESC LIMIT 1), 1)"""),
        {"loop": loop.name, "day": day},
    ).scalar_one()


def keep_pauses(decisions: list[Decision], paused_since: dict[int, date]) -> list[Decision]:
    """`decisions` with each step paused on an earlier day of the period (`paused_since`, by
    step) still paused. The always-valid interval bounds wrong pauses for a rule that stops at
    its first crossing: taken back when the outcomes still pending nudge the interval over zero
    again, a harmful step went back out in about half the runs that paused it, and the pause
    no longer meant anything. A new period (a change of the loop's design) decides afresh."""
    kept = []
    for decision in decisions:
        since = paused_since.get(decision.step)
        if since is not None and not decision.paused:
            decision = Decision(
                step=decision.step,
                decided_on=decision.decided_on,
                variant_shares=decision.variant_shares,
                paused=True,
                reason=f"paused since {since.isoformat()}, for the rest of the period; today: "
                + decision.reason,
                evidence={**decision.evidence, "paused_since": since.isoformat()},
            )
        kept.append(decision)
    return kept


def _pauses_before(
    connection: Connection, schema: str, loop: Loop, period: int, day: date
) -> dict[int, date]:
    """Per step of `loop` (the period's steps), the first day before `day` it was paused on in
    `period`."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    step_ids = [step.action.template for step in loop.steps]
    rows = connection.execute(
        text(f"""
            SELECT step_id, min(decided_on) FROM {s}.campaign_decisions
            WHERE loop_name = :loop AND period = :period AND decided_on < :day AND paused
              AND step_id = ANY(CAST(:step_ids AS text[]))
            GROUP BY step_id"""),
        {
            "loop": loop.name,
            "period": period,
            "day": day,
            "step_ids": step_ids,
        },
    ).all()
    return {step_ids.index(step_id): since for step_id, since in rows}


def decisions_in_force(
    connection: Connection, schema: str, loop: Loop, day: date, period: int
) -> dict[int, Decision]:
    """Per step of `loop` (the period's steps), the latest decision made before `day`: the one
    the audience of `day` follows. Decisions are found by the step's id, so they follow a step
    wherever it moves: `period`'s own, or, for a step it has not decided yet, the latest
    decision of that step in an earlier period."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    step_ids = [step.action.template for step in loop.steps]
    rows = connection.execute(
        text(f"""
            SELECT DISTINCT ON (step_id) step_id, decided_on, variant_shares, paused, reason,
                   evidence
            FROM {s}.campaign_decisions
            WHERE loop_name = :loop AND period <= :period AND decided_on < :day
              AND step_id = ANY(CAST(:step_ids AS text[]))
            ORDER BY step_id, period DESC, decided_on DESC"""),
        {"loop": loop.name, "period": period, "day": day, "step_ids": step_ids},
    ).all()
    return {
        step_ids.index(row.step_id): Decision(
            step=step_ids.index(row.step_id),
            decided_on=row.decided_on,
            variant_shares=row.variant_shares,
            paused=row.paused,
            reason=row.reason,
            evidence=row.evidence,
        )
        for row in rows
    }


def decide_day(
    connection: Connection, schema: str, loop: Loop, day: date
) -> tuple[list[PerformanceRow], list[Decision]]:
    """The performance of the experiment period in force on `day`, measured with the period's
    own steps, and (unless the loop says `adjust: false`) the decisions it leads to, stored.
    A step with no outcome in the period yet decides nothing: it keeps the decision of its id
    from an earlier period (a pause stays with its step), or an even split."""
    period = period_in_force(connection, schema, loop.name, day)
    measured = loop if period is None else period_loop(loop, period)
    rows = performance_rows(
        connection,
        schema,
        measured,
        through=day,
        period=None if period is None else period.number,
        as_of=day,
    )
    if not loop.adjust:
        return rows, []
    measured_steps = {
        row.step
        for row in rows
        if row.step is not None and (row.treatment.finished or row.holdout.finished)
    }
    # The first period, before any was recorded, as `store_decisions` files them.
    number = 1 if period is None else period.number
    decided = keep_pauses(
        decide(measured, rows, day), _pauses_before(connection, schema, measured, number, day)
    )
    decisions = [decision for decision in decided if decision.step in measured_steps]
    store_decisions(connection, schema, measured, day, decisions)
    return rows, decisions
