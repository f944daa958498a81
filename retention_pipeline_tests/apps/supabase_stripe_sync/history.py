"""A Supabase app's history, written as GoTrue, the app and stripe-sync-engine write it (see
schema.sql): auth.sessions INSERTed at sign-in and refreshed in place (refreshed_at,
updated_at), last_sign_in_at set, todos INSERTed, users soft-deleted (deleted_at) or banned
(banned_until) by the dashboard, anonymous sign-ins; Stripe customers carrying the user's id in
their metadata, subscriptions with one item on a monthly or yearly price."""

from __future__ import annotations

import json
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
EXCLUSION_KINDS = ["soft_deleted", "banned", "anonymous"]
USERS = app_users(EXCLUSION_KINDS)
CUSTOMERS = 150  # users 0..149 pay
SUBSCRIPTION_STATUS = ["active", "active", "trialing", "past_due", "canceled"]  # by index % 5
PRICES = {  # id: (unit_amount in cents, recurring interval)
    "price_monthly": (1200, "month"),
    "price_yearly": (12000, "year"),
}
NAMESPACE = uuid.UUID("6f1c7e1e-3c9a-4b8e-9d55-5a0d0c6b2e11")


def user_id(user: AppUser) -> str:
    return str(uuid.uuid5(NAMESPACE, f"user-{user.index}"))


def price_of(user: AppUser) -> str:
    return "price_yearly" if user.index % 2 else "price_monthly"


def quantity_of(user: AppUser) -> int:
    return 1 + user.index % 3


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
        sign_ins, refreshes, todos = [], [], []
        for user in USERS:
            for visit, moment in enumerate(visit_times(user, day, offset)):
                session = {
                    "id": str(
                        uuid.uuid5(NAMESPACE, f"session-{user.index}-{session_week(offset)}")
                    ),
                    "at": moment,
                    "naive": naive(moment),
                    "user": user_id(user),
                }
                (sign_ins if signs_in(user, offset, visit) else refreshes).append(session)
                if user.cohort == "reader":  # nothing written but the sign-in
                    continue
                for number in range(1 + (offset + visit) % 2):
                    todos.append(
                        {
                            "user": user_id(user),
                            "task": f"buy oat milk ({offset}.{visit}.{number})",
                            "at": moment + timedelta(minutes=2 * number),
                        }
                    )
        if sign_ins:
            connection.execute(
                text(
                    "INSERT INTO auth.sessions (id, user_id, created_at, updated_at, aal, "
                    "refreshed_at) VALUES (:id, :user, :at, :at, 'aal1', NULL)"
                ),
                sign_ins,
            )
            connection.execute(
                text(
                    "UPDATE auth.users SET last_sign_in_at = :at, updated_at = :at WHERE id = :user"
                ),
                sign_ins,
            )
        if refreshes:  # the refresh-token grant: refreshed_at is naive UTC
            connection.execute(
                text(
                    "UPDATE auth.sessions SET refreshed_at = :naive, updated_at = :at "
                    "WHERE id = :id"
                ),
                refreshes,
            )
        if todos:
            connection.execute(
                text(
                    "INSERT INTO public.todos (user_id, task, inserted_at) "
                    "VALUES (:user, :task, :at)"
                ),
                todos,
            )
        _exclude(connection, day, offset)


def _exclude(connection: Connection, day: date, offset: int) -> None:
    at = exclusion_time(day)
    for user in USERS:
        if user.excluded_offset != offset or user.exclusion not in ("soft_deleted", "banned"):
            continue
        if user.exclusion == "soft_deleted":
            # deleteUser(id, shouldSoftDelete=true): deleted_at set, sessions removed. (GoTrue
            # also blanks the email and metadata; kept, so only deleted_at bars the account.)
            connection.execute(
                text("UPDATE auth.users SET deleted_at = :at, updated_at = :at WHERE id = :id"),
                {"at": at, "id": user_id(user)},
            )
            connection.execute(
                text("DELETE FROM auth.sessions WHERE user_id = :id"), {"id": user_id(user)}
            )
        else:  # updateUserById(id, {ban_duration: "876000h"})
            connection.execute(
                text(
                    "UPDATE auth.users SET banned_until = :at + interval '876000 hours', "
                    "updated_at = :at WHERE id = :id"
                ),
                {"at": at, "id": user_id(user)},
            )


def _sign_up(connection: Connection, run_day: date) -> None:
    rows = []
    for user in USERS:
        anonymous = user.exclusion == "anonymous"
        rows.append(
            {
                "id": user_id(user),
                "email": None if anonymous else user.email,
                "at": signed_up_at(user, run_day),
                "app": json.dumps(
                    {
                        "provider": "anonymous" if anonymous else "google",
                        "providers": [] if anonymous else ["google"],
                    }
                ),
                "meta": json.dumps(
                    {}
                    if anonymous
                    else {
                        "full_name": user.full_name,
                        "name": user.full_name,
                        "avatar_url": f"https://avatars.example/{user.index}",
                    }
                ),
                "anonymous": anonymous,
            }
        )
    connection.execute(
        text(
            "INSERT INTO auth.users (instance_id, id, aud, role, email, email_confirmed_at, "
            "raw_app_meta_data, raw_user_meta_data, created_at, updated_at, is_anonymous) "
            "VALUES ('00000000-0000-0000-0000-000000000000', :id, 'authenticated', "
            "'authenticated', :email, CASE WHEN :anonymous THEN NULL ELSE :at END, "
            "CAST(:app AS jsonb), CAST(:meta AS jsonb), :at, :at, :anonymous)"
        ),
        rows,
    )
    connection.execute(
        text(
            "INSERT INTO stripe.products (id, object, active, name, created) VALUES "
            "('prod_todo_pro', 'product', true, 'Todo Pro', 1700000000)"
        )
    )
    connection.execute(
        text(
            "INSERT INTO stripe.prices (id, object, active, currency, unit_amount, recurring, "
            "type, product, created) VALUES (:id, 'price', true, 'usd', :amount, "
            "CAST(:recurring AS jsonb), 'recurring', 'prod_todo_pro', 1700000000)"
        ),
        [
            {
                "id": price,
                "amount": amount,
                "recurring": json.dumps({"interval": interval, "interval_count": 1}),
            }
            for price, (amount, interval) in PRICES.items()
        ],
    )
    customers = [user for user in USERS[:CUSTOMERS]]
    connection.execute(
        text(
            "INSERT INTO stripe.customers (id, object, email, name, metadata, created) VALUES "
            "(:id, 'customer', :email, :name, CAST(:metadata AS jsonb), :created)"
        ),
        [
            {
                "id": f"cus_{user.index:05d}",
                "email": user.email,
                "name": user.full_name,
                "metadata": json.dumps({"user_id": user_id(user)}),
                "created": int(signed_up_at(user, run_day).timestamp()),
            }
            for user in customers
        ],
    )
    connection.execute(
        text(
            "INSERT INTO stripe.subscriptions (id, object, status, customer, items, plan, "
            "created, current_period_start, current_period_end, cancel_at_period_end) VALUES "
            "(:id, 'subscription', CAST(:status AS stripe.subscription_status), :customer, "
            "CAST(:items AS jsonb), :price, :created, :created, :created + 2592000, false)"
        ),
        [
            {
                "id": f"sub_{user.index:05d}",
                "customer": f"cus_{user.index:05d}",
                "status": SUBSCRIPTION_STATUS[user.index % 5],
                "price": price_of(user),
                "created": int(signed_up_at(user, run_day).timestamp()),
                "items": json.dumps({"object": "list", "data": [{"id": f"si_{user.index:05d}"}]}),
            }
            for user in customers
        ],
    )
    connection.execute(
        text(
            "INSERT INTO stripe.subscription_items (id, object, quantity, price, subscription, "
            "created, deleted) VALUES (:id, 'subscription_item', :quantity, :price, "
            ":subscription, :created, false)"
        ),
        [
            {
                "id": f"si_{user.index:05d}",
                "quantity": quantity_of(user),
                "price": price_of(user),
                "subscription": f"sub_{user.index:05d}",
                "created": int(signed_up_at(user, run_day).timestamp()),
            }
            for user in customers
        ],
    )
