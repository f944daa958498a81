"""Whether learning send times pays: of a loop that learns them (`send_at: {learn: true}`), the
return rate of the treated users sent at their learned hour against those drawn, at random, to
the fixed local time.

The draw hashes the user (`audience.build.SEND_TIME_BUCKET_SQL`), so both groups are random
shares of the same treated users, and the comparison is randomized like every other one. Each
episode counts once, by its first email (step 0): later steps of an episode are not independent
of it. Intention to treat: a learned user with no activity to learn from (sent at the fixed time
after all), an email skipped as stale or bounced, stay in their group. Rates count windows that
are over; the difference has the same hybrid score interval as the lifts (`stats`), and the
verdict reads the always-valid one, as the decisions do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.outcomes.performance import MINIMUM_OUTCOMES_PER_ARM
from retention_pipeline.outcomes.stats import always_valid_difference, newcombe_difference


@dataclass(frozen=True)
class SendTimeRow:
    """One window of the comparison: each group's known outcomes and returns."""

    window_days: int
    learned_finished: int
    learned_returned: int
    fixed_finished: int
    fixed_returned: int

    @property
    def measurable(self) -> bool:
        return min(self.learned_finished, self.fixed_finished) >= MINIMUM_OUTCOMES_PER_ARM

    @property
    def difference(self) -> tuple[float, float, float]:
        """Learned minus fixed return rate, and its 95% interval (NaN without outcomes)."""
        difference, lower, upper = newcombe_difference(
            self.learned_returned, self.learned_finished, self.fixed_returned, self.fixed_finished
        )
        return float(difference), float(lower), float(upper)

    @property
    def verdict(self) -> str:
        """From the always-valid interval, as the decisions: this is read every morning, and a
        fixed-sample interval read daily would find a difference where there is none."""
        if not self.measurable:
            return f"not enough data yet (fewer than {MINIMUM_OUTCOMES_PER_ARM} outcomes a group)"
        lower, upper = always_valid_difference(
            self.learned_returned, self.learned_finished, self.fixed_returned, self.fixed_finished
        )
        if lower > 0:
            return "learned times bring more users back"
        if upper < 0:
            return "the fixed time brings more users back"
        return "no difference shown yet"


def send_time_rows(
    connection: Connection, *, schema: str, loop_name: str, day: date
) -> list[SendTimeRow]:
    """Per window, the loop's treated first emails of the days up to `day`, by send-time group,
    with their outcomes whose windows were over by `day`."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""
            SELECT o.window_days,
                   count(*) FILTER (WHERE a.send_time_arm = 'learned'),
                   count(*) FILTER (WHERE a.send_time_arm = 'learned'
                                      AND o.status = 'returned'),
                   count(*) FILTER (WHERE a.send_time_arm = 'fixed'),
                   count(*) FILTER (WHERE a.send_time_arm = 'fixed' AND o.status = 'returned')
            FROM {s}.reengagement_outcomes AS o
            JOIN {s}.reengagement_audience AS a
                ON a.loop_name = o.loop_name AND a.partition_date = o.partition_date
               AND a.user_id = o.user_id
            WHERE o.loop_name = :loop AND o.arm = 'treatment' AND o.step = 0
              AND o.partition_date <= :day AND a.send_time_arm IS NOT NULL
              -- Windows over by `day` only: early returns alone would inflate a rate, and a
              -- day built again later must not count what it could not have known.
              AND o.window_ends_on <= least(o.evaluated_through, CAST(:day AS date))
            GROUP BY o.window_days
            ORDER BY o.window_days"""),
        {"loop": loop_name, "day": day},
    ).all()
    return [SendTimeRow(*(int(value) for value in row)) for row in rows]


def send_time_markdown(rows: list[SendTimeRow]) -> str:
    """The comparison as a Markdown table for the performance asset's metadata."""
    lines = [
        "| window | learned: returned / outcomes | fixed: returned / outcomes "
        "| learned - fixed (points) [95% CI] | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        difference, lower, upper = row.difference
        shown = (
            f"{100 * difference:+.1f} [{100 * lower:+.1f}, {100 * upper:+.1f}]"
            if row.measurable and not math.isnan(difference)
            else "-"
        )
        lines.append(
            f"| {row.window_days}d | {row.learned_returned} / {row.learned_finished} | "
            f"{row.fixed_returned} / {row.fixed_finished} | {shown} | {row.verdict} |"
        )
    return "\n".join(lines) if rows else "no outcomes of first emails yet"
