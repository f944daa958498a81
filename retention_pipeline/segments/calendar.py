"""Which day a scheduled run is for."""

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo


def day_just_ended(scheduled: datetime, timezone: str) -> date:
    """The partition a run at `scheduled` materializes: the day before, in the loop timezone."""
    return scheduled.astimezone(ZoneInfo(timezone)).date() - timedelta(days=1)
