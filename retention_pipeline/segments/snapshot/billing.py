"""The app's subscriptions as one row per user: whom each reaches, its status in our vocabulary,
its monthly amount credited to each member, its plan and currency.

Read from the tables `database.tables.subscriptions` names (the subscription, and its owner's
members, prices and items), in one SELECT the snapshot joins and `check` plans; the checks
here read the rows the way it does, so a value it cannot read is one line naming the value
and the key before anything is written.
"""

from __future__ import annotations

import json

from sqlalchemy import Connection, text
from sqlalchemy.exc import DataError

from retention_pipeline.config.models import (
    LIVE_STATUSES,
    SubscriptionsMapping,
    parse_column_reference,
)
from retention_pipeline.currencies import minor_units_sql
from retention_pipeline.database.app_tables import SUBSCRIPTIONS_KEY, RelatedTable
from retention_pipeline.database.predicates import all_of_sql
from retention_pipeline.segments.snapshot.names import AppNames

# A billing interval's monthly amount: the amount times the factor. Any other interval is an
# error naming the value (`billing_problem`), never taken as monthly.
INTERVAL_MONTHLY_FACTORS: dict[str, float] = {
    "day": 365 / 12,
    "daily": 365 / 12,
    "week": 52 / 12,
    "weekly": 52 / 12,
    "month": 1,
    "monthly": 1,
    "quarter": 1 / 3,
    "quarterly": 1 / 3,
    "year": 1 / 12,
    "yearly": 1 / 12,
    "annual": 1 / 12,
    "annually": 1 / 12,
}
# The snapshot's subscription columns, as the copy from a replica holds them.
SUBSCRIPTION_ROW = {
    "user_id": "text",
    "status": "text",
    "plan": "text",
    "monthly_amount_cents": "integer",
    "currency": "text",
}
# The subscriptions read once elsewhere (a replica's result, copied): the snapshot reads them.
COPIED_SUBSCRIPTIONS = "subscription_rows"
NO_SUBSCRIPTIONS = (
    "SELECT NULL::text AS user_id, NULL::text AS status, NULL::text AS plan, "
    "NULL::integer AS monthly_amount_cents, NULL::text AS currency WHERE false"
)
# An amount reads as a moment when most amounts fall in these Unix-time ranges (2001-2039, in
# seconds or milliseconds); as an id when every one of at least this many is different.
EPOCH_SECONDS = (1.0e9, 2.2e9)
EPOCH_MILLISECONDS = (1.0e12, 2.2e12)
DISTINCT_AMOUNTS_SAMPLE = 20
# A user-id mapping reaches almost no users when fewer than this share of rows reach one.
LEAST_REACHED_SHARE = 0.5


def billing_parameters(mapping: SubscriptionsMapping | None) -> dict[str, object]:
    """The values the subscriptions' SELECT binds."""
    vocabulary = (mapping.status if mapping is not None else None) or {}
    # The per-row lookups read JSON objects, compared byte for byte (`billing_problem` checks
    # through the same lookups): a subquery over arrays per subscription row cost about 1 s of
    # the snapshot at a million users (517k subscriptions).
    return {
        "monthly_factor_of": json.dumps(
            {name: float(factor) for name, factor in INTERVAL_MONTHLY_FACTORS.items()},
            ensure_ascii=False,
        ),
        "status_of": json.dumps(vocabulary, ensure_ascii=False),
    }


def _monthly_factor(interval: str, count: str | None) -> str:
    factor = f"""(CAST(:monthly_factor_of AS jsonb)
                   ->> lower(btrim(({interval})::text)))::float8"""
    if count is None:
        return factor
    return f"({factor} / coalesce(NULLIF(({count})::numeric, 0), 1))"


class _Reads:
    """The SQL of each figure of one subscription row (alias `sub`)."""

    def __init__(self, names: AppNames):
        self.names = names
        own = names.tables["subscriptions"].mapping
        assert isinstance(own, RelatedTable) and own.subscriptions is not None
        self.mapping: SubscriptionsMapping = own.subscriptions
        self.dialect = names.preparer.dialect

    def column(self, key: str, table: str = "subscriptions", alias: str = "sub") -> str:
        return self.names.column(table, key, alias)

    def status(self) -> str:
        raw = f"({self.column('status')})::text"
        if not self.mapping.status:
            return raw
        return f"(CAST(:status_of AS jsonb) ->> {raw})"

    def selected(self) -> str:
        """The condition on a row of the subscriptions' table (`sub`) that it is one (`where`)."""
        own = self.names.tables["subscriptions"]
        return all_of_sql(list(self.mapping.where), "sub", self.dialect, own.base_types)

    def scale(self, unit: str, currency: str | None) -> str:
        """The factor from `unit` to minor units: by the currency's minor unit where the SQL
        expression `currency` names it (`currencies.minor_units`), else a hundred."""
        if unit != "major":
            return ""
        return f" * {minor_units_sql(currency)}" if currency is not None else " * 100"

    def priced_lines(self) -> str | None:
        """Per subscription key, its items' monthly amount, plan and currency (with items)."""
        amount = self.mapping.stored_amount
        if amount is None or amount.items is None or amount.price is None:
            return None
        price = amount.price
        line = self._line_amount("item")
        items = self.names.tables["subscription_items"]
        where = all_of_sql(list(items.mapping.where), "item", self.dialect, items.base_types)
        plan = self.column("plan", "subscription_prices", "price") if price.plan else "NULL"
        return f"""
                SELECT ({self.column("subscription", "subscription_items", "item")})::text
                           AS subscription,
                       sum({line}) AS monthly_amount,
                       (array_agg(({plan})::text ORDER BY {line} DESC NULLS LAST))[1] AS plan,
                       min(({self.column("currency", "subscription_prices", "price")})::text)
                           AS currency
                FROM {self.names.table("subscription_items")} AS item
                LEFT JOIN {self.names.table("subscription_prices")} AS price
                  ON ({self.column("id", "subscription_prices", "price")})::text
                     = ({self.column("price_id", "subscription_items", "item")})::text
                WHERE {where}
                GROUP BY 1"""

    def _line_amount(self, bought_alias: str) -> str:
        """One price times its quantity, monthly, in minor units (`price` joined)."""
        amount = self.mapping.stored_amount
        assert amount is not None and amount.price is not None
        bought = "subscription_items" if amount.items else "subscriptions"
        quantity = (
            f" * coalesce(({self.column('quantity', bought, bought_alias)})::numeric, 1)"
            if amount.quantity
            else ""
        )
        currency = (
            self.column("currency", "subscription_prices", "price")
            if amount.price.currency
            else None
        )
        value = (
            f"({self.column('amount', 'subscription_prices', 'price')})::numeric"
            f"{self.scale(amount.price.unit, currency)}{quantity}"
        )
        if amount.price.interval is None:
            return value
        count = (
            self.column("interval_count", "subscription_prices", "price")
            if amount.price.interval_count
            else None
        )
        interval = self.column("interval", "subscription_prices", "price")
        return f"({value} * {_monthly_factor(interval, count)})"

    def joins(self) -> str:
        amount = self.mapping.stored_amount
        if amount is None or amount.price is None:
            return ""
        if amount.items is not None:
            return f"""
            LEFT JOIN ({self.priced_lines()}) AS lines
              ON lines.subscription = ({self.column("key")})::text"""
        return f"""
            LEFT JOIN {self.names.table("subscription_prices")} AS price
              ON ({self.column("id", "subscription_prices", "price")})::text
                 = ({self.column("price_id")})::text"""

    def amount_minor(self) -> str:
        """The amount billed per interval (per line, with prices), in minor units."""
        if self.mapping.amount == "none":
            return "NULL::numeric"
        amount = self.mapping.stored_amount
        if amount is None:
            return f"({self.column('amount_cents')})::numeric"
        if amount.column is not None:
            currency = self.column("currency") if self.mapping.maps("currency") else None
            return f"({self.column('amount')})::numeric{self.scale(amount.unit, currency)}"
        if amount.items is not None:
            return "lines.monthly_amount"
        return self._line_amount("sub")

    def monthly_amount(self) -> str:
        if not self.mapping.maps("billing_interval"):
            return self.amount_minor()
        # Unknown intervals stop the build beforehand (`billing_problem`).
        return f"({self.amount_minor()} * {_monthly_factor(self.column('billing_interval'), None)})"

    def plan(self) -> str:
        amount = self.mapping.stored_amount
        if self.mapping.maps("plan"):
            return f"({self.column('plan')})::text"
        if amount and amount.items:
            return "lines.plan"
        if amount and amount.price and amount.price.plan:
            return f"({self.column('plan', 'subscription_prices', 'price')})::text"
        return "NULL::text"  # the app names no plan

    def currency(self) -> str:
        # No currency anywhere: every amount is in the app's one currency, left unnamed.
        amount = self.mapping.stored_amount
        if self.mapping.maps("currency"):
            raw = f"({self.column('currency')})::text"
        elif amount and amount.price and amount.price.currency:
            raw = (
                "lines.currency"
                if amount.items
                else f"({self.column('currency', 'subscription_prices', 'price')})::text"
            )
        else:
            return "NULL::text"
        return f"upper(btrim({raw}))"

    def holder(self) -> str:
        key = "owner" if self.mapping.owner is not None else "user_id"
        return f"({self.column(key)})::text"

    def updated_at(self) -> str:
        if not self.mapping.maps("updated_at"):
            return "NULL::timestamptz"
        return self.names.timestamp("subscriptions", "updated_at", "sub")

    def members(self) -> str:
        """(holder, user_id, members of the holder, owning members of the holder, owning)."""
        owner = self.mapping.owner
        assert owner is not None
        if "subscription_member_users" in self.names.tables:
            table, alias = "subscription_member_users", "mu"
            pairs = f"""
                SELECT ({self.column("owner", table, alias)})::text AS holder,
                       ({self.column("user", table, alias)})::text AS user_id,
                       true AS owning
                FROM {self.names.table(table)} AS {alias}
                WHERE {self.column("owner", table, alias)} IS NOT NULL"""
        else:
            table, alias = "subscription_members", "mem"
            members = self.names.tables[table]
            where = all_of_sql(list(members.mapping.where), alias, self.dialect, members.base_types)
            if members.maps("email"):
                user = f"({self.names.column('users', 'id', 'u')})::text"
                join = f"""
                JOIN {self.names.table("users")} AS u
                  ON lower(({self.names.column("users", "email", "u")})::text)
                     = lower(({self.column("email", table, alias)})::text)"""
            else:
                user, join = f"({self.column('user', table, alias)})::text", ""
            holder = f"({self.column('owner', table, alias)})::text"
            if isinstance(owner.owning_member, list):
                owning = all_of_sql(owner.owning_member, alias, self.dialect, members.base_types)
            elif owner.owning_member is not None:
                owners = "subscription_owners"
                owning = f"""EXISTS (
                    SELECT FROM {self.names.table(owners)} AS o
                    WHERE ({self.column("id", owners, "o")})::text = {holder}
                      AND ({self.column("user", owners, "o")})::text = {user})"""
            else:
                owning = "false"
            pairs = f"""
                SELECT {holder} AS holder, {user} AS user_id, {owning} AS owning
                FROM {self.names.table(table)} AS {alias}{join}
                WHERE {where}"""
        return f"""
            SELECT member.*,
                   count(*) OVER (PARTITION BY member.holder) AS members,
                   count(*) FILTER (WHERE member.owning) OVER (PARTITION BY member.holder)
                       AS owners
            FROM (
                SELECT pairs.holder, pairs.user_id, coalesce(bool_or(pairs.owning), false)
                           AS owning
                FROM ({pairs}) AS pairs
                WHERE pairs.holder IS NOT NULL AND pairs.user_id IS NOT NULL
                GROUP BY pairs.holder, pairs.user_id
            ) AS member"""

    def billed(self) -> str:
        """One row per subscription: its holder (a user, or the owner), status, plan, monthly
        amount (unrounded), currency and last change."""
        return f"""
            SELECT {self.holder()} AS holder, {self.status()} AS status, {self.plan()} AS plan,
                   {self.monthly_amount()} AS monthly_amount, {self.currency()} AS currency,
                   {self.updated_at()} AS updated_at
            FROM {self.names.table("subscriptions")} AS sub{self.joins()}
            WHERE {self.selected()}"""


def subscription_sql(names: AppNames, only: str = "") -> str:
    """Each user's subscription: (user_id, status, plan, monthly_amount_cents, currency);
    `only` restricts to the listed users (ONLY_THESE_USERS), as their full build needs."""
    if COPIED_SUBSCRIPTIONS in names.tables:
        listed = f" WHERE {only.format('copied.user_id')}" if only else ""
        columns = ", ".join(SUBSCRIPTION_ROW)
        return f"SELECT {columns} FROM {names.table(COPIED_SUBSCRIPTIONS)} AS copied{listed}"
    if "subscriptions" not in names.tables:
        return NO_SUBSCRIPTIONS
    reads = _Reads(names)
    live = ", ".join(f"'{status}'" for status in LIVE_STATUSES)
    credit = reads.mapping.credit
    if reads.mapping.owner is None:
        reached = "SELECT b.holder AS user_id, b.status, b.plan, b.monthly_amount AS credited, "
        reached += f"b.currency, b.updated_at FROM ({reads.billed()}) AS b"
    else:
        credited = {
            "each": "b.monthly_amount",
            "split": "b.monthly_amount / m.members",
            # The other members are credited nothing, unless nothing is known (`amount: none`).
            "owner": "CASE WHEN m.owning THEN b.monthly_amount / m.owners "
            "WHEN b.monthly_amount IS NOT NULL THEN 0 END",
        }[credit or "each"]
        reached = f"""SELECT m.user_id, b.status, b.plan, {credited} AS credited, b.currency,
                   b.updated_at
            FROM ({reads.billed()}) AS b
            JOIN ({reads.members()}) AS m ON m.holder = b.holder"""
    listed = f"\n            WHERE {only.format('r.user_id')}" if only else ""
    # A live subscription describes the user better than an old canceled one, and among those
    # the latest change (when the app records one) wins.
    return f"""SELECT DISTINCT ON (r.user_id)
                   r.user_id, r.status, r.plan, round(r.credited)::integer AS monthly_amount_cents,
                   r.currency
            FROM ({reached}) AS r{listed}
            ORDER BY r.user_id, (r.status IN ({live})) DESC, r.updated_at DESC NULLS LAST"""


def billing_problem(connection: Connection, names: AppNames) -> str | None:
    """The first value of the app's subscriptions the snapshot cannot read (a status the
    vocabulary does not map, a billing interval it cannot turn into a monthly amount), as one
    line naming it and its key; None when every one reads."""
    if "subscriptions" not in names.tables:
        return None
    reads = _Reads(names)
    mapping = reads.mapping
    parameters = billing_parameters(mapping)
    if mapping.status:
        raw = f"({reads.column('status')})::text"
        unmapped = connection.execute(
            text(f"""
                SELECT {raw} FROM {names.table("subscriptions")} AS sub
                WHERE (CAST(:status_of AS jsonb) ->> {raw}) IS NULL
                  AND {reads.selected()}
                LIMIT 1"""),
            parameters,
        ).first()
        if unmapped is not None:
            value = "no value (NULL)" if unmapped[0] is None else repr(unmapped[0])
            return (
                f"{SUBSCRIPTIONS_KEY}.status: {value} of {mapping.qualified_name}."
                f"{mapping.columns['status']} is not mapped (mapped: {', '.join(mapping.status)})"
            )
    unreadable_time = _unreadable_update_time(connection, names, reads)
    if unreadable_time is not None:
        return unreadable_time
    price = mapping.stored_amount.price if mapping.stored_amount else None
    if mapping.maps("billing_interval"):
        checked = (
            reads.column("billing_interval"),
            f"{names.table('subscriptions')} AS sub WHERE {reads.selected()} AND",
        )
        key = "columns.billing_interval"
    elif price is not None and price.interval is not None:
        # Only the prices subscriptions bill: a one-time price has no interval.
        bought, alias = (
            ("subscription_items", "item")
            if mapping.stored_amount.items  # type: ignore[union-attr]
            else ("subscriptions", "sub")
        )
        if alias == "sub":
            billed = reads.selected()
        else:  # an item's price is billed only when its subscription is one (`where`)
            billed = f"""({reads.column("subscription", "subscription_items", "item")})::text
                IN (SELECT ({reads.column("key")})::text FROM {names.table("subscriptions")} AS sub
                    WHERE {reads.selected()})"""
        checked = (
            reads.column("interval", "subscription_prices", "price"),
            f"""{names.table("subscription_prices")} AS price
            WHERE ({reads.column("id", "subscription_prices", "price")})::text IN (
                SELECT ({reads.column("price_id", bought, alias)})::text
                FROM {names.table(bought)} AS {alias}
                WHERE {billed}) AND""",
        )
        key = "amount.price.interval"
    else:
        return None
    interval, rows = checked
    unknown = connection.execute(
        text(f"""
            SELECT ({interval})::text FROM {rows}
            (CAST(:monthly_factor_of AS jsonb) ->> lower(btrim(({interval})::text))) IS NULL
            LIMIT 1"""),
        parameters,
    ).first()
    if unknown is None:
        return None
    value = "no value (NULL)" if unknown[0] is None else repr(unknown[0])
    return (
        f"{SUBSCRIPTIONS_KEY}.{key}: unknown billing interval {value} (known: "
        f"{', '.join(INTERVAL_MONTHLY_FACTORS)})"
    )


def _unreadable_update_time(connection: Connection, names: AppNames, reads: _Reads) -> str | None:
    """Why `columns.updated_at`, a path into a JSON column, holds a value no timestamp reads (a
    Unix time, say), as one line; None when every one reads. A column's type is checked with
    the mapping; a path's values only show when cast."""
    mapping = reads.mapping
    if (
        not mapping.maps("updated_at")
        or not parse_column_reference(mapping.columns["updated_at"])[1]
    ):
        return None
    try:
        with connection.begin_nested():
            connection.execute(
                text(f"""
                    SELECT count({reads.updated_at()}) FROM {names.table("subscriptions")} AS sub
                    WHERE {reads.selected()}"""),
                billing_parameters(mapping),
            )
    except DataError as error:
        first_line = (str(error.orig).strip().splitlines() or [""])[0]
        return f"{SUBSCRIPTIONS_KEY}.columns.updated_at: {first_line}"
    return None


def meaning_problems(connection: Connection, names: AppNames) -> list[str]:
    """What the subscriptions' rows say about the mapping, one line each: a value the snapshot
    would stop on (`billing_problem`), a user-id mapping that reaches almost no users, an amount
    that looks like a Unix time or an id."""
    if "subscriptions" not in names.tables:
        return []
    reads = _Reads(names)
    mapping = reads.mapping
    parameters = billing_parameters(mapping)
    unreadable = billing_problem(connection, names)
    problems: list[str] = [unreadable] if unreadable else []
    if mapping.owner is None:
        users = (
            f"SELECT ({names.column('users', 'id', 'u')})::text FROM {names.table('users')} AS u"
        )
        reaching = f"b.holder IN ({users})"
        key, named = "columns.user_id", mapping.columns["user_id"]
    else:
        reaching = f"b.holder IN (SELECT m.holder FROM ({reads.members()}) AS m)"
        key, named = "owner.column", mapping.owner.column
    total, reached = connection.execute(
        text(f"""
            SELECT count(*), count(*) FILTER (WHERE {reaching})
            FROM ({reads.billed()}) AS b"""),
        parameters,
    ).one()
    if total and reached < LEAST_REACHED_SHARE * total:
        what = "a user id" if mapping.owner is None else "an owner id of the members"
        problems.append(
            f"{SUBSCRIPTIONS_KEY}.{key}: {reached:,} of {total:,} subscription rows reach a "
            f"user: is `{named}` {what}?"
        )
    amounts = connection.execute(
        text(f"""
            SELECT count(a.v), count(DISTINCT a.v),
                   count(*) FILTER (WHERE a.v BETWEEN :s0 AND :s1 OR a.v BETWEEN :m0 AND :m1)
            FROM (SELECT {reads.amount_minor()} AS v
                  FROM {names.table("subscriptions")} AS sub{reads.joins()}
                  WHERE {reads.selected()}) AS a"""),
        parameters
        | {
            # Amounts are read in minor units: a time in a major-units column reads x100.
            **{
                name: bound * (100 if _major(mapping) else 1)
                for name, bound in zip(
                    ("s0", "s1", "m0", "m1"), (*EPOCH_SECONDS, *EPOCH_MILLISECONDS), strict=True
                )
            },
        },
    ).one()
    counted, distinct, moments = amounts
    amount_key = _amount_key(mapping)
    if counted and moments > counted / 2:
        problems.append(
            f"{SUBSCRIPTIONS_KEY}.{amount_key}: {moments:,} of {counted:,} amounts look like "
            "Unix times (1e9 to 2.2e9 seconds, or milliseconds): is it an amount?"
        )
    elif counted >= DISTINCT_AMOUNTS_SAMPLE and distinct == counted:
        problems.append(
            f"{SUBSCRIPTIONS_KEY}.{amount_key}: all {counted:,} amounts are different, like "
            "ids (prices repeat across subscriptions): is it an amount?"
        )
    return problems


def _major(mapping: SubscriptionsMapping) -> bool:
    amount = mapping.stored_amount
    return amount is not None and amount.column is not None and amount.unit == "major"


def _amount_key(mapping: SubscriptionsMapping) -> str:
    if mapping.stored_amount is None:
        return "columns.amount_cents"
    return "amount.column" if mapping.stored_amount.column is not None else "amount.price.amount"
