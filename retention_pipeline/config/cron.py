"""The loops' cron expressions, checked without Dagster: five fields or a macro, and firing at
most once a day, since every run of a day serves the same partition (the day just ended).

Stricter than Dagster where the two differ (`L`, `W` and `#` are refused), never looser: what
passes here, Dagster schedules."""

from __future__ import annotations

from datetime import date

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


# The macros that fire at most daily, as the five fields they stand for.
MACRO_FIELDS = {
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


def _fields(cron: str) -> list[str]:
    return MACRO_FIELDS.get(cron.strip().lower(), cron).split()


def time_of_day(cron: str) -> tuple[int, int]:
    """(hour, minute) of a cron expression that fires at most once a day."""
    minute, hour = _fields(cron)[:2]
    return int(hour), int(minute)


def _values(
    field: str, lowest: int, highest: int, names: tuple[str, ...], *, sunday_is_7: bool = False
) -> set[int]:
    """The values a valid cron field stands for. A range whose end comes before its start wraps
    around (`sat-sun`, `nov-feb`, `25-5`), as Dagster reads it; a day of week given as 7 is
    Sunday, 0."""
    span = highest - lowest + 1

    def number(text: str) -> int:
        value = int(text) if text.isdigit() else names.index(text.lower()) + lowest
        return lowest if sunday_is_7 and value == 7 else value

    values = set()
    for item in field.split(","):
        body, _, step = item.partition("/")
        if body in ("*", "?"):
            start, end = lowest, highest
        else:
            first, has_range, last = body.partition("-")
            start = number(first)
            # `a/n` runs from a to the field's end, as cron reads it.
            end = number(last) if has_range else (highest if step else start)
        for offset in range(0, (end - start) % span + 1, int(step or 1)):
            values.add(lowest + (start - lowest + offset) % span)
    return values


def fires_on(cron: str, day: date) -> bool:
    """Whether a valid cron expression fires on `day`: its month, and its day of month or day
    of week (either, where both are restricted, as cron reads them)."""
    _, _, day_of_month, month, day_of_week = _fields(cron)
    if day.month not in _values(month, 1, 12, MONTH_NAMES):
        return False
    by_month_day = day.day in _values(day_of_month, 1, 31, ())
    weekday = (day.weekday() + 1) % 7  # cron counts from Sunday, 0
    by_week_day = weekday in _values(day_of_week, 0, 6, DAY_NAMES, sunday_is_7=True)
    if day_of_month in ("*", "?") or day_of_week in ("*", "?"):
        return by_month_day and by_week_day
    return by_month_day or by_week_day
