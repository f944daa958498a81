"""brocoders/nestjs-boilerplate's history, written as the app writes it (see schema.sql): a
session INSERTed at sign-in and refreshed in place, comments and projects INSERTed (a fifth
of the steady users only create projects; readers write neither), users
soft-deleted (`deletedAt`) or set inactive (`statusId` 2) by an admin."""

from __future__ import annotations

import uuid
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
EXCLUSION_KINDS = ["soft_deleted", "inactive"]
USERS = app_users(EXCLUSION_KINDS)
COMMENTS = uuid.UUID("9b2d4a1e-5c7f-4e3a-8b6d-1f0e2c3a4b5d")
PROJECTS = uuid.UUID("4c8e2f0a-7d1b-4a6e-9c3f-2b5d8e1a0f7c")
CREATE_PROJECT = (
    'INSERT INTO "project" ("id", "name", "ownerId", "createdAt", "updatedAt") '
    "VALUES (:project, :name, :id, :at, :at)"
)


def creates_projects(user: AppUser) -> bool:
    """Whether the user's visits create projects rather than post comments: activity found
    only in the second of the app's two tables."""
    return user.cohort == "steady" and user.index % 5 == 0


def user_id(user: AppUser) -> str:
    """The app's id of the user, as the pipeline reads it (text)."""
    return str(user.index + 1)


def create(connection: Connection) -> None:
    connection.exec_driver_sql(SCHEMA.read_text())


def load(
    connection: Connection,
    run_day: date,
    first_offset: int = HISTORY_DAYS - 1,
    last_offset: int = 0,
) -> None:
    """Write the days from `first_offset` to `last_offset` (days before run_day), oldest first;
    the accounts themselves with the first day of the history."""
    if first_offset == HISTORY_DAYS - 1:
        _sign_up(connection, run_day)
    for day, offset in days(run_day, first_offset, last_offset):
        sign_ins, refreshes, comments, projects = [], [], [], []
        for user in USERS:
            for visit, moment in enumerate(visit_times(user, day, offset)):
                session = {"id": user.index * 100 + session_week(offset) + 1, "at": naive(moment)}
                hash_ = f"{user.index}-{offset}-{visit}"
                if signs_in(user, offset, visit):
                    sign_ins.append({**session, "user": user.index + 1, "hash": hash_})
                else:
                    refreshes.append({**session, "hash": hash_})
                if user.cohort == "reader":
                    continue
                if creates_projects(user):
                    projects.append(
                        {
                            "project": uuid.uuid5(PROJECTS, f"{user.index}-{offset}-{visit}"),
                            "name": f"Sprint {offset}.{visit}",
                            "id": user.index + 1,
                            "at": naive(moment),
                        }
                    )
                    continue
                for number in range(1 + (offset + visit) % 2):
                    comments.append(
                        {
                            "id": uuid.uuid5(COMMENTS, f"{user.index}-{offset}-{visit}-{number}"),
                            "project": _project_id(user),
                            "author": user.index + 1,
                            "body": f"Looks good to me, see the draft ({offset}/{visit})",
                            "at": naive(moment + timedelta(minutes=3 * number)),
                        }
                    )
        if sign_ins:
            connection.execute(
                text(
                    'INSERT INTO "session" ("id", "hash", "createdAt", "updatedAt", "userId") '
                    "VALUES (:id, :hash, :at, :at, :user)"
                ),
                sign_ins,
            )
        if refreshes:  # auth.service.ts refreshToken: a new hash, "updatedAt" by TypeORM
            connection.execute(
                text('UPDATE "session" SET "hash" = :hash, "updatedAt" = :at WHERE "id" = :id'),
                refreshes,
            )
        if comments:
            connection.execute(
                text(
                    'INSERT INTO "comment" ("id", "body", "projectId", "authorId", "createdAt", '
                    '"updatedAt") VALUES (:id, :body, :project, :author, :at, :at)'
                ),
                comments,
            )
        if projects:
            connection.execute(text(CREATE_PROJECT), projects)
        _exclude(connection, day, offset)


def _project_id(user: AppUser) -> str:
    return f"00000000-0000-4000-9000-{user.index:012d}"


def _sign_up(connection: Connection, run_day: date) -> None:
    rows = [
        {
            "id": user.index + 1,
            "email": user.email,
            "first": user.first_name,
            "last": user.last_name,
            "at": naive(signed_up_at(user, run_day)),
            "project": _project_id(user),
        }
        for user in USERS
    ]
    connection.execute(
        text(
            'INSERT INTO "user" ("id", "email", "password", "provider", "firstName", "lastName", '
            '"createdAt", "updatedAt", "roleId", "statusId") '
            "VALUES (:id, :email, 'bcrypt-hash', 'email', :first, :last, :at, :at, 2, 1)"
        ),
        rows,
    )
    connection.exec_driver_sql(
        """SELECT setval(pg_get_serial_sequence('"user"', 'id'), (SELECT max("id") FROM "user"))"""
    )
    connection.execute(text(CREATE_PROJECT), [{**row, "name": "My first project"} for row in rows])


def _exclude(connection: Connection, day: date, offset: int) -> None:
    at = naive(exclusion_time(day))
    for user in USERS:
        if user.exclusion is None or user.excluded_offset != offset:
            continue
        if user.exclusion == "soft_deleted":  # users.service remove -> repository.softDelete
            connection.execute(
                text('UPDATE "user" SET "deletedAt" = :at WHERE "id" = :id'),
                {"at": at, "id": user.index + 1},
            )
            connection.execute(  # session.service deleteByUserId: a soft delete too
                text('UPDATE "session" SET "deletedAt" = :at WHERE "userId" = :id'),
                {"at": at, "id": user.index + 1},
            )
        else:  # an admin's PATCH /users/:id {status: {id: 2}}
            connection.execute(
                text('UPDATE "user" SET "statusId" = 2, "updatedAt" = :at WHERE "id" = :id'),
                {"at": at, "id": user.index + 1},
            )
