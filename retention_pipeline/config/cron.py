"""The loops' cron expressions, checked without Dagster: five fields or a macro, and firing at
most once a day, since every run of a day serves the same partition (the day just ended).

Stricter than Dagster where the two differ (`L`, `W` and `#` are refused), never looser: what
passes here, Dagster schedules."""

from __future__ import annotations

AT_MOST_DAILY_MACROS = ("@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
MACROS = (*AT_MOST_DAILY_MACROS, "@hourly")
MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (lowest, highest, names, whether `?` may stand for "any") of minute, hour, day of month, month,
# day of week (0 and 7 are both Sunday).
FIELDS = (
    (0, 59, (), False),
    (0, 23, (), False),
    (1, 31, (), True),
    (1, 12, MONTH_NAMES, False),
    (0, 7, DAY_NAMES, True),
)


def _valid_value(value: str, lowest: int, highest: int, names: tuple[str, ...]) -> bool:
    if value.isdigit():
        return lowest <= int(value) <= highest
    return value.lower() in names


def _valid_field(field: str, lowest: int, highest: int, names: tuple[str, ...], any_mark: bool):
    for item in field.split(","):
        body, has_step, step = item.partition("/")
        if has_step and not (step.isdigit() and int(step) > 0):
            return False
        if body == "*" or (body == "?" and any_mark and not has_step):
            continue
        start, has_range, end = body.partition("-")
        bounds = (start, end) if has_range else (start,)
        if not all(_valid_value(bound, lowest, highest, names) for bound in bounds):
            return False
    return True


def is_valid_cron(cron: str) -> bool:
    """A macro such as `@daily`, or five valid fields (minute hour day-of-month month weekday)."""
    fields = cron.split()
    if len(fields) == 1:
        return fields[0].lower() in MACROS
    if len(fields) != 5:
        return False
    if not all(_valid_field(field, *spec) for field, spec in zip(fields, FIELDS, strict=True)):
        return False
    day, month = fields[2], fields[3].lower()
    return not (month in ("2", "feb") and day in ("30", "31"))  # a day that never comes


def fires_at_most_once_a_day(cron: str) -> bool:
    """Whether a valid cron expression fires at most once a day: a macro such as `@daily`, or a
    single minute and a single hour (no list, range, step or `*`)."""
    fields = cron.split()
    if len(fields) == 1:
        return fields[0].lower() in AT_MOST_DAILY_MACROS
    minute, hour = fields[:2]
    return minute.isdigit() and hour.isdigit()
