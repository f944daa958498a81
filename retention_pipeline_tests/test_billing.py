"""Subscriptions the way apps keep them, through configuration alone: owned by an organization
or a Stripe customer, in the app's own status vocabulary, amounts in major units, in JSON or a
price times a quantity, credited to members by a stated rule; and what `check` refuses."""

from __future__ import annotations

import copy
import itertools
from datetime import date, timedelta

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.audience.build import build_audience
from retention_pipeline.config import ConfigError, parse_config
from retention_pipeline.outcomes.evaluate import evaluate_outcomes
from retention_pipeline.preflight import preflight
from retention_pipeline.segments.conditions import condition_user_ids
from retention_pipeline.segments.rules import build_day_segments
from retention_pipeline.segments.snapshot.build import build_snapshot
from retention_pipeline.segments.snapshot.statement import SnapshotError
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT, make_config

DAY = date(2026, 11, 20)
_numbers = itertools.count()

APP = """
CREATE TABLE "User" (id bigint PRIMARY KEY, email text NOT NULL, "createdAt" timestamp NOT NULL);
CREATE TABLE "Event" ("userId" bigint, name text, "createdAt" timestamptz);
CREATE TABLE "Session" ("userId" bigint, "createdAt" timestamptz);
CREATE TABLE "Organisation" (id text PRIMARY KEY, "ownerUserId" bigint);
CREATE TABLE "OrganisationMember" (
    "organisationId" text, "userId" bigint, role text, accepted boolean);
CREATE TABLE "Subscription" (
    id text PRIMARY KEY, "organisationId" text, status text, "isActive" boolean,
    "priceId" text, quantity integer, amount numeric, data jsonb, "updatedAt" timestamptz);
CREATE TABLE "Price" (id text PRIMARY KEY, "unitAmount" integer, interval text, currency text);
INSERT INTO "User" SELECT n, 'u' || n || '@example.com', '2026-01-01' FROM generate_series(1, 5) n;
-- Org a: users 1 (owner), 2, 3 (3 has not accepted); org b: user 4 alone. User 5 is free.
INSERT INTO "Organisation" VALUES ('org_a', 1), ('org_b', 4);
INSERT INTO "OrganisationMember" VALUES
    ('org_a', 1, 'OWNER', true), ('org_a', 2, 'MEMBER', true), ('org_a', 3, 'MEMBER', false),
    ('org_b', 4, 'OWNER', true);
INSERT INTO "Price" VALUES
    ('price_team', 3000, 'month', 'eur'), ('price_year', 12000, 'year', 'eur');
INSERT INTO "Subscription" VALUES
    ('sub_a', 'org_a', 'ACTIVE', true, 'price_team', 2, 60.00,
     '{"plan": {"amount": "60.00", "interval": "month"}}', '2026-11-01'),
    ('sub_b', 'org_b', 'PAST_DUE', false, 'price_year', 1, 120.00,
     '{"plan": {"amount": "120.00", "interval": "year"}}', '2026-11-01');
"""
USERS = {
    "table": "User",
    "columns": {"id": "id", "email": "email", "created_at": "createdAt"},
}
ACTIVITY = {
    "events": {
        "table": "Event",
        "columns": {"user_id": "userId", "name": "name", "created_at": "createdAt"},
    },
    "sessions": {"table": "Session", "columns": {"user_id": "userId", "created_at": "createdAt"}},
}
MEMBERS = {
    "table": "OrganisationMember",
    "owner": "organisationId",
    "user": "userId",
    "where": [{"column": "accepted", "is": True}],
}
PRICE = {"table": "Price", "amount": "unitAmount"}
ORG_OWNED = {
    "table": "Subscription",
    "owner": {"column": "organisationId", "members": MEMBERS},
    "columns": {"status": "status", "plan": "priceId", "updated_at": "updatedAt"},
    "status": {"ACTIVE": "active", "PAST_DUE": "past_due", "INACTIVE": "canceled"},
    "amount": {"column": "amount", "unit": "major"},
    "credit": "each",
}


@pytest.fixture(scope="module")
def app(create_database):
    url = create_database()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(APP))
    yield url, engine
    engine.dispose()


def _config(url: str, subscriptions: dict | None, schema: str):
    tables = {"users": USERS, **ACTIVITY}
    if subscriptions is not None:
        tables["subscriptions"] = subscriptions
    return make_config(url, schema=schema, tables=tables)


def _snapshot(app, subscriptions: dict | None) -> dict[str, tuple]:
    """Each user's (status, plan, monthly_amount_cents, currency) in a real snapshot build."""
    url, engine = app
    schema = f"retention_h4_{next(_numbers)}"
    config = _config(url, subscriptions, schema)
    install(engine, config, second_install=True)  # beside the module's other cases
    with engine.begin() as connection:
        build_snapshot(connection, config, DAY)
        rows = connection.execute(
            text(f"""
                SELECT user_id, subscription_status, subscription_plan, monthly_amount_cents,
                       subscription_currency
                FROM {schema}.user_activity_snapshot WHERE partition_date = :day"""),
            {"day": DAY},
        ).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def test_org_owned_subscriptions_reach_every_accepted_member(app):
    snapshot = _snapshot(app, ORG_OWNED)

    assert snapshot == {
        "1": ("active", "price_team", 6000, None),
        "2": ("active", "price_team", 6000, None),
        "3": (None, None, None, None),  # not accepted: not a member
        "4": ("past_due", "price_year", 12000, None),
        "5": (None, None, None, None),
    }


@pytest.mark.parametrize(
    ("credit", "owning_member", "amounts"),
    [
        ("each", None, {"1": 6000, "2": 6000, "4": 12000}),
        ("split", None, {"1": 3000, "2": 3000, "4": 12000}),
        ("owner", [{"column": "role", "equals": "OWNER"}], {"1": 6000, "2": 0, "4": 12000}),
        (
            "owner",
            {"table": "Organisation", "id": "id", "user": "ownerUserId"},
            {"1": 6000, "2": 0, "4": 12000},
        ),
    ],
    ids=["each", "split", "owner-by-role", "owner-by-owner-table"],
)
def test_each_credit_rule_credits_its_figures(app, credit, owning_member, amounts):
    owner = {"column": "organisationId", "members": MEMBERS}
    if owning_member is not None:
        owner["owning_member"] = owning_member
    snapshot = _snapshot(app, {**ORG_OWNED, "owner": owner, "credit": credit})

    assert {user: row[2] for user, row in snapshot.items() if row[2] is not None} == amounts


def test_a_boolean_status_maps_to_ours(app):
    mapping = {**ORG_OWNED, "columns": {**ORG_OWNED["columns"], "status": "isActive"}}
    snapshot = _snapshot(app, {**mapping, "status": {True: "active", False: "canceled"}})

    assert snapshot["1"][0] == "active"
    assert snapshot["4"][0] == "canceled"


def test_an_unmapped_status_is_one_line_naming_the_value_and_the_key(app):
    url, engine = app
    config = _config(url, {**ORG_OWNED, "status": {"ACTIVE": "active"}}, "retention_h4_bad")
    install(engine, config, second_install=True)  # beside the module's other cases
    with engine.begin() as connection, pytest.raises(SnapshotError) as raised:
        build_snapshot(connection, config, DAY)

    line = (
        "database.tables.subscriptions.status: 'PAST_DUE' of public.Subscription.status is not "
        "mapped (mapped: ACTIVE)"
    )
    assert str(raised.value) == line
    # `check` names the value the run would stop on.
    assert line in preflight(engine, config).problems


def test_an_update_time_in_json_that_no_timestamp_reads_is_one_line_naming_the_key(app):
    url, engine = app
    columns = {**ORG_OWNED["columns"], "updated_at": "data.plan.amount"}  # numbers, not times
    config = _config(url, {**ORG_OWNED, "columns": columns}, "retention_h4_updated")
    install(engine, config, second_install=True)  # beside the module's other cases
    with engine.begin() as connection, pytest.raises(SnapshotError) as raised:
        build_snapshot(connection, config, DAY)

    assert str(raised.value).startswith(
        "database.tables.subscriptions.columns.updated_at: invalid input syntax for type "
        'timestamp with time zone: "'
    ), raised.value
    assert str(raised.value) in preflight(engine, config).problems


def test_an_amount_in_json_with_its_interval_in_json(app):
    columns = {**ORG_OWNED["columns"], "billing_interval": "data.plan.interval"}
    snapshot = _snapshot(
        app,
        {
            **ORG_OWNED,
            "columns": columns,
            "amount": {"column": "data.plan.amount", "unit": "major"},
        },
    )

    assert snapshot["1"][2] == 6000
    assert snapshot["4"][2] == 1000  # 120.00 a year


def test_an_amount_as_a_price_times_a_quantity(app):
    amount = {
        "price": {
            "table": "Price",
            "amount": "unitAmount",
            "interval": "interval",
            "currency": "currency",
        },
        "by": "priceId",
        "quantity": "quantity",
    }
    snapshot = _snapshot(app, {**ORG_OWNED, "amount": amount})

    assert snapshot["1"] == ("active", "price_team", 6000, "EUR")  # 2 seats x 30.00
    assert snapshot["4"] == ("past_due", "price_year", 1000, "EUR")


def test_an_app_that_stores_no_amount_says_so_and_keeps_status_and_members(app):
    """documenso and cal.com keep prices in Stripe alone: the status reaches every member and
    the amount is unknown, never 0 or a column misread as one."""
    owner = {**ORG_OWNED["owner"], "owning_member": [{"column": "role", "equals": "OWNER"}]}
    mapping = {**ORG_OWNED, "owner": owner, "columns": {"status": "status"}, "amount": "none"}
    for credit in ("each", "split", "owner"):
        snapshot = _snapshot(app, {**mapping, "credit": credit})

        assert snapshot["1"] == ("active", None, None, None), credit  # no plan mapped: none
        assert snapshot["2"] == ("active", None, None, None), credit  # not credited 0
        assert snapshot["4"] == ("past_due", None, None, None), credit


def test_where_selects_the_rows_of_a_table_that_are_subscriptions(app):
    """cal.com's "Team" rows are every team; only those where checkout began are billed."""
    yearly = [{"column": "data.plan.interval", "equals": "year"}]
    snapshot = _snapshot(app, {**ORG_OWNED, "where": yearly})

    assert snapshot["1"] == (None, None, None, None)
    assert snapshot["4"] == ("past_due", "price_year", 12000, None)


def test_an_app_that_bills_nothing_leaves_subscriptions_out(app):
    url, engine = app
    snapshot = _snapshot(app, None)

    assert set(snapshot.values()) == {(None, None, None, None)}
    report = preflight(engine, _config(url, None, "retention_h4_none"))
    assert report.problems == []


def test_check_refuses_an_owner_id_mapped_as_the_user_id(app):
    url, engine = app
    mapping = {
        "table": "Subscription",
        "columns": {
            "user_id": "organisationId",
            "status": "status",
            "plan": "priceId",
            "amount_cents": "quantity",
        },
        "status": ORG_OWNED["status"],
    }
    report = preflight(engine, _config(url, mapping, "retention_h4_uid"))

    assert (
        "database.tables.subscriptions.columns.user_id: 0 of 2 subscription rows reach a user: "
        "is `organisationId` a user id?"
    ) in report.problems


def test_check_refuses_an_owner_column_that_names_no_members_owner(app):
    """The subscription's own id mapped as its owner: no member row names it."""
    url, engine = app
    mapping = {**ORG_OWNED, "owner": {"column": "id", "members": MEMBERS}}
    report = preflight(engine, _config(url, mapping, "retention_h4_oid"))

    assert (
        "database.tables.subscriptions.owner.column: 0 of 2 subscription rows reach a user: "
        "is `id` an owner id of the members?"
    ) in report.problems


def test_check_refuses_an_epoch_mapped_as_the_amount(app):
    url, engine = app
    with engine.begin() as connection:
        connection.execute(
            text('CREATE TABLE "Plan" ("userId" bigint, status text, created integer)')
        )
        connection.execute(
            text("""INSERT INTO "Plan" SELECT n % 5 + 1, 'active', 1760000000 + n * 3600
                    FROM generate_series(1, 30) n""")
        )
    mapping = {
        "table": "Plan",
        "columns": {
            "user_id": "userId",
            "status": "status",
            "plan": "status",
            "amount_cents": "created",
        },
    }
    report = preflight(engine, _config(url, mapping, "retention_h4_epoch"))

    assert (
        "database.tables.subscriptions.columns.amount_cents: 30 of 30 amounts look like Unix "
        "times (1e9 to 2.2e9 seconds, or milliseconds): is it an amount?"
    ) in report.problems


def test_check_refuses_amounts_that_are_all_different_like_ids(app):
    url, engine = app
    with engine.begin() as connection:
        connection.execute(text('CREATE TABLE "Bill" ("userId" bigint, status text, id integer)'))
        connection.execute(
            text("INSERT INTO \"Bill\" SELECT n % 5 + 1, 'active', n FROM generate_series(1, 25) n")
        )
    mapping = {
        "table": "Bill",
        "columns": {
            "user_id": "userId",
            "status": "status",
            "plan": "status",
            "amount_cents": "id",
        },
    }
    report = preflight(engine, _config(url, mapping, "retention_h4_ids"))

    assert (
        "database.tables.subscriptions.columns.amount_cents: all 25 amounts are different, like "
        "ids (prices repeat across subscriptions): is it an amount?"
    ) in report.problems


@pytest.mark.parametrize(
    ("subscriptions", "message"),
    [
        (
            {**ORG_OWNED, "credit": None},
            "database.tables.subscriptions: credit: required with `owner`: owner, split or each",
        ),
        (
            {**ORG_OWNED, "status": {"ACTIVE": "live"}},
            "database.tables.subscriptions.status.ACTIVE: Input should be 'active'",
        ),
        (
            {**ORG_OWNED, "credit": "owner"},
            "database.tables.subscriptions: owner.owning_member: required with `credit: owner`",
        ),
        (
            {**ORG_OWNED, "amount": {"column": "amount", "unit": "euros"}},
            "database.tables.subscriptions.amount.unit: Input should be 'minor' or 'major'",
        ),
        (
            {"stripe": {"customer": "phone"}},
            "database.tables.subscriptions: stripe.customer: how a Stripe customer maps to a user",
        ),
        (
            {**ORG_OWNED, "amount": "unknown"},
            "database.tables.subscriptions.amount: 'unknown': give where the amount is "
            "({column: ...} or {price: ...}), or `none` when the app stores no amount",
        ),
    ],
    ids=[
        "credit-missing",
        "status-unknown",
        "owner-unidentified",
        "unit",
        "stripe-customer",
        "amount-word",
    ],
)
def test_bad_configuration_is_one_line_naming_the_key(subscriptions, message):
    with pytest.raises(ConfigError) as raised:
        _config("postgresql://h4@127.0.0.1/none", subscriptions, "retention")

    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("subscriptions", "message"),
    [
        (
            {**ORG_OWNED, "owner": {"column": "orgId", "members": MEMBERS}},
            "database.tables.subscriptions.owner.column: column 'orgId' does not exist in "
            "public.Subscription",
        ),
        (
            {**ORG_OWNED, "amount": {"column": "status.amount"}},
            "database.tables.subscriptions.amount.column: 'status.amount' is a path into "
            "public.Subscription.status, which is text, not json or jsonb",
        ),
        (
            {
                **ORG_OWNED,
                "owner": {"column": "organisationId", "members": {**MEMBERS, "table": "Member"}},
            },
            "database.tables.subscriptions.owner.members.table: app table public.Member does not "
            "exist in the app database",
        ),
        (
            {**ORG_OWNED, "where": [{"column": "paid", "is": True}]},
            "database.tables.subscriptions.where.0.column: column 'paid' does not exist in "
            "public.Subscription",
        ),
        (
            {**ORG_OWNED, "amount": {"price": {**PRICE, "amount": "unitPrice"}, "by": "priceId"}},
            "database.tables.subscriptions.amount.price.amount: column 'unitPrice' does not "
            "exist in public.Price",
        ),
        (
            {**ORG_OWNED, "amount": {"price": {**PRICE, "table": "Prices"}, "by": "priceId"}},
            "database.tables.subscriptions.amount.price.table: app table public.Prices does not "
            "exist in the app database",
        ),
        (
            {**ORG_OWNED, "amount": {"price": PRICE, "by": "price"}},
            "database.tables.subscriptions.amount.by: column 'price' does not exist in "
            "public.Subscription",
        ),
        (
            {**ORG_OWNED, "amount": {"price": PRICE, "by": "priceId", "quantity": "qty"}},
            "database.tables.subscriptions.amount.quantity: column 'qty' does not exist in "
            "public.Subscription",
        ),
        (
            {
                **ORG_OWNED,
                "amount": {
                    "price": PRICE,
                    "by": "priceId",
                    "items": {"table": "Item", "subscription": "subscriptionId"},
                },
            },
            "database.tables.subscriptions.amount.items.table: app table public.Item does not "
            "exist in the app database",
        ),
        (
            {
                **ORG_OWNED,
                "amount": {"price": {**PRICE, "interval": "currency.interval"}, "by": "priceId"},
            },
            "database.tables.subscriptions.amount.price.interval: 'currency.interval' is a path "
            "into public.Price.currency, which is text, not json or jsonb",
        ),
        (
            {**ORG_OWNED, "owner": {"column": "organisationId", "users_column": "customerId"}},
            "database.tables.subscriptions.owner.users_column: column 'customerId' does not "
            "exist in public.User",
        ),
        (
            {
                **ORG_OWNED,
                "owner": {
                    "column": "organisationId",
                    "members": {
                        "table": "OrganisationMember",
                        "owner": "organisationId",
                        "email": "mail",
                    },
                },
            },
            "database.tables.subscriptions.owner.members.email: column 'mail' does not exist in "
            "public.OrganisationMember",
        ),
        (
            {
                **ORG_OWNED,
                "credit": "owner",
                "owner": {
                    "column": "organisationId",
                    "members": MEMBERS,
                    "owning_member": {"table": "Organisation", "user": "owner"},
                },
            },
            "database.tables.subscriptions.owner.owning_member.user: column 'owner' does not "
            "exist in public.Organisation",
        ),
        (
            {
                **ORG_OWNED,
                "credit": "owner",
                "owner": {
                    "column": "organisationId",
                    "members": MEMBERS,
                    "owning_member": [{"column": "rank", "equals": "OWNER"}],
                },
            },
            "database.tables.subscriptions.owner.owning_member.0.column: column 'rank' does not "
            "exist in public.OrganisationMember",
        ),
        (
            {**ORG_OWNED, "columns": {**ORG_OWNED["columns"], "billing_interval": "status.every"}},
            "database.tables.subscriptions.columns.billing_interval: 'status.every' is a path "
            "into public.Subscription.status, which is text, not json or jsonb",
        ),
        (
            {"stripe": {"customer": "email", "schema": "stripe_mirror"}},
            "database.tables.subscriptions.table: app table stripe_mirror.subscriptions does not "
            "exist in the app database",
        ),
    ],
    ids=[
        "owner-column",
        "json-path-into-text",
        "members-table",
        "where-column",
        "price-amount",
        "price-table",
        "price-by",
        "quantity",
        "items-table",
        "price-interval-json-path-into-text",
        "users-column",
        "members-email",
        "owning-member-user",
        "owning-member-where",
        "billing-interval-json-path-into-text",
        "stripe-schema",
    ],
)
def test_a_mapping_the_database_does_not_have_is_one_line(app, subscriptions, message):
    url, engine = app
    report = preflight(engine, _config(url, subscriptions, "retention_h4_map"))

    assert any(problem.startswith(message) for problem in report.problems), report.problems


# The tables supabase/stripe-sync-engine writes (packages/sync-engine/src/database/migrations
# 0002, 0003, 0004, 0012, 0013, 0015, 0032, 0039 at e3eeb363), the columns the reader uses and
# their neighbours, with the types the migrations give them.
STRIPE_SYNC = """
CREATE SCHEMA stripe;
CREATE TYPE stripe.subscription_status AS ENUM ('trialing', 'active', 'canceled', 'incomplete',
    'incomplete_expired', 'past_due', 'unpaid', 'paused');
CREATE TYPE stripe.pricing_type AS ENUM ('one_time', 'recurring');
CREATE TABLE stripe.customers (id text PRIMARY KEY, object text, email text, metadata jsonb,
    name text, created integer, deleted boolean DEFAULT false NOT NULL,
    updated_at timestamptz DEFAULT timezone('utc'::text, now()) NOT NULL);
CREATE TABLE stripe.prices (id text PRIMARY KEY, object text, active boolean, currency text,
    metadata jsonb, nickname text, recurring jsonb, type stripe.pricing_type,
    unit_amount integer, product text, updated_at timestamptz DEFAULT now() NOT NULL);
CREATE TABLE stripe.subscriptions (id text PRIMARY KEY, object text, items jsonb,
    status stripe.subscription_status, created integer, current_period_end integer,
    customer text, plan text, updated_at timestamptz DEFAULT now() NOT NULL);
CREATE TABLE stripe.subscription_items (id text PRIMARY KEY, object text, created integer,
    deleted boolean, metadata jsonb, quantity integer, price text, subscription text,
    current_period_end integer);
ALTER TABLE "User" ADD COLUMN "stripeCustomerId" text;
UPDATE "User" SET "stripeCustomerId" = 'cus_' || id;
INSERT INTO stripe.customers (id, email, metadata) VALUES
    ('cus_1', 'u1@example.com', '{"user_id": "1"}'),
    ('cus_4', 'U4@example.com', '{"user_id": "4"}');
INSERT INTO stripe.prices (id, currency, recurring, type, unit_amount, product) VALUES
    ('price_seat', 'usd', '{"interval": "month", "interval_count": 1}', 'recurring', 1000,
     'prod_team'),
    ('price_addon', 'usd', '{"interval": "month", "interval_count": 3}', 'recurring', 900,
     'prod_addon'),
    ('price_setup', 'usd', NULL, 'one_time', 5000, 'prod_setup');
INSERT INTO stripe.subscriptions (id, status, customer, created) VALUES
    ('sub_1', 'active', 'cus_1', 1760000000), ('sub_4', 'canceled', 'cus_4', 1760000000);
INSERT INTO stripe.subscription_items (id, deleted, quantity, price, subscription) VALUES
    ('si_1', false, 3, 'price_seat', 'sub_1'), ('si_2', false, 1, 'price_addon', 'sub_1'),
    ('si_3', true, 5, 'price_seat', 'sub_1'), ('si_4', false, 1, 'price_seat', 'sub_4');
"""


@pytest.mark.parametrize(
    "customer",
    [{"metadata": "user_id"}, {"users_column": "stripeCustomerId"}, "email"],
    ids=["metadata", "users-column", "email"],
)
def test_the_stripe_reader_maps_customers_to_users(app, customer):
    url, engine = app
    with engine.begin() as connection:
        if connection.execute(text("SELECT to_regnamespace('stripe')")).scalar() is None:
            connection.execute(text(STRIPE_SYNC))
    snapshot = _snapshot(app, {"stripe": {"customer": customer}})

    # 3 seats x 10.00 a month + 9.00 a quarter; the deleted item is not billed.
    assert snapshot["1"] == ("active", "prod_team", 3300, "USD")
    assert snapshot["4"] == ("canceled", "prod_team", 1000, "USD")
    assert snapshot["2"] == (None, None, None, None)
    report = preflight(engine, _config(url, {"stripe": {"customer": customer}}, "retention_h4_s"))
    assert report.problems == []


def test_an_amount_in_major_units_scales_by_its_currencys_minor_unit(app):
    """60 yen is 60 of its minor unit (a yen has none), 120 dinars of Kuwait are 120,000 fils;
    a currency of two decimals (or none named) is a hundred."""
    url, engine = app
    with engine.begin() as connection:
        connection.execute(
            text('ALTER TABLE "Subscription" ADD COLUMN IF NOT EXISTS currency text')
        )
        connection.execute(
            text(
                """UPDATE "Subscription" SET currency = CASE id WHEN 'sub_a' THEN ' jpy' """
                """ELSE 'KWD' END"""
            )
        )
    columns = {**ORG_OWNED["columns"], "currency": "currency"}

    snapshot = _snapshot(app, {**ORG_OWNED, "columns": columns})

    assert snapshot["1"][2:] == (60, "JPY")
    assert snapshot["4"][2:] == (120000, "KWD")
    with engine.begin() as connection:
        connection.execute(text("""UPDATE "Subscription" SET currency = 'eur'"""))
    assert _snapshot(app, {**ORG_OWNED, "columns": columns})["1"][2:] == (6000, "EUR")


@pytest.mark.parametrize(
    ("credit", "revenue"),
    [
        ("each", {"1": 6000, "2": 6000, "4": 12000, "5": 0}),
        ("split", {"1": 3000, "2": 3000, "4": 12000, "5": 0}),
    ],
)
def test_outcomes_credit_a_teams_revenue_to_its_members_by_the_rule(app, credit, revenue):
    """Everyone is emailed on DAY (nobody ever used the product); a week on, each member's
    outcome holds the revenue the rule credits them: the whole team's amount each, or their
    share, so that a treated arm's revenue sums the team's amount once per member or once."""
    url, engine = app
    schema = f"retention_h4_{next(_numbers)}"
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    subscriptions = {**ORG_OWNED, "credit": credit}
    document["database"].update(
        url=url, schema=schema, tables={"users": USERS, **ACTIVITY, "subscriptions": subscriptions}
    )
    loop = document["loops"][0]
    loop["steps"][0]["condition"] = {"type": "segment", "segment": "never_activated"}
    loop["holdout"] = {"fraction": 0.0}
    config = parse_config(document, environ={})
    loop = config.loops[0]
    install(engine, config, second_install=True)  # beside the module's other cases
    week_on = DAY + timedelta(days=7)
    for day in (DAY, week_on):
        with engine.begin() as connection:
            build_snapshot(connection, config, day)
            build_day_segments(connection, schema, config.loops, config.timezone, day)
    candidates = condition_user_ids(engine, schema, loop, DAY)
    with engine.begin() as connection:
        assert (
            build_audience(
                connection, config=config, loop=loop, day=DAY, candidates=candidates
            ).treatment
            == 5
        )
        evaluate_outcomes(connection, config=config, loop=loop, day=week_on)
        outcomes = dict(
            connection.execute(
                text(
                    f"SELECT user_id, active_revenue_cents FROM {schema}.reengagement_outcomes "
                    "WHERE window_days = 7"
                )
            ).all()
        )

    assert outcomes == {**revenue, "3": 0}
