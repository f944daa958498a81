"""Campaign performance: per loop, step and variant, and for the loop as a whole, how many were
assigned, emailed and came back in each arm, the lift over the holdout with its intervals, and
the revenue still billed at the end of each window. Aggregated in PostgreSQL; the rows are few.

Rates count outcomes whose window is over (pending ones wait, and so do returns within a window
not over yet). A variant's treated users are
compared with the whole holdout of their step: the holdout gets no email, so it has no variant.
The loop as a whole counts assignments: a user sent three steps counts three times.
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


@dataclass(frozen=True)
class PerformanceRow:
    """One line of the performance table: a scope (the loop, a step or a step's variant) and a
    window, the treatment against the holdout."""

    loop: str
    step: int | None
    template: str | None
    variant: str | None
    window_days: int
    treatment: ArmCounts
    holdout: ArmCounts

    @property
    def scope(self) -> str:
        if self.step is None:
            return "all steps"
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
        """What the treated users' billed revenue per user, above the holdout's, comes to over
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
        if lower > 0:
            return "better than no email"
        if upper < 0:
            return "worse than no email"
        return "undecided"


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
    made from `since` through `through` (default: all), as their outcomes stand: the loop, each
    step, each variant, each window. `loop` has the period's steps
    (`audience.experiment.period_loop`)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""
        SELECT step, variant, window_days, arm, GROUPING(step) = 1 AS all_steps,
               GROUPING(variant) = 1 AS all_variants,
               count(*) AS assigned,
               count(*) FILTER (WHERE emailed) AS emailed,
               count(*) FILTER (WHERE over) AS finished,
               count(*) FILTER (WHERE over AND status = 'returned') AS returned,
               coalesce(sum(active_revenue_cents) FILTER (WHERE over), 0) AS revenue_cents,
               count(active_revenue_cents) FILTER (WHERE over) AS revenue_known
        FROM (
            -- A return is known as soon as it happens, but a rate counts only windows that
            -- are over: early returns alone would inflate it.
            SELECT *, partition_date + window_days <= evaluated_through AS over
            FROM {s}.reengagement_outcomes
        ) AS outcome
        WHERE loop_name = :loop
          -- Periods are never mixed; before any is recorded, everything is the first.
          AND EXISTS (
              SELECT FROM {s}.reengagement_audience AS assigned
              WHERE assigned.loop_name = outcome.loop_name
                AND assigned.partition_date = outcome.partition_date
                AND assigned.user_id = outcome.user_id
                AND assigned.period = coalesce(
                    CAST(:period AS integer),
                    (SELECT max(period) FROM {s}.experiment_periods WHERE loop_name = :loop),
                    1))
          AND (CAST(:since AS date) IS NULL OR partition_date >= :since)
          AND (CAST(:through AS date) IS NULL OR partition_date <= :through)
        GROUP BY GROUPING SETS ((window_days, arm), (step, window_days, arm),
                                (step, variant, window_days, arm))"""),
        {"loop": loop.name, "through": through, "since": since, "period": period},
    ).all()
    counts: dict[tuple, ArmCounts] = {}
    for row in rows:
        step = None if row.all_steps else row.step
        variant = None if row.all_variants else row.variant
        counts[(step, variant, row.window_days, row.arm)] = ArmCounts(
            assigned=row.assigned,
            emailed=row.emailed,
            finished=row.finished,
            returned=row.returned,
            revenue_cents=int(row.revenue_cents),
            revenue_known=row.revenue_known,
        )
    # A step with one variant needs no line per variant.
    scopes = sorted(
        {
            (step, variant)
            for step, variant, _, _ in counts
            if variant is None or len(loop.steps[step].action.variants) > 1
        },
        key=lambda scope: (-1 if scope[0] is None else scope[0], scope[1] or ""),
    )
    table = []
    for step, variant in scopes:
        for window in loop.window_days:
            treatment = counts.get((step, variant, window, "treatment"), ArmCounts())
            # A variant is measured against its step's whole holdout.
            holdout = counts.get((step, None, window, "holdout"), ArmCounts())
            if not (treatment.assigned or holdout.assigned):
                continue
            table.append(
                PerformanceRow(
                    loop=loop.name,
                    step=step,
                    template=None if step is None else loop.steps[step].action.template,
                    variant=variant,
                    window_days=window,
                    treatment=treatment,
                    holdout=holdout,
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
                "assigned (treated/holdout)": f"{row.treatment.assigned}/{row.holdout.assigned}",
                "emailed": row.treatment.emailed,
                "known outcomes": f"{row.treatment.finished}/{row.holdout.finished}",
                "returned treated": _percent(row.treatment.rate),
                "returned holdout": _percent(row.holdout.rate),
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
    points), sample sizes and the revenue difference."""
    metadata: dict[str, float | int] = {}
    for row in rows:
        scope = "all" if row.step is None else f"step_{row.step}"
        if row.variant:
            scope += f"_{row.variant}"
        prefix = f"{row.loop}/{scope}/{row.window_days}d"
        metadata[f"{prefix}/treated_outcomes"] = row.treatment.finished
        metadata[f"{prefix}/holdout_outcomes"] = row.holdout.finished
        if row.treatment.rate is not None:
            metadata[f"{prefix}/treated_return_rate"] = round(100 * row.treatment.rate, 2)
        if row.holdout.rate is not None:
            metadata[f"{prefix}/holdout_return_rate"] = round(100 * row.holdout.rate, 2)
        if row.measurable:
            lift, lower, upper = row.lift
            metadata[f"{prefix}/lift_points"] = round(100 * lift, 2)
            metadata[f"{prefix}/lift_lower"] = round(100 * lower, 2)
            metadata[f"{prefix}/lift_upper"] = round(100 * upper, 2)
            revenue = row.monthly_revenue_difference_cents
            if revenue is not None:
                metadata[f"{prefix}/monthly_revenue_difference"] = round(revenue / 100, 2)
    return metadata
