"""The loop configuration: what `retention.yaml` may say, validated with pydantic.

A loop says what the original `skene.config.ts` said: a schedule trigger, a condition (a built-in
segment or a SQL query with a timeout), an email action and a recovery policy.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import date, time, timedelta
from email.utils import parseaddr
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import TypedDict

from retention_pipeline.config.cron import fires_at_most_once_a_day, is_valid_cron
from retention_pipeline.recipients.addresses import EMAIL_ADDRESS_PATTERN
from retention_pipeline.segments.calendar import DUE_LAG_DAYS

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
DURATION_PATTERN = re.compile(r"^(\d+)(ms|s|m|h|d)$")
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

SEGMENTS = (
    "new",
    "active",
    "at_risk",
    "dormant",
    "resurrected",
    "never_activated",
    "churned",
)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_duration(value: str | int | float, *, allow_zero: bool = False) -> timedelta:
    """Turn `10m`, `30s`, `2h`, `500ms` (or a number of seconds) into a timedelta; zero only
    where `allow_zero` says it means something (a step sent the day its episode starts)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = DURATION_PATTERN.match(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is not a duration like 30s, 10m, 2h or 1d")
        seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{value!r} must be a positive duration")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{value!r} is longer than any duration can be") from None


Duration = Annotated[str | int, Field(description="30s, 10m, 2h, 1d or seconds")]

# PostgreSQL's timeouts are a number of milliseconds in an int4.
LONGEST_TIMEOUT = timedelta(milliseconds=2**31 - 1)


def parse_timeout(value: str | int) -> timedelta:
    """A duration PostgreSQL takes as a statement timeout (24 days at most)."""
    duration = parse_duration(value)
    if duration > LONGEST_TIMEOUT:
        raise ValueError(f"{value!r} is longer than PostgreSQL's longest timeout (24 days)")
    return duration


def _check_identifier(value: str) -> str:
    if not IDENTIFIER_PATTERN.match(value):
        raise ValueError(
            f"{value!r} is not a valid SQL identifier (letters, digits, _ and $, "
            "at most 63 characters, not starting with a digit)"
        )
    return value


Identifier = Annotated[str, Field(min_length=1, max_length=63)]


# A JSON key in a column reference (`raw_user_meta_data.full_name`): what apps name keys with.
JSON_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_$-]{1,63}$")


def parse_column_reference(value: str) -> tuple[str, tuple[str, ...]]:
    """A column of the app, or a path into its JSON: `name` or `column.key.key`."""
    column, *path = str(value).split(".")
    _check_identifier(column)
    for key in path:
        if not JSON_KEY_PATTERN.match(key):
            raise ValueError(
                f"{value!r}: {key!r} is not a JSON key (letters, digits, _, $ and -) in a path "
                "like column.key.key"
            )
    return column, tuple(path)


def _column_reference(value: str) -> str:
    parse_column_reference(value)
    return value


ColumnReference = Annotated[
    str,
    Field(min_length=1, description="a column, or column.key.key: a path into a JSON column"),
    AfterValidator(_column_reference),
]
# What `is:` may say of a value: it is there or not, a flag, or a time still to come or past.
PREDICATE_STATES = ("set", "unset", "true", "false", "future", "past")
Scalar = str | int | float | bool


class Predicate(StrictModel):
    """One test of a row of an app table, as a user describes it: `{column: deletedAt, is: set}`,
    `{column: status, in: [LOCKED]}`, `{column: raw_app_meta_data.provider, equals: anonymous}`.
    Values are compared as text (`true`, `42`), so enums, numbers and JSON fields all match."""

    column: ColumnReference
    is_: Literal[PREDICATE_STATES] | None = Field(None, alias="is")  # type: ignore[valid-type]
    equals: Scalar | None = None
    in_: list[Scalar] | None = Field(None, alias="in", min_length=1)

    @field_validator("is_", mode="before")
    @classmethod
    def _flag_words(cls, value: object) -> object:
        # YAML reads `is: true` as a boolean.
        return str(value).lower() if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_test(self) -> Predicate:
        given = [
            key
            for key, value in (("is", self.is_), ("equals", self.equals), ("in", self.in_))
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"{self.column}: give exactly one of is ({', '.join(PREDICATE_STATES)}), "
                f"equals or in ({' and '.join(given) or 'none'} given)"
            )
        return self


class TableMapping(StrictModel):
    """Where one of the app's tables lives and what its columns are called."""

    table: Identifier
    schema_: Identifier = Field("public", alias="schema")
    columns: dict[str, Identifier]

    @field_validator("table", "schema_")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _check_identifier(value)

    @field_validator("columns")
    @classmethod
    def _column_identifiers(cls, value: dict[str, str]) -> dict[str, str]:
        for column in value.values():
            _check_identifier(column)
        return value

    @property
    def qualified_name(self) -> str:
        return f"{self.schema_}.{self.table}"

    def read_columns(self) -> list[str]:
        """The table's columns the pipeline reads, each once."""
        return list(dict.fromkeys(self.columns.values()))


def _column_name(value: object) -> object:
    if isinstance(value, str):
        if "." in value:
            raise ValueError(f"{value!r} is a JSON path: this one must be a column of the table")
        _check_identifier(value)
    return value


def _column_reference_value(value: object) -> object:
    if isinstance(value, str):
        parse_column_reference(value)
    return value


def _name_reference(value: object) -> object:
    # Checked before the union, so a wrong value is one line naming the key, not one per branch.
    parts = value if isinstance(value, list) else [value]
    if not parts or not all(isinstance(part, str) and part for part in parts):
        raise ValueError(
            f"{value!r} is not a column, a JSON path like raw_user_meta_data.full_name, or a "
            "list of columns such as [firstName, lastName]"
        )
    for part in parts:
        parse_column_reference(part)
    return value


class UserColumns(TypedDict, total=False):
    """The users table's columns: `email`, `name` and `timezone` may be paths into a JSON column
    (`raw_user_meta_data.full_name`), and `name` may be columns joined by a space (first and last
    name, blanks skipped)."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]  # AppTables names them

    id: Annotated[str, AfterValidator(_column_name)]
    email: Annotated[str, AfterValidator(_column_reference_value)]
    name: Annotated[str | list[str], BeforeValidator(_name_reference)]
    timezone: Annotated[str, AfterValidator(_column_reference_value)]
    created_at: Annotated[str, AfterValidator(_column_name)]


class UsersMapping(TableMapping):
    """The app's users table, with the accounts that must never be emailed: a user matching any
    of `exclude` is left out of every read, and erased once the pipeline knows them."""

    columns: UserColumns  # type: ignore[assignment]
    exclude: list[Predicate] = Field(
        default_factory=list,
        description="accounts never emailed: a user matching ANY of these is left out "
        "(soft-deleted, disabled, locked, banned, anonymous)",
    )

    @field_validator("columns")
    @classmethod
    def _column_identifiers(cls, value: dict[str, str]) -> dict[str, str]:
        return value  # each key's own type says what it may hold

    def read_columns(self) -> list[str]:
        """The table's columns the pipeline reads, each once: the mapped ones (the column of a
        JSON path, every part of a built name) and those the exclusions test."""
        references: list[str] = []
        for value in self.columns.values():
            references.extend(value if isinstance(value, list) else [value])
        references.extend(predicate.column for predicate in self.exclude)
        return list(dict.fromkeys(parse_column_reference(each)[0] for each in references))


# The logical columns the pipeline reads from each app table: a mapping must name the required
# ones and may leave the optional ones out (the app has no such column).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("id", "email", "created_at"),
    "events": ("user_id", "name", "created_at"),
    "sessions": ("user_id", "created_at"),
    "subscriptions": ("user_id", "status", "amount_cents"),
}
# Subscriptions validate their own mapping (SubscriptionsMapping: an owner, an amount from
# elsewhere); these are the keys of its `columns` for a user's own subscription.
TABLE_MAPPINGS = ("users", "events", "sessions")
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("name", "timezone"),
    "events": ("properties",),
    "sessions": (),
    "subscriptions": ("plan", "updated_at", "currency", "billing_interval"),
}


# Our status vocabulary (Stripe's); the app's own values map onto it with `status:`.
STATUSES = (
    "active",
    "trialing",
    "past_due",
    "canceled",
    "unpaid",
    "incomplete",
    "incomplete_expired",
    "paused",
)
# The statuses of a subscription that still describes the user (preferred to canceled ones).
LIVE_STATUSES = ("active", "trialing", "past_due")
# The subscription keys of `columns`: a user's own subscription names the user and the amount;
# an owned one names them in `owner` and `amount`.
SUBSCRIPTION_COLUMNS = REQUIRED_COLUMNS["subscriptions"] + OPTIONAL_COLUMNS["subscriptions"]


class _Table(StrictModel):
    table: Identifier
    schema_: Identifier = Field("public", alias="schema")

    @field_validator("table", "schema_")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _check_identifier(value)

    @property
    def qualified_name(self) -> str:
        return f"{self.schema_}.{self.table}"


class Members(_Table):
    """The table whose rows make users members of an owner (OrganisationMember, Membership,
    stripe.customers): its owner column, and the member as a user id (`user`) or as an email
    address matched against the users' (`email`)."""

    owner: ColumnReference
    user: ColumnReference | None = None
    email: ColumnReference | None = None
    where: list[Predicate] = []

    @model_validator(mode="after")
    def _one_user(self) -> Members:
        if (self.user is None) == (self.email is None):
            raise ValueError("name the member by exactly one of `user` (a user id) or `email`")
        return self


class OwnerTable(_Table):
    """The owner's own table (Organisation, Team), whose `user` column names its owning user."""

    id: ColumnReference = "id"
    user: ColumnReference


class Owner(StrictModel):
    """Who the subscription belongs to when it is not a user: the subscription's `column` holds
    an owner id, whose members are read from `members`, or from the users table's own
    `users_column` (User.stripeCustomerId)."""

    column: ColumnReference
    members: Members | None = None
    users_column: ColumnReference | None = None
    owning_member: OwnerTable | list[Predicate] | None = None

    @model_validator(mode="after")
    def _one_way_to_members(self) -> Owner:
        if (self.members is None) == (self.users_column is None):
            raise ValueError(
                "name the owner's members by exactly one of `members` or `users_column`"
            )
        if isinstance(self.owning_member, list) and self.members is None:
            raise ValueError("owning_member: predicates select among `members` rows")
        return self


class Price(_Table):
    """A prices table: the amount of one unit, and what else the price says."""

    id: ColumnReference = "id"
    amount: ColumnReference
    unit: Literal["minor", "major"] = "minor"
    interval: ColumnReference | None = None
    interval_count: ColumnReference | None = None
    currency: ColumnReference | None = None
    plan: ColumnReference | None = None


class Items(_Table):
    """Line items of a subscription (stripe.subscription_items), each with its price and
    quantity; `subscription` is the item's column holding the subscription's `key`."""

    subscription: ColumnReference
    key: ColumnReference = "id"
    where: list[Predicate] = []


class Amount(StrictModel):
    """The amount billed per interval: a column (or JSON path) of the subscription in `unit`,
    or a price (from `price`) times an optional `quantity`, per item when `items` are given
    (`by` and `quantity` then being the item's columns)."""

    column: ColumnReference | None = None
    unit: Literal["minor", "major"] = "minor"
    price: Price | None = None
    by: ColumnReference | None = None
    quantity: ColumnReference | None = None
    items: Items | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Amount:
        if (self.column is None) == (self.price is None):
            raise ValueError("give the amount as exactly one of `column` or `price`")
        if self.price is not None and self.by is None:
            raise ValueError("by: required with `price` (the column holding the price id)")
        if self.price is None and (self.by or self.items):
            raise ValueError("`by` and `items` go with `price`")
        return self


def _amount_form(value: object) -> str:
    return "none" if isinstance(value, str) else "stored"


# Where the amount is, or `none`: the app keeps its prices in its payment provider alone.
AmountMapping = Annotated[
    Annotated[Amount, Tag("stored")] | Annotated[Literal["none"], Tag("none")],
    Discriminator(_amount_form),
]


def _stripe_mapping(stripe: dict[str, Any]) -> dict[str, Any]:
    """The mapping of the tables supabase/stripe-sync-engine writes (migrations 0002-0041:
    customers, prices, subscriptions, subscription_items), by how customers map to users."""
    if not isinstance(stripe, dict):
        raise ValueError("stripe: give its keys (customer, schema), not a list or a value")
    unknown = sorted(set(stripe) - {"schema", "customer"})
    if unknown:
        raise ValueError(f"stripe.{unknown[0]}: unknown key (known: customer, schema)")
    schema = stripe.get("schema", "stripe")
    customer = stripe.get("customer")
    customers = {
        "table": "customers",
        "schema": schema,
        "owner": "id",
        "where": [{"column": "deleted", "is": "false"}],
    }
    if customer == "email":
        owner = {"column": "customer", "members": {**customers, "email": "email"}}
    elif isinstance(customer, dict) and list(customer) == ["metadata"]:
        key = _check_identifier(str(customer["metadata"]))
        owner = {"column": "customer", "members": {**customers, "user": f"metadata.{key}"}}
    elif isinstance(customer, dict) and list(customer) == ["users_column"]:
        owner = {"column": "customer", "users_column": customer["users_column"]}
    else:
        raise ValueError(
            "stripe.customer: how a Stripe customer maps to a user: `email`, "
            "{metadata: <key holding the user id>} or {users_column: <users column holding "
            "the customer id>}"
        )
    return {
        "table": "subscriptions",
        "schema": schema,
        "owner": owner,
        "columns": {"status": "status", "updated_at": "updated_at"},
        "amount": {
            "price": {
                "table": "prices",
                "schema": schema,
                "id": "id",
                "amount": "unit_amount",
                "interval": "recurring.interval",
                "interval_count": "recurring.interval_count",
                "currency": "currency",
                "plan": "product",
            },
            "by": "price",
            "quantity": "quantity",
            "items": {
                "table": "subscription_items",
                "schema": schema,
                "subscription": "subscription",
                "key": "id",
                "where": [{"column": "deleted", "is": "false"}],
            },
        },
    }


class SubscriptionsMapping(_Table):
    """Where the app's subscriptions are and what they say (`database.tables.subscriptions`).

    The plain mapping (a table whose rows each name a user in `columns.user_id`, with status,
    plan and amount columns) is one shape among several. A subscription may be owned by an
    organization, team, workspace or Stripe customer whose members are the users (`owner`); its
    status may be in the app's own vocabulary (`status`, booleans included); its amount may be
    in major units, inside a JSON column, or a price times a quantity in other tables (`amount`);
    `stripe:` is all of it ready-made for the tables supabase/stripe-sync-engine writes. An
    app that keeps its prices in its payment provider alone says `amount: none` (its monthly
    amounts are unknown: no revenue is counted); one whose table also holds rows that are not
    subscriptions (a team never billed) selects the subscriptions with `where`; a subscription
    with no plan mapped has none.

    The snapshot gives every user reached one subscription: a live one before a canceled one,
    then the latest changed. Its monthly amount is what `credit` gives the user, and what the
    outcomes count as the user's revenue:
    - `each`: every member is credited the whole amount (a team's revenue counted per member);
    - `split`: the amount divided evenly between the owner's members (counted once in total);
    - `owner`: the whole amount to the owning member (`owner.owning_member`: the owner table's
      column naming its user, or predicates on the members' rows such as a role); several
      owning members share it evenly; the other members are credited 0 and keep the status.
    """

    columns: dict[str, ColumnReference] = {}
    owner: Owner | None = None
    status: dict[str, Literal[STATUSES]] | None = None  # type: ignore[valid-type]
    amount: AmountMapping | None = None
    credit: Literal["owner", "split", "each"] | None = None
    where: list[Predicate] = []

    @model_validator(mode="before")
    @classmethod
    def _stripe(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stripe" in data:
            rest = {key: value for key, value in data.items() if key != "stripe"}
            allowed = {"credit", "status"}
            if set(rest) - allowed:
                extra = sorted(set(rest) - allowed)[0]
                raise ValueError(f"{extra}: not with `stripe` (it maps the tables itself)")
            # A customer is usually one user: splitting counts its revenue once either way.
            return {**_stripe_mapping(data["stripe"] or {}), "credit": "split", **rest}
        return data

    @field_validator("amount", mode="before")
    @classmethod
    def _amount_word(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "none":
            raise ValueError(
                f"{value!r}: give where the amount is ({{column: ...}} or {{price: ...}}), "
                "or `none` when the app stores no amount"
            )
        return value

    @field_validator("status", mode="before")
    @classmethod
    def _boolean_keys(cls, value: Any) -> Any:
        # YAML reads `true: active` with a boolean key; the column compares as text.
        if isinstance(value, dict):
            return {
                str(key).lower() if isinstance(key, bool) else str(key): ours
                for key, ours in value.items()
            }
        return value

    @model_validator(mode="after")
    def _complete(self) -> SubscriptionsMapping:
        unknown = sorted(set(self.columns) - set(SUBSCRIPTION_COLUMNS))
        if unknown:
            raise ValueError(
                f"columns: unknown column key {unknown[0]!r} "
                f"(known: {', '.join(sorted(SUBSCRIPTION_COLUMNS))})"
            )
        if self.owner is None and "user_id" not in self.columns:
            raise ValueError(
                "columns: missing required column key 'user_id' (or say whose "
                "subscriptions they are with `owner`)"
            )
        if self.owner is not None and "user_id" in self.columns:
            raise ValueError(
                "columns.user_id: not with `owner` (the owner's members are the users)"
            )
        if "status" not in self.columns:
            raise ValueError("columns: missing required column key 'status'")
        price = self.stored_amount.price if self.stored_amount else None
        if self.amount is None and "amount_cents" not in self.columns:
            raise ValueError(
                "columns: missing required column key 'amount_cents' (or give `amount`, "
                "`amount: none` when the app stores no amount)"
            )
        if self.amount is not None and "amount_cents" in self.columns:
            raise ValueError("columns.amount_cents: not with `amount`")
        if price is not None:
            for key in ("billing_interval", "currency"):
                read = {"billing_interval": price.interval, "currency": price.currency}[key]
                if key in self.columns and read is not None:
                    raise ValueError(f"columns.{key}: also given by amount.price")
        if self.credit is not None and self.owner is None:
            raise ValueError(
                "credit: a user's own subscription is credited to the user; "
                "`credit` goes with `owner`"
            )
        if self.owner is not None and self.credit is None:
            raise ValueError(
                "credit: required with `owner`: owner, split or each (how a "
                "team's revenue is credited to its members)"
            )
        if self.credit == "owner" and (self.owner is None or self.owner.owning_member is None):
            raise ValueError(
                "owner.owning_member: required with `credit: owner` (the owner "
                "table's column naming its user, or predicates on the members)"
            )
        return self

    def maps(self, key: str) -> bool:
        return key in self.columns

    @property
    def stored_amount(self) -> Amount | None:
        """`amount`, when it says where the app stores the amount (not `none`)."""
        return self.amount if isinstance(self.amount, Amount) else None

    @property
    def table_key(self) -> str:
        return self.qualified_name


def _table(table: str, **columns: str) -> TableMapping:
    return TableMapping(table=table, columns=columns)


class AppTables(StrictModel):
    """The app's tables, read and never written. Defaults follow a typical NestJS schema; an
    app that bills nothing leaves `subscriptions` out of its `tables`."""

    users: UsersMapping = UsersMapping(
        table="users",
        columns=UserColumns(
            id="id", email="email", name="name", timezone="timezone", created_at="created_at"
        ),
    )
    events: TableMapping = _table(
        "events", user_id="user_id", name="name", properties="properties", created_at="created_at"
    )
    sessions: TableMapping = _table("sessions", user_id="user_id", created_at="created_at")
    subscriptions: SubscriptionsMapping | None = None

    @model_validator(mode="after")
    def _known_columns(self) -> AppTables:
        for name in TABLE_MAPPINGS:
            mapping: TableMapping = getattr(self, name)
            known = set(REQUIRED_COLUMNS[name]) | set(OPTIONAL_COLUMNS[name])
            unknown = sorted(set(mapping.columns) - known)
            if unknown:
                raise ValueError(
                    f"{name}.columns: unknown column key {unknown[0]!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
            missing = [key for key in REQUIRED_COLUMNS[name] if key not in mapping.columns]
            if missing:
                raise ValueError(f"{name}.columns: missing required column key {missing[0]!r}")
        return self

    def items(self) -> list[tuple[str, TableMapping | SubscriptionsMapping]]:
        """The mapped tables, by name (subscriptions only when the app bills)."""
        return [
            (name, getattr(self, name))
            for name in REQUIRED_COLUMNS
            if getattr(self, name) is not None
        ]


# The typical NestJS schema's subscriptions, mapped when `database.tables` is not given at all.
DEFAULT_SUBSCRIPTIONS = SubscriptionsMapping(
    table="subscriptions",
    columns={
        "user_id": "user_id",
        "status": "status",
        "plan": "plan",
        "amount_cents": "amount_cents",
        "billing_interval": "billing_interval",
        "currency": "currency",
        "updated_at": "updated_at",
    },
)


# How each activity source is captured: rows the app inserts (a statement-level trigger), a time
# column the app also updates in place (each change of its value counts), or read by each drain
# from the app's table or view (no trigger).
CAPTURE_MODES = ("inserts", "updates", "polling")
# The shorthand mappings that become sources of these names, and what their rows count as.
SHORTHAND_SOURCES = {"events": False, "sessions": True}


class ActionColumn(StrictModel):
    """The action named by a column of the source, with a prefix saying where it came from."""

    column: ColumnReference
    prefix: str = Field("", max_length=100)


def _action_form(value: object) -> str:
    return "column" if isinstance(value, dict | ActionColumn) else "constant"


# `action: comment.posted` (every row is that action) or `action: {column: type, prefix: p.}`.
Action = Annotated[
    Annotated[ActionColumn, Tag("column")]
    | Annotated[Annotated[str, Field(min_length=1, max_length=200)], Tag("constant")],
    Discriminator(_action_form),
]


class ActivitySource(StrictModel):
    """One app table (or view) whose rows are activity: who (`user`), when (`at`), and what
    (`action`, or a login)."""

    name: Identifier | None = Field(None, description="default: the table's name; unique")
    table: Identifier
    schema_: Identifier = Field("public", alias="schema")
    user: Identifier
    at: Identifier
    login: bool = Field(False, description="a row is an auth session, not a product action")
    action: Action | None = None
    where: list[Predicate] = Field(default_factory=list)
    capture: Literal[CAPTURE_MODES] | None = Field(  # type: ignore[valid-type]
        None, description="default: inserts under `tracking: triggers`, polling under incremental"
    )

    @field_validator("table", "schema_", "user", "at", "name")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        return value if value is None else _check_identifier(value)

    @field_validator("where")
    @classmethod
    def _same_rows_whenever_read(cls, value: list[Predicate]) -> list[Predicate]:
        # The capture reads a row when it is written and a rebuild reads it later: a test of
        # the clock would count a row in one and not the other.
        for index, predicate in enumerate(value):
            if predicate.is_ in ("future", "past"):
                raise ValueError(
                    f"{index}.is: {predicate.is_!r} depends on when a row is read, and the "
                    "capture and a rebuild read it at different times: test a value instead"
                )
        return value

    @model_validator(mode="after")
    def _action_or_login(self) -> ActivitySource:
        if self.action is None and not self.login:
            raise ValueError(
                "action: required unless `login: true` (a column, {column: c, prefix: 'p.'}, "
                "or a constant like comment.posted)"
            )
        if self.action is not None and self.login:
            raise ValueError("action: a login source counts sessions, which have no action")
        return self

    @property
    def source_name(self) -> str:
        return self.name or self.table

    @property
    def qualified_name(self) -> str:
        return f"{self.schema_}.{self.table}"


@dataclass(frozen=True)
class SourceSpec:
    """A source as the pipeline reads it, from `database.activity` or from the shorthand
    `database.tables.events` / `sessions`; `key` is the key path its errors name."""

    source: ActivitySource
    capture: str
    key: str
    # Key path of each column the source maps ("user", "at", "action.column", "where.0.column")
    column_keys: dict[str, str]

    @property
    def name(self) -> str:
        return self.source.source_name


class DatabaseSettings(StrictModel):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL of the app database; required, except for the demo "
        "(`retention-pipeline dev`, `demo` and `--demo`), which runs on the embedded server",
    )
    read_url: str | None = Field(
        None,
        description="SQLAlchemy URL of a read replica of the app database: the daily snapshot "
        "reads the app's users and subscriptions there; the capture, the rollup and the "
        "pipeline's own tables stay on `url`",
    )
    schema_: Identifier = Field("retention", alias="schema")
    statement_timeout: Duration = "10m"
    tracking: Literal["triggers", "incremental"] = "triggers"
    tables: AppTables = AppTables(subscriptions=DEFAULT_SUBSCRIPTIONS)
    activity: list[ActivitySource] | None = Field(
        None,
        description="the app's tables whose rows are activity; without it, `tables.events` and "
        "`tables.sessions` are the sources",
    )
    keep_days: int = Field(
        400,
        ge=35,
        description="days of snapshots and segments kept before the day being built; older "
        "daily partitions are dropped (the send log, suppressions and outcomes are kept)",
    )

    @field_validator("schema_")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _check_identifier(value)

    @field_validator("statement_timeout")
    @classmethod
    def _duration(cls, value: str | int) -> str | int:
        parse_timeout(value)
        return value

    @field_validator("url", "read_url")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _sources_consistent(self) -> DatabaseSettings:
        names: dict[str, str] = {}
        for spec in self.activity_sources():
            where = spec.key.removeprefix("database.")
            if spec.name in names:
                raise ValueError(
                    f"{where}.name: source name {spec.name!r} is already {names[spec.name]}'s; "
                    "give each source its own `name`"
                )
            names[spec.name] = spec.key
            if self.tracking == "incremental" and spec.capture != "polling":
                raise ValueError(
                    f"{where}.capture: {spec.capture!r} needs a trigger, and `tracking: "
                    "incremental` installs none: use `capture: polling`"
                )
        if not names:
            raise ValueError("activity: no activity source: give at least one")
        return self

    def activity_sources(self) -> list[SourceSpec]:
        """Every activity source: the shorthand mappings (their defaults only when `activity`
        is not given), then `activity`'s."""
        default_capture = "inserts" if self.tracking == "triggers" else "polling"
        specs: list[SourceSpec] = []
        for name, login in SHORTHAND_SOURCES.items():
            if self.activity is not None and name not in self.tables.model_fields_set:
                continue
            mapping: TableMapping = getattr(self.tables, name)
            columns = mapping.columns
            source = ActivitySource(
                name=name,
                table=mapping.table,
                schema=mapping.schema_,
                user=columns["user_id"],
                at=columns["created_at"],
                login=login,
                action=None if login else ActionColumn(column=columns["name"]),
            )
            key = f"database.tables.{name}"
            column_keys = {"user": f"{key}.columns.user_id", "at": f"{key}.columns.created_at"}
            if not login:
                column_keys["action.column"] = f"{key}.columns.name"
            specs.append(SourceSpec(source, default_capture, key, column_keys))
        for index, source in enumerate(self.activity or []):
            key = f"database.activity.{index}"
            column_keys = {"user": f"{key}.user", "at": f"{key}.at"}
            if isinstance(source.action, ActionColumn):
                column_keys["action.column"] = f"{key}.action.column"
            for number, _predicate in enumerate(source.where):
                column_keys[f"where.{number}.column"] = f"{key}.where.{number}.column"
            specs.append(SourceSpec(source, source.capture or default_capture, key, column_keys))
        return specs


# Names that never reach a reader: the top-level and second-level domains RFC 2606 and RFC 6761
# reserve for tests, examples and loopback. The demo's email settings use them (`acme.test`);
# outside the demo `check` and every send run refuse them.
PLACEHOLDER_DOMAINS = (
    "test",
    "example",
    "invalid",
    "localhost",
    "example.com",
    "example.net",
    "example.org",
)


def placeholder_domain(host: str) -> str | None:
    """Why `host` reaches no reader (it is under a reserved domain, `acme.test` under `.test`, or
    a loopback or private IP address), or None for a real domain."""
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        for domain in PLACEHOLDER_DOMAINS:
            if host == domain or host.endswith(f".{domain}"):
                return f"under the reserved domain .{domain}"
        return None
    return "a loopback or private address" if address.is_private else None


# The email settings every email shows its reader, and what each is for. The demo's values
# (`DEMO_EMAIL`) are their defaults; outside the demo each must be given, and be neither blank
# nor the demo's.
READER_FACING_SETTINGS = {
    "from_address": ("from", "the sender of every email"),
    "product_name": ("product_name", "named in every subject and email"),
    "app_url": ("app_url", "where every email's button leads"),
    "company_address": ("company_address", "the postal address in every email's footer"),
    "unsubscribe_url": ("unsubscribe_url", "where `retention-pipeline serve` answers unsubscribes"),
}
DEMO_EMAIL = {
    "from_address": "Acme <hello@acme.test>",
    "product_name": "Acme",
    "app_url": "https://app.acme.test",
    "company_address": "Acme Inc., 1 Example Street, Springfield",
    "unsubscribe_url": "https://app.acme.test/unsubscribe",
}


LOCAL_TIME_PATTERN = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


def parse_local_time(value: str) -> time:
    """`09:00` as a time of day (24-hour clock, minutes required)."""
    match = LOCAL_TIME_PATTERN.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a time of day like 09:00 or 21:30")
    return time(int(match.group(1)), int(match.group(2)))


def _local_time(value: str) -> str:
    parse_local_time(value)
    return value


LocalTime = Annotated[str, AfterValidator(_local_time)]


class QuietHours(StrictModel):
    """The hours of the reader's own day in which no email of any loop goes out."""

    from_: LocalTime = Field(alias="from", description="local time the quiet hours start")
    to: LocalTime = Field(description="local time they end (the next day when earlier than from)")

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if parse_local_time(self.from_) == parse_local_time(self.to):
            raise ValueError(f"from and to are both {self.to}: quiet hours need a length")
        return self

    @property
    def start(self) -> time:
        return parse_local_time(self.from_)

    @property
    def end(self) -> time:
        return parse_local_time(self.to)


class EmailSettings(StrictModel):
    provider: Literal["resend", "outbox"] = "resend"
    frequency_cap_days: int = Field(
        3, ge=0, description="at most one email per this many days, across loops"
    )
    from_address: str = Field(DEMO_EMAIL["from_address"], alias="from")
    reply_to: str | None = None
    outbox_dir: str | None = Field(None, description="default: outbox/ under $RETENTION_HOME")
    requests_per_second: float = Field(2.0, gt=0)
    send_shards: int = Field(
        1,
        ge=1,
        le=32,
        description="send runs per loop and day, each for its own users, sending together at "
        "requests_per_second in total (every shard is a partition of every day: a handful "
        "is plenty)",
    )
    product_name: str = DEMO_EMAIL["product_name"]
    app_url: str = DEMO_EMAIL["app_url"]
    company_address: str = DEMO_EMAIL["company_address"]
    unsubscribe_url: str = DEMO_EMAIL["unsubscribe_url"]
    unsubscribe_secret: str | None = None
    previous_unsubscribe_secrets: list[str] = Field(
        [],
        description="secrets unsubscribe_secret had before a rotation: links signed with them, "
        "in emails already sent, keep unsubscribing (blank entries are ignored)",
    )
    webhook_secret: str | None = None
    quiet_hours: QuietHours | None = Field(
        None,
        description="in each reader's own timezone, across loops: an email due in them waits "
        "for their end",
    )
    max_delay: Duration = Field(
        "24h",
        description="how long after its due time an email may still go out; later, it is "
        "skipped and counted, never sent",
    )

    @field_validator("max_delay")
    @classmethod
    def _max_delay(cls, value: str | int) -> str | int:
        if parse_duration(value) < timedelta(hours=1):
            raise ValueError(
                f"{value!r} is shorter than the hour between two sends: give 1h or more"
            )
        return value

    @property
    def max_delay_interval(self) -> timedelta:
        return parse_duration(self.max_delay)

    @field_validator("reply_to", mode="before")
    @classmethod
    def _blank_reply_to_is_none(cls, value: object) -> object:
        # `${REPLY_TO:-}` left unset: no Reply-To, as before it was checked.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("from_address", "reply_to")
    @classmethod
    def _an_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # parseaddr never fails: it drops an unclosed "<" and glues trailing words onto the
        # address, so the address must also be the whole value or its "<...>" part.
        _name, address = parseaddr(value)
        whole = value.strip()
        if not (
            EMAIL_ADDRESS_PATTERN.fullmatch(address)
            and (whole == address or whole.endswith(f"<{address}>"))
        ):
            raise ValueError(
                f"{value!r} is not an email address like 'Acme <hello@acme.test>' or "
                "'hello@acme.test'"
            )
        return value

    @field_validator("app_url")
    @classmethod
    def _a_web_address(cls, value: str) -> str:
        # A relative or schemeless URL makes every email's button a dead link. A blank one is
        # the demo's, or `placeholder_problems`' to name.
        parsed = urlsplit(value.strip())
        if value.strip() and (parsed.scheme not in ("https", "http") or not parsed.hostname):
            raise ValueError(f"{value!r} must be a URL like 'https://app.acme.com'")
        return value

    @field_validator("unsubscribe_url")
    @classmethod
    def _one_click_url(cls, value: str) -> str:
        # RFC 8058: one-click unsubscribe URLs are https; plain http only for a local test.
        parsed = urlsplit(value)
        local = parsed.scheme == "http" and parsed.hostname in ("localhost", "127.0.0.1")
        if not (parsed.scheme == "https" and parsed.hostname) and not local:
            raise ValueError(f"{value!r} must be an https:// URL (RFC 8058)")
        return value

    @field_validator("unsubscribe_secret", "webhook_secret")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("previous_unsubscribe_secrets")
    @classmethod
    def _blank_entries_are_unset(cls, value: list[str]) -> list[str]:
        return [secret for secret in value if secret]

    def placeholder_problems(self) -> list[str]:
        """Why these settings may not email real people, one line per key: a reader-facing key
        left out or blank, or written out as the demo's own value (`DEMO_EMAIL`), or an address
        or URL on a placeholder domain (`PLACEHOLDER_DOMAINS`)."""
        problems = []
        for field, (key, purpose) in READER_FACING_SETTINGS.items():
            value = getattr(self, field)
            host = _host(key, value)
            if field not in self.model_fields_set or not value.strip():
                problems.append(f"email.{key}: required outside the demo ({purpose})")
            elif host and (reason := placeholder_domain(host)):
                problems.append(_unreachable(key, host, reason))
            elif value.strip().casefold() == DEMO_EMAIL[field].casefold():
                problems.append(
                    f"email.{key}: {value.strip()!r} is the demo's placeholder: give your own "
                    f"({purpose})"
                )
        reply_host = _host("reply_to", self.reply_to or "")
        if reply_host and (reason := placeholder_domain(reply_host)):
            problems.append(_unreachable("reply_to", reply_host, reason))
        return problems


def _host(key: str, value: str) -> str:
    """The domain (or IP address) an address or URL setting points at; empty for the others."""
    if key in ("from", "reply_to"):
        return parseaddr(value)[1].rpartition("@")[2]
    if key in ("app_url", "unsubscribe_url"):
        return urlsplit(value.strip()).hostname or ""
    return ""


def _unreachable(key: str, host: str, reason: str) -> str:
    return f"email.{key}: {host} is {reason}, which reaches no reader: give your own"


class ScheduleTrigger(StrictModel):
    type: Literal["schedule"] = "schedule"
    cron: str = "0 9 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not is_valid_cron(value):
            raise ValueError(f"{value!r} is not a valid cron expression")
        if not fires_at_most_once_a_day(value):
            raise ValueError(
                f"{value!r} fires more than once a day, and every run of a day serves the same "
                "partition (the day just ended): give one minute and one hour, like '0 9 * * *'"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # `America`: a directory
            raise ValueError(f"{value!r} is not a known IANA timezone") from None
        return value


class SegmentCondition(StrictModel):
    type: Literal["segment"] = "segment"
    segment: Literal[SEGMENTS] = "dormant"  # type: ignore[valid-type]


class TimedQuery(StrictModel):
    """A SQL query the pipeline runs read-only, under its own timeout."""

    query: str = Field(min_length=1)
    timeout: Duration = "10m"

    @field_validator("timeout")
    @classmethod
    def _duration(cls, value: str | int) -> str | int:
        parse_timeout(value)
        return value


class QueryCondition(TimedQuery):
    type: Literal["query"] = "query"


Condition = Annotated[SegmentCondition | QueryCondition, Field(discriminator="type")]


class ActivitySuccess(StrictModel):
    """A user came back: any product event or auth session."""

    type: Literal["activity"] = "activity"


class EventSuccess(StrictModel):
    """A user came back: one of these named product events."""

    type: Literal["events"] = "events"
    events: list[str] = Field(min_length=1)


class QuerySuccess(TimedQuery):
    """A user came back: a row of this query, which returns `user_id` and `at` (when)."""

    type: Literal["query"] = "query"


Success = Annotated[ActivitySuccess | EventSuccess | QuerySuccess, Field(discriminator="type")]

# Each shipped template and the variants it has copy of (its subject says which): a variant
# named here has words of its own, any other would silently get the first one's.
TEMPLATE_VARIANTS: dict[str, tuple[str, ...]] = {
    "re_engagement": ("a", "b"),
    "re_engagement_follow_up": ("a", "b"),
    "re_engagement_last_call": ("a", "b"),
}
KNOWN_TEMPLATES = tuple(TEMPLATE_VARIANTS)
# What `{{user.FIELD}}` may name in a step's personalization, as the seed writes it.
USER_FIELDS = ("id", "email", "name", "timezone", "last_activity_at")
USER_FIELD_REFERENCE = re.compile(r"^\s*\{\{\s*user\.([A-Za-z_]\w*)\s*\}\}\s*$")
# What the shipped templates read of a step's personalization: the name they greet (a user
# field or words), and the time the days away count from (the last activity, the one time
# the user record has).
PERSONALIZATION_KEYS = ("name", "lastActivity")
LAST_ACTIVITY_REFERENCE = "{{user.last_activity_at}}"


class EmailAction(StrictModel):
    type: Literal["email"] = "email"
    provider: Literal["resend", "outbox"] | None = Field(
        None,
        description="the seed's per-step provider: every email goes where email.provider says, "
        "so it must be that one when given",
    )
    template: str = "re_engagement"
    personalization: dict[str, str] = Field(default_factory=dict)
    variants: list[Identifier] = Field(default_factory=lambda: ["a"], min_length=1)

    @field_validator("personalization")
    @classmethod
    def _user_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for name, reference in value.items():
            if name not in PERSONALIZATION_KEYS:
                raise ValueError(
                    f"{name}: the templates read no such key (they read: "
                    f"{', '.join(PERSONALIZATION_KEYS)})"
                )
            if name == "lastActivity" and reference.replace(" ", "") != LAST_ACTIVITY_REFERENCE:
                raise ValueError(
                    f"lastActivity: {reference!r}: the days away count from the last activity, "
                    f"{LAST_ACTIVITY_REFERENCE}, the one time the user record has"
                )
            match = USER_FIELD_REFERENCE.match(reference)
            if not match and any(mark in reference for mark in ("{", "}")):
                # Words are greeted as written: a reference with a filter or extra words would
                # reach every reader as braces.
                raise ValueError(
                    f"{name}: {reference!r} is neither words nor a reference like "
                    "{{user.name}} (no filters, nothing around it)"
                )
            if match and match.group(1) not in USER_FIELDS:
                raise ValueError(
                    f"{name}: unknown user field {match.group(1)!r} "
                    f"(known: {', '.join(USER_FIELDS)})"
                )
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value not in KNOWN_TEMPLATES:
            raise ValueError(f"unknown template {value!r} (known: {', '.join(KNOWN_TEMPLATES)})")
        return value

    @field_validator("variants")
    @classmethod
    def _variants_have_copy(cls, value: list[str], info: ValidationInfo) -> list[str]:
        template = info.data.get("template")  # absent when the template itself was refused
        if template is None:
            return value
        known = TEMPLATE_VARIANTS[template]
        for variant in value:
            if variant not in known:
                raise ValueError(
                    f"variant {variant!r} has no copy in template {template!r}, which would "
                    f"send it variant {known[0]!r}'s words (its variants: {', '.join(known)})"
                )
        if len(set(value)) < len(value):
            raise ValueError(f"each variant once ({', '.join(value)})")
        return value


class Step(StrictModel):
    """One email of a loop's sequence. Only the first step has a trigger and a condition: the
    condition starts an episode, and later steps follow it `delay` after it started."""

    trigger: ScheduleTrigger | None = None
    condition: Condition | None = None
    delay: Duration = "0d"
    action: EmailAction = EmailAction()

    @field_validator("delay")
    @classmethod
    def _whole_days(cls, value: str | int) -> str | int:
        if parse_duration(value, allow_zero=True).total_seconds() % 86400:
            raise ValueError(f"{value!r} must be a whole number of days, like 3d")
        return value

    @property
    def delay_days(self) -> int:
        return int(parse_duration(self.delay, allow_zero=True).total_seconds() // 86400)


class Holdout(StrictModel):
    fraction: float = Field(0.1, ge=0, lt=1)
    salt: str | None = Field(None, description="default: the loop's name")


class Recovery(StrictModel):
    retries: int = Field(3, ge=0, le=20)
    backoff: Literal["exponential", "linear", "none"] = "exponential"
    delay: Duration = "30s"


class SegmentRules(StrictModel):
    """Thresholds of the engagement segments; every loop may set its own."""

    dormant_after_days: int = Field(7, ge=1)
    dormant_session_drop: float = Field(0.8, gt=0, le=1)
    at_risk_session_drop: float = Field(0.5, gt=0, le=1)
    minimum_baseline_sessions_per_week: float = Field(3, ge=0)
    new_user_days: int = Field(7, ge=0)
    never_activated_after_days: int = Field(7, ge=0)
    churned_after_days: int = Field(30, ge=1)
    dormant_jump_warning_factor: float = Field(3.0, gt=1)

    @model_validator(mode="after")
    def _ordered(self) -> SegmentRules:
        if self.at_risk_session_drop >= self.dormant_session_drop:
            raise ValueError(
                "at_risk_session_drop must be smaller than dormant_session_drop "
                f"({self.at_risk_session_drop} >= {self.dormant_session_drop})"
            )
        return self


class LocalSendTime(StrictModel):
    """Each reader's email at this time of their own day (their `timezone`, else the loops')."""

    local_time: LocalTime

    @property
    def at(self) -> time:
        return parse_local_time(self.local_time)


class LearnedSendTime(StrictModel):
    """Each reader's email at the hour they were most often active in the last `weeks` (the
    rollup's 5-minute slots), or at `local_time` of their own day for a reader with no activity
    then and for a random `fixed_share` of the readers: the comparison that says whether
    learning pays."""

    learn: Literal[True]
    local_time: LocalTime = Field(
        "09:00", description="the fixed time: of the fixed share, and of readers never active"
    )
    weeks: int = Field(4, ge=1, le=52, description="how far back the active hours are read")
    fixed_share: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="readers drawn at random to get the fixed time instead, to measure "
        "learned against fixed",
    )

    @property
    def at(self) -> time:
        return parse_local_time(self.local_time)


def _send_at_form(value: Any) -> str:
    if isinstance(value, str):
        return "after_run"
    if isinstance(value, dict) and "learn" in value:
        return "learn"
    if isinstance(value, LearnedSendTime):
        return "learn"
    return "local_time"


SendAt = Annotated[
    Annotated[Literal["after_run"], Tag("after_run")]
    | Annotated[LocalSendTime, Tag("local_time")]
    | Annotated[LearnedSendTime, Tag("learn")],
    Discriminator(_send_at_form),
]


class Loop(StrictModel):
    name: Identifier
    type: Literal["retention"] = "retention"
    opinion: str = Field(
        "", description="what the loop is for, in a sentence: its send job's description in the UI"
    )
    steps: list[Step] = Field(min_length=1)
    segments: SegmentRules = SegmentRules()
    holdout: Holdout = Holdout()
    step_holdout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="the share of treated users due a later step (the second on) who are "
        "withheld that step only, by a draw of its own: the step's lift compares its recipients "
        "with them; 0: later steps are not measured, nor paused",
    )
    cooldown_days: int = Field(30, ge=0, description="before a returned user may re-enter")
    recovery: Recovery = Recovery()
    success: Success = ActivitySuccess()
    windows: list[Duration] = Field(
        default_factory=lambda: ["7d", "14d", "30d"],
        min_length=1,
        description="how long after an assignment a return counts; the first one decides",
    )
    adjust: bool = Field(
        True, description="share traffic between variants by results and pause harmful steps"
    )
    send_at: SendAt = Field(
        "after_run",
        description="after_run: right after the daily run; {local_time: '09:00'}: at that time "
        "of each reader's day, by the hourly send; {learn: true}: at the hour each reader was "
        "most often active, a random share at the fixed local_time",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        _check_identifier(value)
        if "$" in value:
            raise ValueError(
                f"{value!r}: Dagster names the loop's jobs and schedules after it (send_<name>), "
                "and its names take letters, digits and _ only"
            )
        return value

    @property
    def trigger(self) -> ScheduleTrigger:
        return self.steps[0].trigger or ScheduleTrigger()

    @property
    def condition(self) -> SegmentCondition | QueryCondition:
        return self.steps[0].condition or SegmentCondition()

    @property
    def holdout_salt(self) -> str:
        return self.holdout.salt or self.name

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str | int]) -> list[str | int]:
        days = []
        for window in value:
            seconds = parse_duration(window).total_seconds()
            if seconds % 86400:
                raise ValueError(f"{window!r} must be a whole number of days, like 7d")
            days.append(int(seconds // 86400))
        if days != sorted(set(days)):
            raise ValueError(f"windows must grow, each once ({', '.join(map(str, value))})")
        return value

    @property
    def window_days(self) -> list[int]:
        return [int(parse_duration(window).total_seconds() // 86400) for window in self.windows]

    @model_validator(mode="after")
    def _sequence(self) -> Loop:
        previous = -1
        templates: list[str] = []
        for index, step in enumerate(self.steps):
            if step.action.template in templates:
                raise ValueError(
                    f"steps.{index}.action.template: {step.action.template!r} is already step "
                    f"{templates.index(step.action.template)}'s; a step's template is its id in "
                    "the experiment design, so each step of a loop has its own"
                )
            templates.append(step.action.template)
            if index and (step.trigger is not None or step.condition is not None):
                raise ValueError(
                    f"steps.{index}: only the first step has a trigger and a condition; later "
                    "steps follow the episode it starts"
                )
            if step.delay_days <= previous:
                raise ValueError(
                    f"steps.{index}.delay: each step comes after the one before "
                    f"({step.delay_days} days <= {previous})"
                )
            previous = step.delay_days
        return self


# Visits are counted on 5-minute slots of the day, so the gap between two is whole slots.
VISIT_SLOT_MINUTES = 5
VISIT_GAP_MINUTES = (5, 240)


class ActivitySettings(StrictModel):
    """What the daily snapshot computes for every user."""

    baseline: Literal["visits", "logins"] | None = Field(
        None,
        description="what the session baseline and the drop rules count: `visits` (bursts of "
        "activity from any source, separated by `visit_gap`) or `logins` (the login sources' "
        "rows); default: logins when a login source is configured, else visits",
    )
    visit_gap: Duration = Field(
        "30m",
        description="the quiet time that ends a visit: a multiple of 5 minutes, 5m to 4h",
    )
    baseline_weeks: int = Field(4, ge=1, le=52)
    last_actions: int = Field(3, ge=1, le=20)

    @field_validator("visit_gap")
    @classmethod
    def _whole_slots(cls, value: str | int) -> str | int:
        minutes = parse_duration(value).total_seconds() / 60
        low, high = VISIT_GAP_MINUTES
        if minutes % VISIT_SLOT_MINUTES or not low <= minutes <= high:
            raise ValueError(
                f"{value!r} must be a multiple of {VISIT_SLOT_MINUTES} minutes from {low}m to "
                f"{high // 60}h, like 30m"
            )
        return value

    @property
    def visit_gap_minutes(self) -> int:
        return int(parse_duration(self.visit_gap).total_seconds() // 60)


class RetentionConfig(StrictModel):
    database: DatabaseSettings = DatabaseSettings()
    activity: ActivitySettings = ActivitySettings()
    email: EmailSettings = EmailSettings()
    loops: list[Loop] = Field(min_length=1)
    start_date: date | None = Field(
        None,
        description="the first daily partition: the first day snapshots and emails are made "
        "for; required by the Dagster definitions, except under `retention-pipeline dev`",
    )

    @model_validator(mode="after")
    def _loops_consistent(self) -> RetentionConfig:
        names = [loop.name for loop in self.loops]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"loops: duplicate loop name {duplicates[0]!r}")
        for index, loop in enumerate(self.loops):
            for number, step in enumerate(loop.steps):
                provider = step.action.provider
                if provider is not None and provider != self.email.provider:
                    raise ValueError(
                        f"loops.{index}.steps.{number}.action.provider: {provider!r} is not "
                        f"email.provider ({self.email.provider!r}): every email goes where "
                        "email.provider says; leave the step's provider out or make them equal"
                    )
        first = self.loops[0].trigger
        for index, loop in enumerate(self.loops):
            if loop.trigger.timezone != first.timezone:
                raise ValueError(
                    f"loops.{index}.steps.0.trigger.timezone: all loops share one timezone, "
                    f"because daily partitions and the activity rollup use it "
                    f"({first.timezone!r} vs {loop.trigger.timezone!r})"
                )
        for index, loop in enumerate(self.loops):
            # Each evaluation rewrites the outcomes this far back, reading the snapshot of each
            # window's last day: dropped, the outcome loses its revenue.
            reach = max(loop.window_days) + DUE_LAG_DAYS
            if self.database.keep_days < reach:
                raise ValueError(
                    f"database.keep_days: {self.database.keep_days} days of snapshots are fewer "
                    f"than loops.{index}.windows reach back ({max(loop.window_days)} days, and "
                    f"{DUE_LAG_DAYS} for late sends): keep at least {reach}, or shorten the "
                    "windows"
                )
        if self.activity.baseline == "logins" and not self.has_login_source:
            raise ValueError(
                "activity.baseline: 'logins' counts the rows of login sources, and no source "
                "has `login: true` (nor is `database.tables.sessions` mapped): count visits"
            )
        return self

    @property
    def counted_use(self) -> Literal["visits", "logins"]:
        """What the session baseline and the drop rules count: `activity.baseline`, or by
        default logins when a login source is configured, else visits."""
        if self.activity.baseline is not None:
            return self.activity.baseline
        return "logins" if self.has_login_source else "visits"

    @property
    def has_login_source(self) -> bool:
        """Whether some activity source records logins (`login: true`, or the `sessions`
        table)."""
        return any(source.source.login for source in self.database.activity_sources())

    @property
    def timezone(self) -> str:
        return self.loops[0].trigger.timezone

    @property
    def loop_names(self) -> list[str]:
        """The configured loops' names, in configuration order."""
        return [loop.name for loop in self.loops]

    def sends_on_due_times(self, loop: Loop) -> bool:
        """Whether each member of the loop's audience has a due time of their own, which the
        hourly send keeps to: the loop sends at a local time, or quiet hours hold some back."""
        return loop.send_at != "after_run" or self.email.quiet_hours is not None

    def loop(self, name: str) -> Loop:
        for loop in self.loops:
            if loop.name == name:
                return loop
        known = ", ".join(self.loop_names)
        raise ValueError(f"no loop named {name!r} (known: {known})")
