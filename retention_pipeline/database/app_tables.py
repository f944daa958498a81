"""The contract with the app's tables: check the configured mapping against the live database.

Everything here reads the catalog only; the pipeline never writes the app's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, text
from sqlalchemy.sql.compiler import IdentifierPreparer

from retention_pipeline.config.models import (
    SHORTHAND_SOURCES,
    AppTables,
    OwnerTable,
    Predicate,
    SubscriptionsMapping,
    TableMapping,
    parse_column_reference,
)
from retention_pipeline.database.predicates import (
    column_ref_problem,
    column_ref_sql,
    predicate_problem,
)
from retention_pipeline.database.timestamps import TIMESTAMP_TYPES, timestamp_column_sql

# What each mapped column must hold for the pipeline's SQL to mean something; a key not named
# here (an id, checked against users.id, or jsonb properties) is not checked by kind.
EXPECTED_KINDS: dict[tuple[str, str], str] = {
    ("users", "email"): "text",
    ("users", "name"): "text",
    ("users", "timezone"): "text",
    ("users", "created_at"): "timestamp",
    ("subscriptions", "status"): "label_or_flag",
    ("subscriptions", "plan"): "label",
    ("subscriptions", "currency"): "label",
    ("subscriptions", "billing_interval"): "label",
    ("subscriptions", "amount_cents"): "number",
    ("subscriptions", "updated_at"): "timestamp",
    ("subscription_prices", "amount"): "number",
    ("subscription_prices", "interval"): "label",
    ("subscription_prices", "currency"): "label",
    ("subscription_items", "quantity"): "number",
    ("subscriptions", "quantity"): "number",
}
KIND_DESCRIPTIONS = {
    "text": "a text type",
    "label": "a text or enum type",
    "label_or_flag": "a text, enum or boolean type",
    "number": "a numeric type",
    "timestamp": "a timestamp",
}
# Users are joined across tables on their ids as text: a number and a uuid never match.
USER_ID_KEYS = {
    "users": "id",
    "subscriptions": "user_id",
}


class MappingError(ValueError):
    """The configured mapping does not match the live database; one line naming the culprit."""


@dataclass(frozen=True)
class RelatedTable:
    """A table the subscriptions read besides their own (members, owners, prices, items), with
    the references it is read by, by role (`owner`, `user`, `amount`, ...)."""

    table: str
    schema_: str
    columns: dict[str, str]
    where: tuple[Predicate, ...] = ()
    owning: tuple[Predicate, ...] = ()
    subscriptions: SubscriptionsMapping | None = None
    """The whole mapping, on the subscriptions' own table."""

    @property
    def qualified_name(self) -> str:
        return f"{self.schema_}.{self.table}"


# How the integer and uuid keys apps use print as text, and the type to read such text as: every
# value of the column matches its form, and text in that form reads as the type without an error
# (integers are read as int8, which the key's index compares with int2 and int4 alike).
_INTEGER_TEXT = "^-?[0-9]{1,19}$"
_UUID_TEXT = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_ID_TYPES = {"INT2": "integer", "INT4": "integer", "INT8": "integer", "UUID": "uuid"}


@dataclass(frozen=True)
class ResolvedTable:
    """A mapped table with the SQL type of each mapped column, as the database reports it."""

    name: str
    mapping: TableMapping | SubscriptionsMapping | RelatedTable
    column_types: dict[str, str]
    base_types: dict[str, str] = field(default_factory=dict)
    """pg_type names of every column of the table (predicates read naive timestamps as UTC)."""

    def sql_name(self, preparer: IdentifierPreparer) -> str:
        return table_sql(self.mapping, preparer)

    def maps(self, key: str) -> bool:
        """Whether the app has this (optional) column."""
        return key in self.mapping.columns

    def column_sql(self, key: str, alias: str, preparer: IdentifierPreparer) -> str:
        """`alias."column"` for a mapped key, the text at a JSON path (`column.key`), or columns
        joined by a space with blanks skipped (NULL when all are blank); NULL for an optional
        key left unmapped."""
        if key not in self.mapping.columns:
            return "NULL"
        reference = self.mapping.columns[key]
        if isinstance(reference, list):
            parts = ", ".join(
                f"nullif(btrim({column_ref_sql(part, alias, preparer.dialect)}::text), '')"
                for part in reference
            )
            return f"nullif(concat_ws(' ', {parts}), '')"
        return column_ref_sql(reference, alias, preparer.dialect)

    def id_equals_sql(
        self, alias: str, user_id: str, preparer: IdentifierPreparer, *, probe_key: bool
    ) -> str:
        """Whether the row `alias` has the text `user_id` as its id, as `id::text` says it.

        With `probe_key`, in a form that can use the app's key index, for looking up a few
        users: comparing `id::text` reads the whole users table each time. Without it, the
        plain comparison, for matching many users at once in one hash join, where reading every
        text as an id would only add work (twice the time at a million users). A value that
        cannot be an id of the column's type matches nothing and raises nothing."""
        column = self.column_sql("id", alias, preparer)
        as_text = f"{column}::text = {user_id}"
        id_type = self.column_types.get("id", "TEXT")
        if id_type in ("TEXT", "VARCHAR"):
            return f"{column} = {user_id}"
        if not probe_key:
            return as_text
        kind = _ID_TYPES.get(id_type)
        if kind == "integer":
            # CASE, unlike AND, tests in order: the range is checked before the cast could fail.
            typed = (
                f"CASE WHEN {user_id} !~ '{_INTEGER_TEXT}' THEN NULL "
                f"WHEN CAST({user_id} AS pg_catalog.numeric) "
                "BETWEEN -9223372036854775808 AND 9223372036854775807 "
                f"THEN CAST({user_id} AS pg_catalog.int8) END"
            )
        elif kind == "uuid":
            typed = (
                f"CASE WHEN {user_id} ~ '{_UUID_TEXT}' THEN CAST({user_id} AS pg_catalog.uuid) END"
            )
        else:
            return as_text
        return f"({column} = {typed} AND {as_text})"

    def timestamp_sql(self, key: str, alias: str, preparer: IdentifierPreparer) -> str:
        """The column as timestamptz; naive timestamps are taken as UTC, as ORMs store them."""
        column = self.column_sql(key, alias, preparer)
        if key in self.mapping.columns and parse_column_reference(self.mapping.columns[key])[1]:
            return f"({column})::pg_catalog.timestamptz"
        return timestamp_column_sql(column, self.column_types.get(key, "").lower())


@dataclass(frozen=True)
class _Column:
    type_name: str  # pg_type.typname of the column's (base) type
    category: str  # pg_type.typcategory: S string, N numeric, E enum, D date/time, ...
    display: str  # format_type(), as a person writes the type

    @property
    def id_family(self) -> str | None:
        if self.type_name == "uuid":
            return "uuid"
        return {"N": "number", "S": "text"}.get(self.category)


@dataclass(frozen=True)
class MappingReport:
    """Every table whose mapped columns all exist, and every problem found, one line each."""

    resolved: dict[str, ResolvedTable]
    problems: list[str]


def table_sql(
    mapping: TableMapping | SubscriptionsMapping | RelatedTable, preparer: IdentifierPreparer
) -> str:
    """The mapped table's schema-qualified, quoted name."""
    return f"{preparer.quote_schema(mapping.schema_)}.{preparer.quote(mapping.table)}"


def _columns(
    connection: Connection, mapping: TableMapping | SubscriptionsMapping | RelatedTable
) -> dict[str, _Column] | None:
    return catalog_columns(connection, mapping.schema_, mapping.table)


def catalog_columns(connection: Connection, schema: str, table: str) -> dict[str, _Column] | None:
    """The table's (or view's) columns, with domains read as their base type; None when the
    relation does not exist."""
    rows = connection.execute(
        text("""
            SELECT a.attname, coalesce(base.typname, t.typname), coalesce(base.typcategory,
                   t.typcategory), pg_catalog.format_type(a.atttypid, a.atttypmod)
            FROM pg_catalog.pg_class AS c
            JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
            LEFT JOIN pg_catalog.pg_attribute AS a
                ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            LEFT JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
            LEFT JOIN pg_catalog.pg_type AS base ON t.typtype = 'd' AND base.oid = t.typbasetype
            WHERE n.nspname = :schema AND c.relname = :table
              AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            ORDER BY a.attnum"""),
        {"schema": schema, "table": table},
    ).all()
    if not rows:
        return None
    return {
        name: _Column(type_name, category, display)
        for name, type_name, category, display in rows
        if name is not None
    }


def _canonical_type(column: _Column) -> str:
    return {"timestamp": "TIMESTAMP", "timestamptz": "TIMESTAMPTZ", "date": "DATE"}.get(
        column.type_name, column.type_name.upper()
    )


def _has_kind(column: _Column, kind: str) -> bool:
    if kind == "timestamp":
        return column.type_name in TIMESTAMP_TYPES
    if kind == "label":
        return column.category in ("S", "E")
    if kind == "label_or_flag":
        return column.category in ("S", "E", "B")
    return column.category == {"text": "S", "number": "N"}[kind]


def inspect_app_tables(connection: Connection, tables: AppTables) -> MappingReport:
    """Check every mapped table and column exists and holds what the pipeline reads from it.
    The shorthand `events` and `sessions` are activity sources, checked with the others
    (`activity_sources.inspect_sources`)."""
    resolved: dict[str, ResolvedTable] = {}
    problems: list[str] = []
    found: dict[str, dict[str, _Column]] = {}
    for name, mapping in tables.items():
        if name in SHORTHAND_SOURCES:
            continue
        if isinstance(mapping, SubscriptionsMapping):
            billing, billing_problems = _inspect_subscriptions(connection, tables, mapping, found)
            resolved.update(billing)
            problems.extend(billing_problems)
            continue
        available = _columns(connection, mapping)
        if available is None:
            problems.append(
                f"database.tables.{name}.table: app table {mapping.qualified_name} "
                "does not exist in the app database"
            )
            continue
        found[name] = {}
        column_types: dict[str, str] = {}
        # A wrong kind still lets the SQL run; a missing column or a bad path does not.
        unreadable = False
        for key, reference in mapping.columns.items():
            where = f"database.tables.{name}.columns.{key}"
            # A built name's parts, each checked on its own.
            parts = (
                [(f"{where}.{index}", part) for index, part in enumerate(reference)]
                if isinstance(reference, list)
                else [(where, reference)]
            )
            for part_where, part in parts:
                problem = column_ref_problem(part_where, part, mapping.qualified_name, available)
                if problem:
                    problems.append(problem)
                    unreadable = True
                    continue
                column, path = parse_column_reference(part)
                kind = EXPECTED_KINDS.get((name, key))
                if not path and kind and not _has_kind(available[column], kind):
                    problems.append(
                        f"{part_where}: column {mapping.qualified_name}.{column} is "
                        f"{available[column].display}, expected {KIND_DESCRIPTIONS[kind]}"
                    )
            if isinstance(reference, str) and reference in available:
                found[name][key] = available[reference]
                column_types[key] = _canonical_type(available[reference])
            else:  # a JSON value or a built name: text
                column_types[key] = "TEXT"
        for index, predicate in enumerate(getattr(mapping, "exclude", [])):
            problem = predicate_problem(
                f"database.tables.{name}.exclude.{index}",
                predicate,
                mapping.qualified_name,
                available,
            )
            if problem:
                problems.append(problem)
                unreadable = True
        if not unreadable:
            resolved[name] = ResolvedTable(
                name=name,
                mapping=mapping,
                column_types=column_types,
                base_types={column: found.type_name for column, found in available.items()},
            )
    problems.extend(_user_id_problems(tables, found))
    return MappingReport(resolved=resolved, problems=problems)


SUBSCRIPTIONS_KEY = "database.tables.subscriptions"
# Where in `database.tables.subscriptions` each table the subscriptions read is configured.
PART_KEYS = {
    "subscriptions": "",
    "subscription_prices": "amount.price",
    "subscription_items": "amount.items",
    "subscription_members": "owner.members",
    "subscription_member_users": "owner.users_column",
    "subscription_owners": "owner.owning_member",
}


def subscription_parts(
    tables: AppTables, mapping: SubscriptionsMapping
) -> dict[str, tuple[RelatedTable, dict[str, str]]]:
    """Every table the subscriptions are read from, by name, with the configuration key path of
    each reference read from it."""
    own = dict(mapping.columns)
    paths = {key: f"columns.{key}" for key in mapping.columns}
    owner, amount = mapping.owner, mapping.stored_amount
    if owner is not None:
        own["owner"], paths["owner"] = owner.column, "owner.column"
    parts: dict[str, tuple[RelatedTable, dict[str, str]]] = {}
    if amount is not None and amount.column is not None:
        own["amount"], paths["amount"] = amount.column, "amount.column"
    if amount is not None and amount.price is not None:
        price = amount.price
        priced = {
            key: reference
            for key, reference in (
                ("id", price.id),
                ("amount", price.amount),
                ("interval", price.interval),
                ("interval_count", price.interval_count),
                ("currency", price.currency),
                ("plan", price.plan),
            )
            if reference is not None
        }
        parts["subscription_prices"] = (
            RelatedTable(price.table, price.schema_, priced),
            {key: f"amount.price.{key}" for key in priced},
        )
        bought = {"price_id": amount.by or ""}
        if amount.quantity is not None:
            bought["quantity"] = amount.quantity
        bought_paths = {"price_id": "amount.by", "quantity": "amount.quantity"}
        if amount.items is not None:
            items = amount.items
            own["key"], paths["key"] = items.key, "amount.items.key"
            bought["subscription"] = items.subscription
            bought_paths["subscription"] = "amount.items.subscription"
            parts["subscription_items"] = (
                RelatedTable(items.table, items.schema_, bought, tuple(items.where)),
                bought_paths,
            )
        else:
            own.update(bought)
            paths.update(bought_paths)
    if owner is not None and owner.members is not None:
        members = owner.members
        read = {"owner": members.owner}
        read.update({"user": members.user} if members.user else {"email": members.email or ""})
        owning = owner.owning_member if isinstance(owner.owning_member, list) else []
        parts["subscription_members"] = (
            RelatedTable(members.table, members.schema_, read, tuple(members.where), tuple(owning)),
            {key: f"owner.members.{key}" for key in read},
        )
    if owner is not None and owner.users_column is not None:
        users = tables.users
        parts["subscription_member_users"] = (
            RelatedTable(
                users.table,
                users.schema_,
                {"owner": owner.users_column, "user": users.columns["id"]},
            ),
            {"owner": "owner.users_column", "user": "users.columns.id"},
        )
    if owner is not None and isinstance(owner.owning_member, OwnerTable):
        owning_table = owner.owning_member
        read = {"id": owning_table.id, "user": owning_table.user}
        parts["subscription_owners"] = (
            RelatedTable(owning_table.table, owning_table.schema_, read),
            {key: f"owner.owning_member.{key}" for key in read},
        )
    parts = {
        "subscriptions": (
            RelatedTable(
                mapping.table, mapping.schema_, own, tuple(mapping.where), subscriptions=mapping
            ),
            paths,
        ),
        **parts,
    }
    return parts


def _inspect_subscriptions(
    connection: Connection,
    tables: AppTables,
    mapping: SubscriptionsMapping,
    found: dict[str, dict[str, _Column]],
) -> tuple[dict[str, ResolvedTable], list[str]]:
    """Every table the subscriptions read, checked like the other mapped tables; the
    subscriptions' own resolved with `mapping`, the others with what is read of them."""
    resolved: dict[str, ResolvedTable] = {}
    problems: list[str] = []
    for name, (part, paths) in subscription_parts(tables, mapping).items():
        available = _columns(connection, part)
        table_path = f"{PART_KEYS[name]}.table".lstrip(".")
        if available is None:
            problems.append(
                f"{SUBSCRIPTIONS_KEY}.{table_path}: app table {part.qualified_name} "
                "does not exist in the app database"
            )
            continue
        before = len(problems)
        found[name] = {}
        for key, reference in part.columns.items():
            where = f"{SUBSCRIPTIONS_KEY}.{paths[key]}"
            problem = column_ref_problem(where, reference, part.qualified_name, available)
            if problem:
                problems.append(problem)
                continue
            column, path = parse_column_reference(reference)
            if path:
                continue
            found[name][key] = available[column]
            kind = EXPECTED_KINDS.get((name, key)) or ("number" if key == "amount" else None)
            if kind and not _has_kind(available[column], kind):
                problems.append(
                    f"{where}: column {part.qualified_name}.{column} is "
                    f"{available[column].display}, expected {KIND_DESCRIPTIONS[kind]}"
                )
        for group, predicates in (("where", part.where), ("owning_member", part.owning)):
            prefix = (
                "owner.owning_member"
                if group == "owning_member"
                else f"{PART_KEYS[name]}.where".lstrip(".")
            )
            for number, predicate in enumerate(predicates):
                problem = predicate_problem(
                    f"{SUBSCRIPTIONS_KEY}.{prefix}.{number}",
                    predicate,
                    part.qualified_name,
                    available,
                )
                if problem:
                    problems.append(problem)
        if len(problems) == before:
            resolved[name] = ResolvedTable(
                name=name,
                mapping=part,
                column_types={key: _canonical_type(column) for key, column in found[name].items()},
                base_types={column: found.type_name for column, found in available.items()},
            )
    member_user = found.get("subscription_members", {}).get("user")
    users_id = found.get("users", {}).get("id")
    if (
        member_user is not None
        and users_id is not None
        and not _same_id_family(member_user, users_id)
    ):
        problems.append(
            f"{SUBSCRIPTIONS_KEY}.owner.members.user: column "
            f"{subscription_parts(tables, mapping)['subscription_members'][0].qualified_name}."
            f"{mapping.owner.members.user} is {member_user.display} but "  # type: ignore[union-attr]
            f"{tables.users.qualified_name}.{tables.users.columns['id']} is "
            f"{users_id.display}: their values never match"
        )
    # The subscriptions are read from all their tables at once, or not at all.
    if len(resolved) < len(subscription_parts(tables, mapping)):
        return {}, problems
    return resolved, problems


def _same_id_family(column: _Column, users_id: _Column) -> bool:
    return (
        column.id_family is None
        or users_id.id_family is None
        or "text" in (column.id_family, users_id.id_family)
        or column.id_family == users_id.id_family
    )


def _user_id_problems(tables: AppTables, found: dict[str, dict[str, _Column]]) -> list[str]:
    problems: list[str] = []
    users_id = found.get("users", {}).get("id")
    for name, key in USER_ID_KEYS.items():
        column = found.get(name, {}).get(key)
        if column is None:
            continue
        mapping: TableMapping = getattr(tables, name)
        problem = id_family_problem(
            f"database.tables.{name}.columns.{key}",
            f"{mapping.qualified_name}.{mapping.columns[key]}",
            column,
            users_id if name != "users" else None,
            tables.users,
        )
        if problem:
            problems.append(problem)
    return problems


def id_family_problem(
    where: str,
    qualified: str,
    column: _Column,
    users_id: _Column | None,
    users: TableMapping | None,
) -> str | None:
    """Why `column` cannot hold user ids comparable with the users table's (`users_id`, when
    known), or None."""
    if column.id_family is None:
        return (
            f"{where}: column {qualified} is {column.display}, expected a user id "
            "(an integer, text or uuid type)"
        )
    if (
        users_id is not None
        and users is not None
        and users_id.id_family is not None
        and "text" not in (column.id_family, users_id.id_family)
        and column.id_family != users_id.id_family
    ):
        return (
            f"{where}: column {qualified} is {column.display} but "
            f"{users.qualified_name}.{users.columns['id']} is {users_id.display}: "
            "their values never match"
        )
    return None


def resolve_app_tables(connection: Connection, tables: AppTables) -> dict[str, ResolvedTable]:
    """The mapped tables, checked; raise MappingError naming the first problem."""
    report = inspect_app_tables(connection, tables)
    if report.problems:
        raise MappingError(report.problems[0])
    return report.resolved
