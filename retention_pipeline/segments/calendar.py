"""Which day a scheduled run is for."""

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo


def day_just_ended(scheduled: datetime, timezone: str) -> date:
    """The partition a run at `scheduled` materializes: the day before, in the loop timezone."""
    return scheduled.astimezone(ZoneInfo(timezone)).date() - timedelta(days=1)


# An audience this many days old or older is history (a backfill), not a reason to email today.
SEND_WINDOW_DAYS = 3
# A member's due time falls at most this many days after its audience's day (a day built as late
# as the send window allows, its local time up to a day later, quiet hours up to another): the
# evaluation of a loop with due times re-reads its assignments this much further back.
DUE_LAG_DAYS = SEND_WINDOW_DAYS + 2


def within_send_window(day: date, now: datetime, timezone: str) -> bool:
    """Whether an audience of `day` may still be emailed at `now`: the day just ended, or the
    one before it for a run that was late."""
    return day > now.astimezone(ZoneInfo(timezone)).date() - timedelta(days=SEND_WINDOW_DAYS)


def send_window(day: date, now: datetime, timezone: str) -> list[date]:
    """The audience days a send run for `day` claims at `now`: `day` and the ones before it that
    are still within the send window, oldest first, so rows added by re-materializing a recent
    day are not left behind while older days, history like any backfill, are never emailed."""
    candidates = [day - timedelta(days=back) for back in range(SEND_WINDOW_DAYS - 1, -1, -1)]
    return [each for each in candidates if within_send_window(each, now, timezone)]
