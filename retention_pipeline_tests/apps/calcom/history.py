"""cal.com's history, written as the app writes it (see schema.sql): no "Session" rows (NextAuth's
JWT strategy), users."lastActiveAt" refreshed in place once a day, "Booking" rows INSERTed for
the organizer, accounts locked by an admin, a platform customer's users made through the API;
teams with "Membership" rows, billed through the Stripe ids in "Team".metadata."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

from sqlalchemy import Connection, text

from retention_pipeline_tests.apps.cohorts import (
    HISTORY_DAYS,
    AppUser,
    app_users,
    days,
    naive,
    signed_up_at,
    visit_times,
)

SCHEMA = Path(__file__).with_name("schema.sql")
# A platform customer's end user, made through cal.com's API v2 with "isPlatformManaged" set: the
# customer's person, not cal.com's.
EXCLUSION_KINDS = ["locked", "platform_managed"]
USERS = app_users(EXCLUSION_KINDS)
TEAM_SIZE = 5
TEAMS = 20  # users 0..99, five to a team; the first member owns it
# By team number % 4: paid, paid, checkout started but unpaid (pendingPayment), free.
TEAM_BILLING = ["paid", "paid", "pending", "free"]


def user_id(user: AppUser) -> str:
    return str(user.index + 1)


def team_of(user: AppUser) -> int | None:
    number = user.index // TEAM_SIZE
    return number if number < TEAMS else None


def create(connection: Connection) -> None:
    connection.exec_driver_sql(SCHEMA.read_text())


def load(
    connection: Connection,
    run_day: date,
    first_offset: int = HISTORY_DAYS - 1,
    last_offset: int = 0,
) -> None:
    if first_offset == HISTORY_DAYS - 1:
        _sign_up(connection, run_day)
    for day, offset in days(run_day, first_offset, last_offset):
        seen, bookings = [], []
        for user in USERS:
            times = visit_times(user, day, offset)
            if times:  # updateLastActiveAt: at most once a day, on the day's first request
                seen.append({"id": user.index + 1, "at": naive(times[0])})
            if user.cohort == "reader":  # no booking: the last-seen time is the only trace
                continue
            for visit, moment in enumerate(times):
                start = naive(moment + timedelta(days=3))
                bookings.append(
                    {
                        "uid": f"bk-{user.index}-{offset}-{visit}",
                        "user": user.index + 1,
                        "email": user.email,
                        "title": f"30 min meeting between {user.full_name} and Guest {offset}",
                        "start": start,
                        "end": start + timedelta(minutes=30),
                        "at": naive(moment),
                    }
                )
        if seen:
            connection.execute(
                text('UPDATE "users" SET "lastActiveAt" = :at WHERE "id" = :id'), seen
            )
        if bookings:
            connection.execute(
                text(
                    'INSERT INTO "Booking" ("uid", "userId", "userPrimaryEmail", "title", '
                    '"startTime", "endTime", "createdAt", "updatedAt", "status", '
                    '"creationSource") VALUES (:uid, :user, :email, :title, :start, :end, '
                    ":at, :at, 'accepted', 'webapp')"
                ),
                bookings,
            )
        for user in USERS:
            if user.exclusion == "locked" and user.excluded_offset == offset:
                connection.execute(  # the admin's "lock user account"
                    text('UPDATE "users" SET "locked" = true WHERE "id" = :id'),
                    {"id": user.index + 1},
                )


def _sign_up(connection: Connection, run_day: date) -> None:
    connection.execute(
        text(
            'INSERT INTO "users" ("id", "username", "name", "email", "emailVerified", '
            '"timeZone", "created", "completedOnboarding", "identityProvider", "metadata", '
            '"creationSource", "isPlatformManaged") VALUES (:id, :username, :name, :email, :at, '
            ":tz, :at, true, 'CAL', '{}', :source, :managed)"
        ),
        [
            {
                "id": user.index + 1,
                "username": f"{user.first_name.lower()}{user.index}",
                "name": user.full_name,
                "email": user.email,
                "at": naive(signed_up_at(user, run_day)),
                "tz": "Europe/London" if user.index % 2 else "America/New_York",
                "source": "api_v2" if user.exclusion == "platform_managed" else "webapp",
                "managed": user.exclusion == "platform_managed",
            }
            for user in USERS
        ],
    )
    connection.exec_driver_sql(
        """SELECT setval(pg_get_serial_sequence('"users"', 'id'), """
        """(SELECT max("id") FROM "users"))"""
    )
    teams = []
    for number in range(TEAMS):
        billing = TEAM_BILLING[number % 4]
        metadata = {}
        if billing == "paid":
            metadata = {
                "subscriptionId": f"sub_team{number}",
                "subscriptionItemId": f"si_team{number}",
                "paymentId": f"cs_team{number}",
            }
        elif billing == "pending":
            metadata = {"paymentId": f"cs_team{number}"}
        teams.append(
            {
                "id": number + 1,
                "name": f"Team {number}",
                "slug": f"team-{number}",
                "metadata": json.dumps(metadata),
                "pending": billing == "pending",
            }
        )
    connection.execute(
        text(
            'INSERT INTO "Team" ("id", "name", "slug", "metadata", "pendingPayment") VALUES '
            "(:id, :name, :slug, CAST(:metadata AS jsonb), :pending)"
        ),
        teams,
    )
    connection.execute(
        text(
            'INSERT INTO "Membership" ("teamId", "userId", "accepted", "role") VALUES '
            '(:team, :user, true, CAST(:role AS "MembershipRole"))'
        ),
        [
            {
                "team": team_of(user) + 1,
                "user": user.index + 1,
                "role": "OWNER" if user.index % TEAM_SIZE == 0 else "MEMBER",
            }
            for user in USERS
            if team_of(user) is not None
        ],
    )
