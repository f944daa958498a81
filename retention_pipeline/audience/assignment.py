"""What the audience assigned one user: the step, arm and variant of a loop's day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, text


@dataclass(frozen=True)
class Assignment:
    day: date
    step: int
    template: str
    arm: str
    variant: str

    def __str__(self) -> str:
        arm = {
            "treatment": "treatment",
            "holdout": "holdout (not emailed)",
            "withheld": "withheld from this step (not emailed)",
        }[self.arm]
        return f"step {self.step} ({self.template}), {arm}, variant {self.variant}"


def assignment_of(
    connection: Connection, schema: str, loop_name: str, user_id: str, day: date | None
) -> Assignment | None:
    """The user's row in the loop's audience of `day` (default: the loop's latest audience day);
    None when the audience of that day does not hold the user."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    row = connection.execute(
        text(f"""
            SELECT partition_date, step, template, arm, variant FROM {s}.reengagement_audience
            WHERE loop_name = :loop AND user_id = :user
              AND partition_date = coalesce(
                  CAST(:day AS date),
                  (SELECT max(partition_date) FROM {s}.reengagement_audience
                   WHERE loop_name = :loop))"""),
        {"loop": loop_name, "user": str(user_id), "day": day},
    ).first()
    return Assignment(*row) if row else None
