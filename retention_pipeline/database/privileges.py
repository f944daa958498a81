"""A PostgreSQL permission error in one line: the right the role lacks, on which object.

PostgreSQL names the object ("permission denied for schema retention", "must be owner of table
users") but not the right; which one a statement needed follows from the object's kind and
what the statement does. Where that is not certain, the line says so rather than guess."""

from __future__ import annotations

import re

from psycopg import errors
from sqlalchemy.exc import DBAPIError

_NO_PRIVILEGE = re.compile(r"permission denied for (?P<kind>[a-z -]+?) (?P<name>\S+)$")
_NOT_OWNER = re.compile(r"must be owner of (?P<kind>[a-z -]+?) (?P<name>\S+)$")
_COLUMN = re.compile(r"permission denied for column (?P<column>\S+) of relation (?P<name>\S+)$")
_WRITE_TARGET = re.compile(
    r"\b(?P<verb>INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(?:ONLY\s+)?(?P<table>[\w.\"]+)",
    re.IGNORECASE,
)
_LOCKING_READ = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+UPDATE|UPDATE|SHARE|KEY\s+SHARE)\b", re.I)
_RELATIONS = {"table", "view", "materialized view", "foreign table", "relation"}
_USED_BY_USAGE = {"sequence", "type", "domain", "language", "foreign server"}
_EXECUTED = {"function", "procedure", "routine", "aggregate"}
STATEMENT_SHOWN = 80


def _verb(statement: str) -> str:
    words = statement.upper().split()[:5]
    if words[:1] == ["CREATE"] and "TRIGGER" in words:  # CREATE [OR REPLACE] TRIGGER
        return "CREATE TRIGGER"
    return words[0] if words else ""


def _last_part(identifier: str) -> str:
    return identifier.rsplit(".", 1)[-1].strip('"')


def _qualified(name: str, statement: str | None) -> str:
    """`name` with the schema the statement names it in: PostgreSQL's message leaves it out."""
    found = re.search(rf'([\w"]+)\."?{re.escape(name)}\b', statement or "")
    return f"{found[1].strip(chr(34))}.{name}" if found else name


def _relation_privilege(name: str, statement: str) -> str | None:
    verb = _verb(statement)
    if verb == "CREATE TRIGGER":
        return "TRIGGER"
    if verb == "TRUNCATE":
        return "TRUNCATE"
    if _LOCKING_READ.search(statement):  # needs UPDATE too: which one is missing is unknown
        return None
    if verb not in ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE"):
        return None
    # A table the statement does not write is only read. The one it starts by writing, or one a
    # data-modifying WITH writes and names nowhere else, is written.
    written = [t for t in _WRITE_TARGET.finditer(statement) if _last_part(t["table"]) == name]
    if not written:
        return "SELECT"
    if written[0].start() == len(statement) - len(statement.lstrip()):
        return written[0]["verb"].split()[0].upper()
    mentions = re.findall(rf'(?<![\w"])"?{re.escape(name)}"?(?![\w"])', statement)
    return written[0]["verb"].split()[0].upper() if len(mentions) == 1 else None


def _privilege(kind: str, name: str, statement: str | None) -> str | None:
    if statement is None:  # refused while connecting
        return "CONNECT" if kind == "database" else None
    creates = _verb(statement) == "CREATE"
    if kind == "database":  # creating a schema; a temporary table needs TEMPORARY instead
        temporary = re.match(r"CREATE\s+(?:LOCAL\s+|GLOBAL\s+)?TEMP", statement, re.I)
        return "TEMPORARY" if temporary else "CREATE" if creates else None
    if kind == "schema":
        return "CREATE" if creates else "USAGE"
    if kind in _RELATIONS:
        return _relation_privilege(name, statement)
    if kind in _USED_BY_USAGE:
        return "USAGE"
    if kind in _EXECUTED:
        return "EXECUTE"
    return None


def _missing_right(message: str, statement: str | None) -> str:
    if column := _COLUMN.match(message):
        privilege = _relation_privilege(column["name"], statement or "")
        right = f"{privilege} on" if privilege else "a privilege on"
        table = _qualified(column["name"], statement)
        return f"lacks {right} column {column['column']} of table {table}"
    if owned := _NOT_OWNER.match(message):
        kind = "table" if owned["kind"] == "relation" else owned["kind"]
        return f"is not the owner of {kind} {_qualified(owned['name'], statement)}"
    if denied := _NO_PRIVILEGE.match(message):
        kind, name = denied["kind"], denied["name"]
        privilege = _privilege(kind, name, statement)
        shown_kind = "table" if kind == "relation" else kind
        right = f"{privilege} on" if privilege else "a privilege on"
        if shown_kind in _RELATIONS | _USED_BY_USAGE | _EXECUTED:
            name = _qualified(name, statement)
        return f"lacks {right} {shown_kind} {name}"
    return f"lacks a privilege: {message}"


def lacking_right(error: DBAPIError, role: str | None, statement: str | None) -> str | None:
    """ "role X lacks SELECT on table retention.t" for a permission error (SQLSTATE 42501) met by
    `statement`; None for any other error."""
    if not isinstance(error.orig, errors.InsufficientPrivilege):
        return None
    message = error.orig.diag.message_primary or str(error.orig).splitlines()[0]
    who = f"role {role}" if role else "the database role"
    return f"{who} {_missing_right(message, statement)}"


def permission_problem(error: DBAPIError, role: str | None, command: str) -> str | None:
    """One line for a permission error (SQLSTATE 42501) that `command` met, naming `role`, the
    right it lacks and the object; None for any other error."""
    statement = " ".join(error.statement.split()) if error.statement else None
    lacking = lacking_right(error, role, statement)
    if lacking is None:
        return None
    needed = f"needed by `{command}`"
    if statement:
        shown = (
            statement
            if len(statement) <= STATEMENT_SHOWN
            else statement[: STATEMENT_SHOWN - 3] + "..."
        )
        needed += f" for: {shown}"
    return f"permission denied: {lacking} ({needed})"
