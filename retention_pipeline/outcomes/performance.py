"""Campaign performance: for the loop as a whole, each step and each variant, how many were
assigned, emailed and came back in each arm, the lift with its intervals, and the revenue still
billed at the end of each window. Aggregated in PostgreSQL; the rows are few.

Every line is a randomized comparison:

- the loop, per episode: one row per episode (intention to treat from its first assignment, its
  start day unless the first step was capped or paused), the treated episodes against the
  holdout's: what running the loop, every step as sent, does to the share who come back; and
  the same of first episodes alone (a user's first with an email possible), which the loop's
  own earlier emails cannot bias: a user keeps their arm from one episode to the next, and only
  the treated got the emails that lead to an unsubscribe, so later episodes lack the treated who
  left while the held-out who would have left are still counted;
- the first step: its treated users against the holdout (nobody got an email before it);
- a later step: its recipients against the users withheld from it (`step_holdout`), both from
  treated episodes, due the step, not back yet and drawn by a hash of the step's own: the
  marginal value of sending that one more email. The holdout is no comparison for it: the earlier
  emails took out of the treatment the users they won back, and still-dormant held-out users are
  not like the still-dormant treated ones.

Rates count outcomes whose window is over (pending ones wait, and so do returns within a window
not over yet). A variant's treated users are compared with their step's whole control (the
holdout, or the withheld): the control gets no email, so it has no variant. The variants' shares
change from day to day while the base rate moves, so a variant's lift is day-stratified
(`stats.stratified_difference`): each assignment day's difference, weighted by its size, never
pooled counts, which would credit a variant for the good days it got more traffic on.

Simulated assignments (days built where no email could go out) have no outcomes, so they never
count. `emailed` is read from the send log when the table is read, so it is right as soon as a
send run confirmed the emails, not the next morning. Revenue is a line per currency: amounts of
different currencies are never added.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date

import pandas as pd
from sqlalchemy import Connection, text

from retention_pipeline.config.models import Loop
from retention_pipeline.currencies import minor_units
from retention_pipeline.outcomes.stats import (
    Z_95,
    always_valid_difference,
    always_valid_half_width,
    newcombe_difference,
    stratified_difference,
)

# Below this many known outcomes in an arm, a row says "not enough data yet" instead of a lift.
MINIMUM_OUTCOMES_PER_ARM = 10
# Known outcomes each arm needs before the always-valid interval decides anything (a pause).
MINIMUM_OUTCOMES_TO_PAUSE = 100


@dataclass(frozen=True)
class ArmCounts:
    assigned: int = 0
    emailed: int = 0
    finished: int = 0
    returned: int = 0
    revenue_cents: dict[str | None, int] = field(default_factory=dict)
    """Billed monthly revenue by currency (None: the app maps no currency column)."""
    revenue_known: int = 0

    @property
    def rate(self) -> float | None:
        return self.returned / self.finished if self.finished else None

    def revenue_per_user_cents(self, currency: str | None) -> float | None:
        """Revenue in `currency` per user whose revenue is known (a user billed in another
        currency, or not at all, brings 0 of it)."""
        if not self.revenue_known:
            return None
        return self.revenue_cents.get(currency, 0) / self.revenue_known


@dataclass(frozen=True)
class DayCounts:
    """One assignment day of a variant row: its treated users' returns and known outcomes, and
    those of its step's holdout."""

    day: date
    treated_returned: int
    treated_finished: int
    holdout_returned: int
    holdout_finished: int


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
    days: tuple[DayCounts, ...] = ()
    """A variant row's counts per assignment day, which its lift is stratified by."""
    first_episodes: bool = False
    """A loop row of users' first episodes alone (`step` None)."""

    @property
    def compared_with(self) -> str:
        return control_arm(self.step)

    @property
    def scope(self) -> str:
        if self.step is None:
            return "loop, first episodes" if self.first_episodes else "loop, per episode"
        return f"step {self.step} {self.template}" + (f" / {self.variant}" if self.variant else "")

    @property
    def measurable(self) -> bool:
        """Enough known outcomes in both arms (for a variant, on at least one day in common:
        its lift compares like days)."""
        return (
            self.treatment.finished >= MINIMUM_OUTCOMES_PER_ARM
            and self.holdout.finished >= MINIMUM_OUTCOMES_PER_ARM
            and (
                self.variant is None
                or any(each.treated_finished and each.holdout_finished for each in self.days)
            )
        )

    @property
    def lift(self) -> tuple[float, float, float] | None:
        """Absolute lift and its 95% interval (Newcombe), as proportions; None without
        outcomes in both arms."""
        if not (self.treatment.finished and self.holdout.finished):
            return None
        if self.variant is not None:
            lift, variance = self._stratified
            half = Z_95 * math.sqrt(variance)
            return lift, lift - half, lift + half
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
        if self.variant is not None:
            lift, variance = self._stratified
            half = float(always_valid_half_width(variance))
            return lift - half, lift + half
        lower, upper = always_valid_difference(
            self.treatment.returned,
            self.treatment.finished,
            self.holdout.returned,
            self.holdout.finished,
        )
        return float(lower), float(upper)

    @property
    def _stratified(self) -> tuple[float, float]:
        """A variant's day-stratified lift over the holdout and its variance."""
        lift, variance = stratified_difference(
            [each.treated_returned for each in self.days],
            [each.treated_finished for each in self.days],
            [each.holdout_returned for each in self.days],
            [each.holdout_finished for each in self.days],
        )
        return float(lift), float(variance)

    @property
    def relative_lift(self) -> float | None:
        lift, rate = self.lift, self.holdout.rate
        return lift[0] / rate if lift and rate else None

    @property
    def monthly_revenue_difference_cents(self) -> dict[str | None, float]:
        """Per currency, what the treated users' billed revenue per user, above the control's,
        comes to over the treated users whose window is over; empty without revenue known in
        both arms."""
        if not (self.treatment.revenue_known and self.holdout.revenue_known):
            return {}
        currencies = sorted(
            set(self.treatment.revenue_cents) | set(self.holdout.revenue_cents),
            key=lambda currency: currency or "",
        )
        return {
            currency: (
                self.treatment.revenue_per_user_cents(currency)
                - self.holdout.revenue_per_user_cents(currency)
            )
            * self.treatment.revenue_known
            for currency in currencies
        }

    @property
    def verdict(self) -> str:
        if not self.holdout.assigned:
            if self.compared_with == "withheld":
                return "nobody withheld from the step: lift unavailable"
            return "no holdout: lift unavailable"
        if not self.measurable:
            known = min(self.treatment.finished, self.holdout.finished)
            if known >= MINIMUM_OUTCOMES_PER_ARM:
                return "not enough data yet (no day with outcomes in both arms)"
            return f"not enough data yet ({known} of {MINIMUM_OUTCOMES_PER_ARM} outcomes)"
        lift, lower, upper = self.lift
        return f"{100 * lift:+.1f} points, 95% CI {100 * lower:+.1f} to {100 * upper:+.1f}"

    @property
    def evidence(self) -> str:
        """What the always-valid interval says, which stays right however often it is read,
        once both arms have as many outcomes as the pause rule asks (`decisions.harmful`)."""
        if not self.holdout.assigned or not self.measurable:
            return "-"
        known = min(self.treatment.finished, self.holdout.finished)
        if known < MINIMUM_OUTCOMES_TO_PAUSE:
            return f"undecided ({known} of {MINIMUM_OUTCOMES_TO_PAUSE} outcomes)"
        lower, upper = self.always_valid
        without = "no email" if self.compared_with == "holdout" else "skipping the step"
        if lower > 0:
            return f"better than {without}"
        if upper < 0:
            return f"worse than {without}"
        return "undecided"


# The counts of one arm, over rows whose window is over (`over`): a return is known as soon as
# it happens, but a rate counts only windows that are over, as early returns alone would inflate
# it. `sent`: the send log confirms the email (read with the table, not the next morning).
ARM_COUNTS_SQL = """
    count(*) AS assigned,
    count(*) FILTER (WHERE sent) AS emailed,
    count(*) FILTER (WHERE over) AS finished,
    count(*) FILTER (WHERE over AND status = 'returned') AS returned,
    count(active_revenue_cents) FILTER (WHERE over) AS revenue_known"""


def _arm_counts(row, revenue: dict[str | None, int]) -> ArmCounts:
    return ArmCounts(
        assigned=row.assigned,
        emailed=row.emailed,
        finished=row.finished,
        returned=row.returned,
        revenue_cents=revenue,
        revenue_known=row.revenue_known,
    )


# An outcome (`o`) of an assignment of the experiment period `:period` (default: the
# latest; before any is recorded, everything is the first): periods are never mixed.
IN_PERIOD_SQL = """EXISTS (
    SELECT FROM {s}.reengagement_audience AS assigned
    WHERE assigned.loop_name = o.loop_name
      AND assigned.partition_date = o.partition_date
      AND assigned.user_id = o.user_id
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
    as_of: date | None,
) -> list[PerformanceRow]:
    """The loop's lines: one row per episode whose first assignment was made from `since`
    through `through`, each window counted from that first assignment, the treated episodes
    against the holdout's; an episode counts as emailed when any of its steps was. Each window
    twice, in one read: every episode, then first episodes alone (of users with no earlier one
    an email could reach: an assignment not simulated)."""
    rows = connection.execute(
        text(f"""
        SELECT window_days, arm, revenue_currency AS currency,
               GROUPING(revenue_currency) = 1 AS all_currencies,
               GROUPING(first_episode) = 0 AS by_first, first_episode, {ARM_COUNTS_SQL},
               coalesce(sum(active_revenue_cents) FILTER (WHERE over), 0) AS revenue_cents
        FROM (
            SELECT episode.*, NOT EXISTS (
                       SELECT FROM {s}.reengagement_audience AS earlier
                       WHERE earlier.loop_name = :loop AND earlier.user_id = episode.user_id
                         AND earlier.episode_start < episode.episode_start
                         AND NOT earlier.simulated) AS first_episode
            FROM (
                -- An episode keeps the arm of its first assignment: a later step withheld from
                -- it is still a step of a treated episode.
                SELECT DISTINCT ON (user_id, episode_start, window_days)
                       user_id, episode_start,
                       window_days, partition_date, status, active_revenue_cents,
                       revenue_currency,
                       CASE WHEN arm = 'holdout' THEN 'holdout' ELSE 'treatment' END AS arm, over,
                       bool_or(sent) OVER (PARTITION BY user_id, episode_start, window_days)
                           AS sent
                FROM ({_outcomes_sql(s)}) AS outcome
                ORDER BY user_id, episode_start, window_days, partition_date
            ) AS episode
            WHERE CAST(:episodes_since AS date) IS NULL OR partition_date >= :episodes_since
        ) AS episode
        GROUP BY GROUPING SETS ((window_days, arm), (window_days, arm, revenue_currency),
                                (window_days, arm, first_episode),
                                (window_days, arm, revenue_currency, first_episode))"""),
        # The first assignment is looked for in the whole history up to `through`.
        {
            "loop": loop.name,
            "through": through,
            "since": None,
            "episodes_since": since,
            "as_of": as_of,
            "period": period,
        },
    ).all()
    # Keyed (window, arm, of first episodes alone); the groups of later episodes are no line.
    kept = [row for row in rows if not row.by_first or row.first_episode]
    revenue: dict[tuple, dict[str | None, int]] = defaultdict(dict)
    for row in kept:
        if not row.all_currencies and row.revenue_cents:
            revenue[(row.window_days, row.arm, row.by_first)][row.currency] = int(row.revenue_cents)
    counts = {
        (row.window_days, row.arm, row.by_first): _arm_counts(
            row, revenue[(row.window_days, row.arm, row.by_first)]
        )
        for row in kept
        if row.all_currencies
    }
    table = []
    for first_episodes in (False, True):
        for window in loop.window_days:
            treatment = counts.get((window, "treatment", first_episodes), ArmCounts())
            holdout = counts.get((window, "holdout", first_episodes), ArmCounts())
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
                        first_episodes=first_episodes,
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
    as_of: date | None = None,
) -> list[PerformanceRow]:
    """The performance of the loop's assignments of one experiment period (default: the latest)
    made from `since` through `through` (default: all), as their outcomes stand (on `as_of`
    when given: a window over later counts as not over yet): the loop per episode, each step,
    each variant, each window. `loop` has the period's steps
    (`audience.experiment.period_loop`)."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    params = {
        "loop": loop.name,
        "through": through,
        "since": since,
        "period": period,
        "as_of": as_of,
    }
    rows = connection.execute(
        text(f"""
        SELECT step, variant, window_days, arm, GROUPING(variant) = 1 AS all_variants,
               {ARM_COUNTS_SQL}
        FROM ({_outcomes_sql(s)}) AS outcome
        GROUP BY GROUPING SETS ((step, window_days, arm), (step, variant, window_days, arm))"""),
        params,
    ).all()
    revenue = _revenue_by_currency(connection, s, params)
    counts: dict[tuple, ArmCounts] = {}
    for row in rows:
        key = (row.step, None if row.all_variants else row.variant, row.window_days, row.arm)
        counts[key] = _arm_counts(row, revenue.get(key, {}))
    by_day = _variant_days(connection, s, params)
    # A step with one variant needs no line per variant.
    scopes = sorted(
        {
            (step, variant)
            for step, variant, _, _ in counts
            if variant is None or len(loop.steps[step].action.variants) > 1
        },
        key=lambda scope: (scope[0], scope[1] or ""),
    )
    table = _episode_rows(connection, s, loop, since, through, period, as_of)
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
                    days=() if variant is None else by_day.get((step, variant, window), ()),
                )
            )
    return table


def simulated_assignments(
    connection: Connection, schema: str, loop: Loop, *, since: date | None = None
) -> int:
    """How many of the loop's assignments from `since` on are simulated (built where no email
    could go out), which the performance leaves out."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return connection.execute(
        text(f"""
            SELECT count(*) FROM {s}.reengagement_audience
            WHERE loop_name = :loop AND simulated
              AND (CAST(:since AS date) IS NULL OR partition_date >= :since)"""),
        {"loop": loop.name, "since": since},
    ).scalar_one()


def _outcomes_sql(s: str) -> str:
    """The loop's outcomes of the assignment days asked for, with whether each window is over
    and whether the send log confirms the assignment's email (at reading time)."""
    return f"""
        SELECT o.*,
               -- A return is known as soon as it happens, but a rate counts only windows that
               -- are over: early returns alone would inflate it.
               -- As of `:as_of` when given: a day's performance built again after later
               -- days' outcomes must not count windows that were not over on that day.
               coalesce(o.window_ends_on, o.partition_date + o.window_days)
                   <= least(o.evaluated_through, CAST(:as_of AS date)) AS over,
               EXISTS (SELECT FROM {s}.email_send_log AS sent
                       WHERE sent.loop_name = o.loop_name AND sent.user_id = o.user_id
                         AND sent.episode_start = o.episode_start AND sent.step = o.step
                         AND sent.status = 'sent') AS sent
        FROM {s}.reengagement_outcomes AS o
        WHERE o.loop_name = :loop AND {IN_PERIOD_SQL.format(s=s)}
          AND (CAST(:since AS date) IS NULL OR o.partition_date >= :since)
          AND (CAST(:through AS date) IS NULL OR o.partition_date <= :through)"""


def _revenue_by_currency(
    connection: Connection, s: str, params: dict
) -> dict[tuple, dict[str | None, int]]:
    """Billed revenue of the outcomes whose window is over, per scope, window, arm and
    currency."""
    rows = connection.execute(
        text(f"""
        SELECT step, variant, window_days, arm, GROUPING(variant) = 1 AS all_variants,
               revenue_currency AS currency, sum(active_revenue_cents) AS cents
        FROM ({_outcomes_sql(s)}) AS outcome
        WHERE over AND active_revenue_cents <> 0
        GROUP BY GROUPING SETS ((step, window_days, arm, revenue_currency),
                                (step, variant, window_days, arm, revenue_currency))"""),
        params,
    ).all()
    revenue: dict[tuple, dict[str | None, int]] = defaultdict(dict)
    for row in rows:
        variant = None if row.all_variants else row.variant
        revenue[(row.step, variant, row.window_days, row.arm)][row.currency] = int(row.cents)
    return revenue


def _variant_days(
    connection: Connection, s: str, params: dict
) -> dict[tuple, tuple[DayCounts, ...]]:
    """Per step, variant and window, the known outcomes of each assignment day: the variant's
    treated users and the step's whole control (`control_arm`)."""
    rows = connection.execute(
        text(f"""
        WITH per_day AS (
            SELECT step, window_days, partition_date,
                   CASE WHEN arm = 'treatment' THEN variant END AS variant,
                   count(*) FILTER (WHERE over) AS finished,
                   count(*) FILTER (WHERE over AND status = 'returned') AS returned
            FROM ({_outcomes_sql(s)}) AS outcome
            WHERE arm = 'treatment'
               OR arm = CASE WHEN step = 0 THEN 'holdout' ELSE 'withheld' END
            GROUP BY 1, 2, 3, 4
        )
        SELECT treated.step, treated.variant, treated.window_days, treated.partition_date,
               treated.returned, treated.finished,
               coalesce(held.returned, 0) AS held_returned,
               coalesce(held.finished, 0) AS held_finished
        FROM per_day AS treated
        LEFT JOIN per_day AS held
            ON held.variant IS NULL AND held.step = treated.step
           AND held.window_days = treated.window_days
           AND held.partition_date = treated.partition_date
        WHERE treated.variant IS NOT NULL
        ORDER BY treated.partition_date"""),
        params,
    ).all()
    by_day: dict[tuple, list[DayCounts]] = defaultdict(list)
    for row in rows:
        by_day[(row.step, row.variant, row.window_days)].append(
            DayCounts(
                day=row.partition_date,
                treated_returned=row.returned,
                treated_finished=row.finished,
                holdout_returned=row.held_returned,
                holdout_finished=row.held_finished,
            )
        )
    return {key: tuple(days) for key, days in by_day.items()}


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _money(by_currency: dict[str | None, float]) -> str:
    """One amount per currency, never their sum."""
    if not by_currency:
        return "-"
    return ", ".join(
        f"{cents / minor_units(currency):+,.0f}" + (f" {currency}" if currency else "")
        for currency, cents in by_currency.items()
    )


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
    points), sample sizes and the revenue difference. The loop's scopes are `loop` (per episode)
    and `loop_first_episodes`; the control's numbers are named after its arm (`holdout_...`,
    `withheld_...`)."""
    metadata: dict[str, float | int] = {}
    for row in rows:
        if row.step is None:
            scope = "loop_first_episodes" if row.first_episodes else "loop"
        else:
            scope = f"step_{row.step}"
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
            for currency, cents in row.monthly_revenue_difference_cents.items():
                name = "monthly_revenue_difference" + (f"_{currency.lower()}" if currency else "")
                metadata[f"{prefix}/{name}"] = round(cents / minor_units(currency), 2)
    return metadata
