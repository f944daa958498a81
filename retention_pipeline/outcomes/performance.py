"""Campaign performance: for the loop as a whole, each step and each variant, how many were
assigned, emailed and came back in each arm, the lift with its intervals, and the revenue still
billed at the end of each window. Aggregated in PostgreSQL; the rows are few.

Every line is a randomized comparison:

- the loop, per episode: one row per episode (intention to treat from its first assignment, its
  start day unless the first step was capped or paused), the treated episodes against the
  holdout's: what running the loop, every step as sent, does to the share who come back;
- the first step: its treated users against the holdout (nobody got an email before it);
- a later step: its recipients against the users withheld from it (`step_holdout`), both from
  treated episodes, due the step, not back yet and drawn by a hash of the step's own: the
  marginal value of sending that one more email. The holdout is no comparison for it: the earlier
  emails took out of the treatment the users they won back, and still-dormant held-out users are
  not like the still-dormant treated ones.

Rates count outcomes whose window is over (pending ones wait, and so do returns within a window
not over yet). A variant's treated users are compared with their step's whole control (the
holdout, or the withheld): the control gets no email, so it has no variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date

import pandas as pd
from sqlalchemy import Connection, text

from retention_pipeline.config.models import Loop
from retention_pipeline.outcomes.stats import always_valid_difference, newcombe_difference

# Below this many known outcomes in an arm, a row says "not enough data yet" instead of a lift.
MINIMUM_OUTCOMES_PER_ARM = 10


@dataclass(frozen=True)
class ArmCounts:
    assigned: int = 0
    emailed: int = 0
    finished: int = 0
    returned: int = 0
    revenue_cents: int = 0
    revenue_known: int = 0

    @property
    def rate(self) -> float | None:
        return self.returned / self.finished if self.finished else None

    @property
    def revenue_per_user_cents(self) -> float | None:
        return self.revenue_cents / self.revenue_known if self.revenue_known else None


def control_arm(step: int | None) -> str:
    """The arm a scope's treated users are compared with: the holdout for the loop (step None)
    and its first step, the users withheld from the step for a later one."""
    return "holdout" if step is None or step == 0 else "withheld"


@dataclass(frozen=True)
class PerformanceRow:
    """One line of the performance table: a scope (the loop per episode, a step or a step's
    variant) and a window, the treatment against the control, whose counts `holdout` holds: the
    holdout or the users withheld from the step, as `compared_with` says."""

    loop: str
    step: int | None
    template: str | None
    variant: str | None
    window_days: int
    treatment: ArmCounts
    holdout: ArmCounts

    @property
    def compared_with(self) -> str:
        return control_arm(self.step)

    @property
    def scope(self) -> str:
        if self.step is None:
            return "loop, per episode"
        return f"step {self.step} {self.template}" + (f" / {self.variant}" if self.variant else "")

    @property
    def measurable(self) -> bool:
        return (
            self.treatment.finished >= MINIMUM_OUTCOMES_PER_ARM
            and self.holdout.finished >= MINIMUM_OUTCOMES_PER_ARM
        )

    @property
    def lift(self) -> tuple[float, float, float] | None:
        """Absolute lift and its 95% interval (Newcombe), as proportions; None without
        outcomes in both arms."""
        if not (self.treatment.finished and self.holdout.finished):
            return None
        lift, lower, upper = newcombe_difference(
            self.treatment.returned,
            self.treatment.finished,
            self.holdout.returned,
            self.holdout.finished,
        )
        return float(lift), float(lower), float(upper)

    @property
    def always_valid(self) -> tuple[float, float] | None:
        """The always-valid 95% bounds of the lift, which decisions use."""
        if not (self.treatment.finished and self.holdout.finished):
            return None
        lower, upper = always_valid_difference(
            self.treatment.returned,
            self.treatment.finished,
            self.holdout.returned,
            self.holdout.finished,
        )
        return float(lower), float(upper)

    @property
    def relative_lift(self) -> float | None:
        lift, rate = self.lift, self.holdout.rate
        return lift[0] / rate if lift and rate else None

    @property
    def monthly_revenue_difference_cents(self) -> float | None:
        """What the treated users' billed revenue per user, above the control's, comes to over
        the treated users whose window is over."""
        treated, held = (
            self.treatment.revenue_per_user_cents,
            self.holdout.revenue_per_user_cents,
        )
        if treated is None or held is None:
            return None
        return (treated - held) * self.treatment.revenue_known

    @property
    def verdict(self) -> str:
        if not self.holdout.assigned:
            if self.compared_with == "withheld":
                return "nobody withheld from the step: lift unavailable"
            return "no holdout: lift unavailable"
        if not self.measurable:
            known = min(self.treatment.finished, self.holdout.finished)
            return f"not enough data yet ({known} of {MINIMUM_OUTCOMES_PER_ARM} outcomes)"
        lift, lower, upper = self.lift
        return f"{100 * lift:+.1f} points, 95% CI {100 * lower:+.1f} to {100 * upper:+.1f}"

    @property
    def evidence(self) -> str:
        """What the always-valid interval says, which stays right however often it is read."""
        if not self.holdout.assigned or not self.measurable:
            return "-"
        lower, upper = self.always_valid
        without = "no email" if self.compared_with == "holdout" else "skipping the step"
        if lower > 0:
            return f"better than {without}"
        if upper < 0:
            return f"worse than {without}"
        return "undecided"


# The counts of one arm, over rows whose window is over (`over`): a return is known as soon as
# it happens, but a rate counts only windows that are over, as early returns alone would inflate
# it.
ARM_COUNTS_SQL = """
    count(*) AS assigned,
    count(*) FILTER (WHERE emailed) AS emailed,
    count(*) FILTER (WHERE over) AS finished,
    count(*) FILTER (WHERE over AND status = 'returned') AS returned,
    coalesce(sum(active_revenue_cents) FILTER (WHERE over), 0) AS revenue_cents,
    count(active_revenue_cents) FILTER (WHERE over) AS revenue_known"""


def _arm_counts(row) -> ArmCounts:
    return ArmCounts(
        assigned=row.assigned,
        emailed=row.emailed,
        finished=row.finished,
        returned=row.returned,
        revenue_cents=int(row.revenue_cents),
        revenue_known=row.revenue_known,
    )


# An outcome (`outcome`) of an assignment of the experiment period `:period` (default: the
# latest; before any is recorded, everything is the first): periods are never mixed.
IN_PERIOD_SQL = """EXISTS (
    SELECT FROM {s}.reengagement_audience AS assigned
    WHERE assigned.loop_name = outcome.loop_name
      AND assigned.partition_date = outcome.partition_date
      AND assigned.user_id = outcome.user_id
      AND assigned.period = coalesce(
          CAST(:period AS integer),
          (SELECT max(period) FROM {s}.experiment_periods WHERE loop_name = :loop),
          1))"""


def _episode_rows(
    connection: Connection,
    s: str,
    loop: Loop,
    since: date | None,
    through: date | None,
    period: int | None,
) -> list[PerformanceRow]:
    """The loop's lines: one row per episode whose first assignment was made from `since`
    through `through`, each window counted from that first assignment, the treated episodes
    against the holdout's; an episode counts as emailed when any of its steps was."""
    rows = connection.execute(
        text(f"""
        SELECT window_days, arm, {ARM_COUNTS_SQL}
        FROM (
            -- An episode keeps the arm of its first assignment: a later step withheld from it
            -- is still a step of a treated episode.
            SELECT DISTINCT ON (user_id, episode_start, window_days)
                   window_days, partition_date, status, active_revenue_cents,
                   CASE WHEN arm = 'holdout' THEN 'holdout' ELSE 'treatment' END AS arm,
                   partition_date + window_days <= evaluated_through AS over,
                   bool_or(emailed) OVER (PARTITION BY user_id, episode_start, window_days)
                       AS emailed
            FROM {s}.reengagement_outcomes AS outcome
            WHERE loop_name = :loop AND {IN_PERIOD_SQL.format(s=s)}
              AND (CAST(:through AS date) IS NULL OR partition_date <= :through)
            ORDER BY user_id, episode_start, window_days, partition_date
        ) AS episode
        WHERE CAST(:since AS date) IS NULL OR partition_date >= :since
        GROUP BY window_days, arm"""),
        {"loop": loop.name, "through": through, "since": since, "period": period},
    ).all()
    counts = {(row.window_days, row.arm): _arm_counts(row) for row in rows}
    table = []
    for window in loop.window_days:
        treatment = counts.get((window, "treatment"), ArmCounts())
        holdout = counts.get((window, "holdout"), ArmCounts())
        if treatment.assigned or holdout.assigned:
            table.append(
                PerformanceRow(
                    loop=loop.name,
                    step=None,
                    template=None,
                    variant=None,
                    window_days=window,
                    treatment=treatment,
                    holdout=holdout,
                )
            )
    return table


def performance_rows(
    connection: Connection,
    schema: str,
    loop: Loop,
    *,
    since: date | None = None,
    through: date | None = None,
    period: int | None = None,
) -> list[PerformanceRow]:
    """The performance of the loop's assignments of one experiment period (default: the latest)
    made from `since` through `through` (default: all), as their outcomes stand: the loop per
    episode, each step, each variant, each window. `loop` has the period's steps
    (`audience.experiment.period_loop`)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""
        SELECT step, variant, window_days, arm, GROUPING(variant) = 1 AS all_variants,
               {ARM_COUNTS_SQL}
        FROM (
            SELECT *, partition_date + window_days <= evaluated_through AS over
            FROM {s}.reengagement_outcomes
        ) AS outcome
        WHERE loop_name = :loop
          AND {IN_PERIOD_SQL.format(s=s)}
          AND (CAST(:since AS date) IS NULL OR partition_date >= :since)
          AND (CAST(:through AS date) IS NULL OR partition_date <= :through)
        GROUP BY GROUPING SETS ((step, window_days, arm), (step, variant, window_days, arm))"""),
        {"loop": loop.name, "through": through, "since": since, "period": period},
    ).all()
    counts: dict[tuple, ArmCounts] = {
        (row.step, None if row.all_variants else row.variant, row.window_days, row.arm): (
            _arm_counts(row)
        )
        for row in rows
    }
    # A step with one variant needs no line per variant.
    scopes = sorted(
        {
            (step, variant)
            for step, variant, _, _ in counts
            if variant is None or len(loop.steps[step].action.variants) > 1
        },
        key=lambda scope: (scope[0], scope[1] or ""),
    )
    table = _episode_rows(connection, s, loop, since, through, period)
    for step, variant in scopes:
        for window in loop.window_days:
            treatment = counts.get((step, variant, window, "treatment"), ArmCounts())
            # A variant is measured against its step's whole control.
            control = counts.get((step, None, window, control_arm(step)), ArmCounts())
            if not (treatment.assigned or control.assigned):
                continue
            table.append(
                PerformanceRow(
                    loop=loop.name,
                    step=step,
                    template=loop.steps[step].action.template,
                    variant=variant,
                    window_days=window,
                    treatment=treatment,
                    holdout=control,
                )
            )
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _money(cents: float | None) -> str:
    return "-" if cents is None else f"{cents / 100:+,.0f}"


def performance_frame(rows: list[PerformanceRow]) -> pd.DataFrame:
    """The table a growth engineer reads: one line per loop scope and window."""
    return pd.DataFrame(
        [
            {
                "loop": row.loop,
                "scope": row.scope,
                "window": f"{row.window_days}d",
                "compared with": row.compared_with,
                "assigned (treated/control)": f"{row.treatment.assigned}/{row.holdout.assigned}",
                "emailed": row.treatment.emailed,
                "known outcomes": f"{row.treatment.finished}/{row.holdout.finished}",
                "returned treated": _percent(row.treatment.rate),
                "returned control": _percent(row.holdout.rate),
                "verdict": row.verdict,
                "relative": _percent(row.relative_lift) if row.measurable else "-",
                "decision evidence": row.evidence,
                "billed MRR difference": _money(row.monthly_revenue_difference_cents)
                if row.measurable
                else "-",
            }
            for row in rows
        ]
    )


def performance_metadata(rows: list[PerformanceRow]) -> dict[str, float | int]:
    """Numbers for the UI's plots, per loop, scope and window: rates, lift and its bounds (in
    points), sample sizes and the revenue difference. The loop's scope is `loop` (per episode);
    the control's numbers are named after its arm (`holdout_...`, `withheld_...`)."""
    metadata: dict[str, float | int] = {}
    for row in rows:
        scope = "loop" if row.step is None else f"step_{row.step}"
        if row.variant:
            scope += f"_{row.variant}"
        prefix = f"{row.loop}/{scope}/{row.window_days}d"
        control = row.compared_with
        metadata[f"{prefix}/treated_outcomes"] = row.treatment.finished
        metadata[f"{prefix}/{control}_outcomes"] = row.holdout.finished
        if row.treatment.rate is not None:
            metadata[f"{prefix}/treated_return_rate"] = round(100 * row.treatment.rate, 2)
        if row.holdout.rate is not None:
            metadata[f"{prefix}/{control}_return_rate"] = round(100 * row.holdout.rate, 2)
        if row.measurable:
            lift, lower, upper = row.lift
            metadata[f"{prefix}/lift_points"] = round(100 * lift, 2)
            metadata[f"{prefix}/lift_lower"] = round(100 * lower, 2)
            metadata[f"{prefix}/lift_upper"] = round(100 * upper, 2)
            revenue = row.monthly_revenue_difference_cents
            if revenue is not None:
                metadata[f"{prefix}/monthly_revenue_difference"] = round(revenue / 100, 2)
    return metadata
