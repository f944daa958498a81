"""documenso's history, written as the app writes it (see schema.sql): a "Session" and a SIGN_IN
security log row INSERTed at sign-in with "lastSignedIn" set, the session extended in place,
documents ("Envelope") and their DocumentAuditLog rows INSERTed, accounts disabled by an admin;
a personal organisation per user, team organisations with members and a "Subscription" each."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

from sqlalchemy import Connection, text

from retention_pipeline_tests.apps.cohorts import (
    HISTORY_DAYS,
    AppUser,
    app_users,
    days,
    exclusion_time,
    naive,
    session_week,
    signed_up_at,
    signs_in,
    visit_times,
)

SCHEMA = Path(__file__).with_name("schema.sql")
EXCLUSION_KINDS = ["disabled"]
USERS = app_users(EXCLUSION_KINDS)
TEAM_SIZE = 5
TEAM_ORGANISATIONS = 20  # users 0..99, five to an organisation; its first member owns it
SUBSCRIPTION_STATUS = ["ACTIVE", "ACTIVE", "PAST_DUE", "INACTIVE"]  # by organisation number % 4


def user_id(user: AppUser) -> str:
    return str(user.index + 1)


def team_organisation(user: AppUser) -> int | None:
    number = user.index // TEAM_SIZE
    return number if number < TEAM_ORGANISATIONS else None


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
        sessions, extended, sign_ins, envelopes, audit = [], [], [], [], []
        for user in USERS:
            for visit, moment in enumerate(visit_times(user, day, offset)):
                at = naive(moment)
                session = f"s{user.index}w{session_week(offset)}"
                if signs_in(user, offset, visit):
                    sessions.append({"id": session, "user": user.index + 1, "at": at})
                    sign_ins.append({"user": user.index + 1, "at": at})
                else:
                    extended.append({"id": session, "at": at})
                if user.cohort == "reader":  # nothing written but the sign-in
                    continue
                envelope = f"envelope_{user.index}_{offset}_{visit}"
                envelopes.append(
                    {
                        "id": envelope,
                        "user": user.index + 1,
                        "team": user.index + 1,
                        "at": at,
                        "title": f"Contract {offset}-{visit}.pdf",
                    }
                )
                audit.append(
                    {
                        "id": f"a_{envelope}_c",
                        "envelope": envelope,
                        "type": "DOCUMENT_CREATED",
                        "user": user.index + 1,
                        "at": at,
                        "name": user.full_name,
                        "email": user.email,
                    }
                )
                audit.append(
                    {
                        "id": f"a_{envelope}_s",
                        "envelope": envelope,
                        "type": "DOCUMENT_SENT",
                        "user": user.index + 1,
                        "at": naive(moment + timedelta(minutes=4)),
                        "name": user.full_name,
                        "email": user.email,
                    }
                )
        if sessions:
            connection.execute(
                text(
                    'INSERT INTO "Session" ("id", "sessionToken", "userId", "expiresAt", '
                    '"createdAt", "updatedAt") VALUES (:id, :id, :user, '
                    ":at + interval '30 days', :at, :at)"
                ),
                sessions,
            )
            connection.execute(
                text(
                    'INSERT INTO "UserSecurityAuditLog" ("userId", "createdAt", "type") '
                    "VALUES (:user, :at, 'SIGN_IN')"
                ),
                sign_ins,
            )
            connection.execute(
                text('UPDATE "User" SET "lastSignedIn" = :at WHERE "id" = :user'), sign_ins
            )
        if extended:  # a session in use is extended: its expiry moves, "updatedAt" with it
            connection.execute(
                text(
                    'UPDATE "Session" SET "expiresAt" = :at + interval \'30 days\', '
                    '"updatedAt" = :at WHERE "id" = :id'
                ),
                extended,
            )
        if envelopes:
            connection.execute(
                text(
                    'INSERT INTO "Envelope" ("id", "secondaryId", "type", "createdAt", '
                    '"updatedAt", "title", "status", "source", "signatureLevel", '
                    '"internalVersion", "userId", "teamId", "documentMetaId") VALUES (:id, :id, '
                    "'DOCUMENT', :at, :at, :title, 'PENDING', 'DOCUMENT', 'SES', 2, :user, "
                    ":team, :id)"
                ),
                envelopes,
            )
            connection.execute(
                text(
                    'INSERT INTO "DocumentAuditLog" ("id", "envelopeId", "createdAt", "type", '
                    '"data", "name", "email", "userId") VALUES (:id, :envelope, :at, :type, '
                    "'{}', :name, :email, :user)"
                ),
                audit,
            )
        for user in USERS:
            if user.exclusion == "disabled" and user.excluded_offset == offset:
                connection.execute(  # the admin panel's "disable user"
                    text('UPDATE "User" SET "disabled" = true, "updatedAt" = :at WHERE "id" = :id'),
                    {"at": naive(exclusion_time(day)), "id": user.index + 1},
                )


def _sign_up(connection: Connection, run_day: date) -> None:
    users = [
        {
            "id": user.index + 1,
            "name": user.full_name,
            "email": user.email,
            "at": naive(signed_up_at(user, run_day)),
        }
        for user in USERS
    ]
    connection.execute(
        text(
            'INSERT INTO "User" ("id", "name", "email", "emailVerified", "createdAt", '
            '"updatedAt", "lastSignedIn") VALUES (:id, :name, :email, :at, :at, :at, :at)'
        ),
        users,
    )
    connection.exec_driver_sql(
        """SELECT setval(pg_get_serial_sequence('"User"', 'id'), (SELECT max("id") FROM "User"))"""
    )
    # Sign-up creates the user's personal organisation with one team (the team of its documents).
    organisations = [
        {
            "id": f"org_personal_{row['id']}",
            "type": "PERSONAL",
            "name": "Personal Organisation",
            "owner": row["id"],
            "at": row["at"],
            "customer": None,
        }
        for row in users
    ]
    first = {team_organisation(u): u for u in reversed(USERS) if team_organisation(u) is not None}
    for number, owner in sorted(first.items()):
        organisations.append(
            {
                "id": f"org_team_{number}",
                "type": "ORGANISATION",
                "name": f"Team {number}",
                "owner": owner.index + 1,
                "at": naive(signed_up_at(owner, run_day)),
                "customer": f"cus_org{number}",
            }
        )
    connection.execute(
        text(
            'INSERT INTO "Organisation" ("id", "createdAt", "updatedAt", "type", "name", "url", '
            '"customerId", "organisationClaimId", "ownerUserId", '
            '"organisationGlobalSettingsId", "organisationAuthenticationPortalId") VALUES '
            '(:id, :at, :at, CAST(:type AS "OrganisationType"), :name, :id, :customer, '
            "'claim_' || :id, :owner, 'settings_' || :id, 'portal_' || :id)"
        ),
        organisations,
    )
    connection.execute(
        text(
            'INSERT INTO "Team" ("id", "name", "url", "createdAt", "organisationId", '
            '"teamGlobalSettingsId") VALUES (:id, :name, :url, :at, :org, :settings)'
        ),
        [
            {
                "id": row["id"],
                "name": "Personal Team",
                "url": f"personal-{row['id']}",
                "at": row["at"],
                "org": f"org_personal_{row['id']}",
                "settings": f"team_settings_{row['id']}",
            }
            for row in users
        ],
    )
    members = [
        {
            "id": f"member_personal_{row['id']}",
            "user": row["id"],
            "org": f"org_personal_{row['id']}",
            "at": row["at"],
        }
        for row in users
    ] + [
        {
            "id": f"member_{user.index}",
            "user": user.index + 1,
            "org": f"org_team_{team_organisation(user)}",
            "at": naive(signed_up_at(user, run_day)),
        }
        for user in USERS
        if team_organisation(user) is not None
    ]
    connection.execute(
        text(
            'INSERT INTO "OrganisationMember" ("id", "createdAt", "updatedAt", "userId", '
            '"organisationId") VALUES (:id, :at, :at, :user, :org)'
        ),
        members,
    )
    connection.execute(
        text(
            'INSERT INTO "Subscription" ("status", "planId", "priceId", "periodEnd", '
            '"createdAt", "updatedAt", "customerId", "organisationId") VALUES '
            "(CAST(:status AS \"SubscriptionStatus\"), :plan, 'price_teams_monthly', "
            ":at + interval '30 days', :at, :at, :customer, :org)"
        ),
        [
            {
                "status": SUBSCRIPTION_STATUS[number % 4],
                "plan": f"sub_org{number}",
                "customer": f"cus_org{number}",
                "org": f"org_team_{number}",
                "at": naive(signed_up_at(owner, run_day)),
            }
            for number, owner in sorted(first.items())
        ],
    )
