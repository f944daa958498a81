"""A loop's experiment design, frozen per period.

The design is what decides who is compared with whom: the holdout's fraction and salt, the step
holdout, and the steps (by their id, the template, in order) with their delays and variants. The
audience records it the first time it runs a loop (period 1). A run whose design differs starts a
new period on the day it builds, provided no day from that one on has been assigned yet: episodes
started before keep their arm, their period and their period's steps until they end; episodes
that start from then on belong to the new period. A run that would rebuild a day already assigned
under another design (which would move users who may have been emailed between arms, steps or
variants) is refused with one line naming the key that changed.

Every episode, assignment and decision carries its period, and performance is measured one
period at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.config.models import Loop, RetentionConfig, Step


class DesignChangeRefused(ValueError):
    """The configuration would change assignments already made."""

    def __init__(self, loop: str, message: str) -> None:
        super().__init__(message)
        self.loop = loop


@dataclass(frozen=True)
class ExperimentPeriod:
    loop: str
    number: int
    design: dict
    started_on: date
    change: str

    def __str__(self) -> str:
        return f"period {self.number}, from {self.started_on} ({self.change})"

    @property
    def step_ids(self) -> list[str]:
        return [step["id"] for step in self.design["steps"]]


def design_of(loop: Loop) -> dict:
    """The loop's design as configured: every setting that decides who is compared with whom.
    A new setting of that kind belongs here, and `design_changes` should name its key; a design
    that changes starts a new period either way."""
    return {
        "holdout": {"fraction": loop.holdout.fraction, "salt": loop.holdout_salt},
        "step_holdout": loop.step_holdout,
        "steps": [
            {
                "id": step.action.template,
                "delay_days": step.delay_days,
                "variants": list(step.action.variants),
            }
            for step in loop.steps
        ],
    }


def design_changes(key: str, before: dict, after: dict) -> list[str]:
    """What differs from `before` to `after`, one line per setting, each naming its key under
    `key` (the loop's, `loops.N`) as the configuration `after` came from spells it."""
    changes = []
    for setting in ("fraction", "salt"):
        old, new = before["holdout"][setting], after["holdout"][setting]
        if old != new:
            # A salt is no secret, but a long one would drown the line.
            shown = f"{old} -> {new}" if setting == "fraction" else "changed"
            changes.append(f"{key}.holdout.{setting}: {shown}")
    if before["step_holdout"] != after["step_holdout"]:
        changes.append(f"{key}.step_holdout: {before['step_holdout']} -> {after['step_holdout']}")
    old_ids = [step["id"] for step in before["steps"]]
    new_ids = [step["id"] for step in after["steps"]]
    if old_ids != new_ids:
        changes.append(f"{key}.steps: {', '.join(old_ids)} -> {', '.join(new_ids)}")
    old_steps = {step["id"]: step for step in before["steps"]}
    for index, step in enumerate(after["steps"]):
        old = old_steps.get(step["id"])
        if old is None:
            continue
        if old["delay_days"] != step["delay_days"]:
            changes.append(
                f"{key}.steps.{index}.delay: {old['delay_days']}d -> {step['delay_days']}d"
            )
        if old["variants"] != step["variants"]:
            changes.append(
                f"{key}.steps.{index}.action.variants: "
                f"{', '.join(old['variants'])} -> {', '.join(step['variants'])}"
            )
    if not changes and before != after:  # a setting of the design not spelled out above
        changes.append(f"{key}: the experiment design changed")
    return changes


def periods(connection: Connection, schema: str, loop_name: str) -> list[ExperimentPeriod]:
    """The loop's periods, oldest first."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    rows = connection.execute(
        text(f"""
            SELECT loop_name, period, design, started_on, change FROM {s}.experiment_periods
            WHERE loop_name = :loop ORDER BY period"""),
        {"loop": loop_name},
    ).all()
    return [ExperimentPeriod(*row) for row in rows]


def period_in_force(
    connection: Connection, schema: str, loop_name: str, day: date
) -> ExperimentPeriod | None:
    """The period episodes starting on `day` belong to: the latest that started by then (the
    first, for a day before it); None before the loop's first audience."""
    recorded = periods(connection, schema, loop_name)
    started = [period for period in recorded if period.started_on <= day]
    if started:
        return started[-1]
    return recorded[0] if recorded else None


def period_loop(loop: Loop, period: ExperimentPeriod) -> Loop:
    """`loop` with the steps of `period`'s design, to measure and decide that period: a step
    still configured keeps its settings, a step since removed its template and variants."""
    configured = {step.action.template: step for step in loop.steps}
    steps = []
    for designed in period.design["steps"]:
        step = configured.get(designed["id"], Step())
        action = step.action.model_copy(
            update={"template": designed["id"], "variants": designed["variants"]}
        )
        steps.append(
            step.model_copy(update={"delay": f"{designed['delay_days']}d", "action": action})
        )
    return loop.model_copy(update={"steps": steps})


def record_period(
    connection: Connection, schema: str, config: RetentionConfig, loop: Loop, day: date
) -> ExperimentPeriod:
    """The period new episodes of `day` start in, recorded (or started) as the configured design
    requires; raises DesignChangeRefused when the design differs from the one `day` or a later
    day was assigned under. Call before the day is taken back for a rebuild."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    # Two audience runs of one loop must not both start a period.
    connection.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('retention.experiment_periods/' || :loop))"),
        {"loop": loop.name},
    )
    design = design_of(loop)
    key = f"loops.{config.loop_names.index(loop.name)}"
    recorded = periods(connection, schema, loop.name)
    if not recorded:
        # Assignments made before periods were recorded (an upgraded database) are period 1's.
        first_assigned = connection.execute(
            text(
                f"SELECT min(partition_date) FROM {s}.reengagement_audience WHERE loop_name = :loop"
            ),
            {"loop": loop.name},
        ).scalar_one()
        started_on = min(day, first_assigned or day)
        return _insert(connection, s, loop.name, 1, design, started_on, "the first design")
    current = period_in_force(connection, schema, loop.name, day)
    if current.design == design:
        if day < current.started_on:  # a backfill before the first period, same design
            connection.execute(
                text(f"""UPDATE {s}.experiment_periods SET started_on = :day
                         WHERE loop_name = :loop AND period = :period"""),
                {"day": day, "loop": loop.name, "period": current.number},
            )
            return ExperimentPeriod(loop.name, current.number, design, day, current.change)
        return current
    changes = design_changes(key, current.design, design)
    last_assigned = connection.execute(
        text(f"SELECT max(partition_date) FROM {s}.reengagement_audience WHERE loop_name = :loop"),
        {"loop": loop.name},
    ).scalar_one()
    if (
        current.number == recorded[-1].number
        and day >= current.started_on
        and (last_assigned is None or last_assigned < day)
    ):
        if day == current.started_on:  # the period never assigned anyone: it takes the design
            change = current.change
            if current.number > 1:
                change = "; ".join(design_changes(key, recorded[-2].design, design))
            connection.execute(
                text(f"""UPDATE {s}.experiment_periods
                         SET design = CAST(:design AS jsonb), change = :change,
                             recorded_at = now()
                         WHERE loop_name = :loop AND period = :period"""),
                {
                    "design": json.dumps(design),
                    "change": change,
                    "loop": loop.name,
                    "period": current.number,
                },
            )
            # Its episodes' next steps were worked out from the delays it had.
            connection.execute(
                text(f"""UPDATE {s}.episodes SET next_step_on = NULL
                         WHERE loop_name = :loop AND period = :period AND ended_on IS NULL"""),
                {"loop": loop.name, "period": current.number},
            )
            return ExperimentPeriod(loop.name, current.number, design, day, change)
        return _insert(
            connection, s, loop.name, current.number + 1, design, day, "; ".join(changes)
        )
    through = last_assigned or recorded[-1].started_on
    raise DesignChangeRefused(
        loop.name,
        f"{changes[0]} since {current}; {loop.name} has assignments through "
        f"{through}: building {day} would move users assigned under the old design. "
        f"Restore the old value to rebuild that day, or build only days after {through} "
        "(they start a new period)",
    )


def _insert(
    connection: Connection, s: str, loop: str, number: int, design: dict, day: date, change: str
) -> ExperimentPeriod:
    connection.execute(
        text(f"""INSERT INTO {s}.experiment_periods (loop_name, period, design, started_on,
                     change)
                 VALUES (:loop, :period, CAST(:design AS jsonb), :day, :change)"""),
        {
            "loop": loop,
            "period": number,
            "design": json.dumps(design),
            "day": day,
            "change": change,
        },
    )
    return ExperimentPeriod(loop, number, design, day, change)


def open_periods(connection: Connection, schema: str, loop_name: str) -> list[ExperimentPeriod]:
    """The loop's periods that still have open episodes."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    numbers = {
        number
        for (number,) in connection.execute(
            text(f"""SELECT DISTINCT period FROM {s}.episodes
                     WHERE loop_name = :loop AND ended_on IS NULL"""),
            {"loop": loop_name},
        ).all()
    }
    return [period for period in periods(connection, schema, loop_name) if period.number in numbers]
