"""The users every app fixture loads, with known behaviour, and when each of them visits.

A history is laid out backwards from `run_day`, the day the daily run is for: day offset 0 is
`run_day` itself, 69 the history's first day. Everything is a pure function of the user's index
and the day offset, so loading days [a, b] and then [b + 1, c] writes exactly what loading [a, c]
writes: a test loads the history up to the day before `run_day`, installs the pipeline's
triggers, then loads `run_day` live.

Cohorts (by index):
- steady: active 5 days a week, 1 or 2 visits a day (about 7.5 visits a week), also on run_day;
- reader: visits as steady users do, but writes nothing of the app's own: the only trace of a
  visit is the app's sign-in, session refresh or last-seen time, so only the login sources
  (inserted, or updated in place) show that they are there;
- dropped: 10 visits a week until a week ago, then a single visit (offset 2): use fell by 90%;
- quiet: steady until 10 days ago, then nothing (gone quiet for more than 7 days);
- excluded:<kind>: an account the app marks as never to be emailed (soft-deleted, disabled,
  locked, banned, anonymous, ...), half with the quiet pattern, half with the dropped one, so
  that only the exclusion keeps it out of the audience. Half of each kind is excluded the day
  before run_day, half live on run_day itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

HISTORY_DAYS = 70
USERS = 300
READERS = range(180, 200)
DROPPED = range(200, 230)
QUIET = range(230, 260)
EXCLUDED_FROM = 260  # 4 users per exclusion kind from here; the rest of the 300 are steady
EXCLUDED_PER_KIND = 4

FIRST_NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia"]
LAST_NAMES = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson"]


@dataclass(frozen=True)
class AppUser:
    index: int
    cohort: str  # steady | reader | dropped | quiet | excluded:<kind>
    first_name: str
    last_name: str

    @property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}"

    @property
    def email(self) -> str:
        return f"{self.first_name.lower()}.{self.last_name.lower()}.{self.index}@example.com"

    @property
    def exclusion(self) -> str | None:
        return (
            self.cohort.removeprefix("excluded:") if self.cohort.startswith("excluded:") else None
        )

    @property
    def excluded_offset(self) -> int:
        """The day offset on which the account is excluded: 1 (history) or 0 (live)."""
        return self.index % 2


def app_users(exclusion_kinds: list[str]) -> list[AppUser]:
    """The fixture's users; `exclusion_kinds` are the app's own ways of barring an account."""
    users = []
    for index in range(USERS):
        cohort = "steady"
        if index in READERS:
            cohort = "reader"
        elif index in DROPPED:
            cohort = "dropped"
        elif index in QUIET:
            cohort = "quiet"
        elif index >= EXCLUDED_FROM:
            kind = (index - EXCLUDED_FROM) // EXCLUDED_PER_KIND
            if kind < len(exclusion_kinds):
                cohort = f"excluded:{exclusion_kinds[kind]}"
        users.append(
            AppUser(
                index=index,
                cohort=cohort,
                first_name=FIRST_NAMES[index % len(FIRST_NAMES)],
                last_name=LAST_NAMES[(index // len(FIRST_NAMES)) % len(LAST_NAMES)],
            )
        )
    return users


def signed_up_at(user: AppUser, run_day: date) -> datetime:
    """Every account exists before the history starts (none is `new`)."""
    first_day = run_day - timedelta(days=HISTORY_DAYS - 1)
    return datetime.combine(first_day, datetime.min.time(), UTC) - timedelta(
        days=3 + user.index % 20, hours=user.index % 11
    )


def visits_on(user: AppUser, offset: int) -> int:
    """How many visits the user makes on the day `offset` days before run_day."""
    steady_day = (offset + user.index) % 7 not in (0, 3)
    steady = (1 + (offset + user.index) % 2) if steady_day else 0
    if user.cohort in ("steady", "reader"):
        return steady
    if user.cohort == "quiet" or (user.exclusion and user.index % 4 < 2):
        return steady if offset >= 10 else 0
    # dropped, and half of each excluded kind (the other half quiet)
    if offset >= 7:
        return 2 if steady_day else 0
    return 1 if offset == 2 else 0


def visit_times(user: AppUser, day: date, offset: int) -> list[datetime]:
    """The visits' start times (UTC), hours apart: far more than any visit gap."""
    start = datetime.combine(day, datetime.min.time(), UTC)
    return [
        start + timedelta(hours=8 + 5 * visit + user.index % 3, minutes=(user.index * 7) % 50)
        for visit in range(visits_on(user, offset))
    ]


def days(run_day: date, first_offset: int, last_offset: int) -> Iterator[tuple[date, int]]:
    """(day, offset) from the older offset to the newer, inclusive."""
    for offset in range(first_offset, last_offset - 1, -1):
        yield run_day - timedelta(days=offset), offset


def naive(moment: datetime) -> datetime:
    """A time as Prisma and TypeORM store it in `timestamp` columns: UTC without a zone."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def signs_in(user: AppUser, offset: int, visit: int) -> bool:
    """Whether this visit starts a new login session: the first visit of each week (offsets
    7w..7w+6), as a 7-day refresh token expires; the other visits refresh it in place."""
    if visit > 0:
        return False
    week_start = offset - offset % 7
    return all(visits_on(user, older) == 0 for older in range(offset + 1, week_start + 7))


def session_week(offset: int) -> int:
    """The week (counted back from run_day) whose session a visit on `offset` uses."""
    return offset // 7


def exclusion_time(day: date) -> datetime:
    """When accounts are excluded on `day`: 06:00 UTC, before that day's visits."""
    return datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=6)
