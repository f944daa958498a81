"""Predicates and column references: what the configuration may say, and what rows they pick
in a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, text

from retention_pipeline.config.models import Predicate
from retention_pipeline.database.predicates import (
    any_of_sql,
    column_ref_problem,
    column_ref_sql,
    predicate_problem,
    predicate_sql,
)

ACCOUNTS = """
    CREATE TABLE "Account" (
        id integer PRIMARY KEY,
        "deletedAt" timestamp,
        disabled boolean NOT NULL DEFAULT false,
        status text,
        banned_until timestamptz,
        meta jsonb
    );
    INSERT INTO "Account" VALUES
        (1, NULL, false, 'ACTIVE', NULL,
         '{"provider": "email", "profile": {"name": "Ada"}, "verified": true}'),
        (2, now() - interval '1 day', false, 'ACTIVE', NULL, NULL),
        (3, NULL, true, 'ACTIVE', NULL, NULL),
        (4, NULL, false, 'LOCKED', NULL, NULL),
        (5, NULL, false, 'ACTIVE', now() + interval '3 days', NULL),
        (6, NULL, false, 'ACTIVE', now() - interval '3 days', NULL),
        (7, NULL, false, 'it''s odd', NULL, '{"provider": "anonymous", "verified": "maybe"}'),
        (8, NULL, false, 'ACTIVE', NULL, '{"verified": "False"}'),
        (9, NULL, false, '50%% off', NULL, NULL);  -- %% : the driver's escape of %
"""


@pytest.fixture
def accounts(create_database: Callable[[], str]):
    engine = create_engine(create_database())
    with engine.begin() as connection:
        connection.exec_driver_sql(ACCOUNTS)
    yield engine
    engine.dispose()


def _ids(engine, where: str) -> list[int]:
    with engine.connect() as connection:
        return list(
            connection.execute(text(f'SELECT id FROM "Account" AS a WHERE {where} ORDER BY id'))
            .scalars()
            .all()
        )


@pytest.mark.parametrize(
    ("predicate", "ids"),
    [
        ({"column": "deletedAt", "is": "set"}, [2]),
        ({"column": "banned_until", "is": "unset"}, [1, 2, 3, 4, 7, 8, 9]),
        ({"column": "disabled", "is": True}, [3]),
        ({"column": "disabled", "is": False}, [1, 2, 4, 5, 6, 7, 8, 9]),
        ({"column": "status", "in": ["LOCKED", "BANNED"]}, [4]),
        ({"column": "status", "equals": "it's odd"}, [7]),
        ({"column": "status", "in": ["50% off"]}, [9]),
        ({"column": "banned_until", "is": "future"}, [5]),
        ({"column": "banned_until", "is": "past"}, [6]),
        ({"column": "deletedAt", "is": "past"}, [2]),
        ({"column": "meta.provider", "equals": "anonymous"}, [7]),
        ({"column": "meta.profile.name", "in": ["Ada"]}, [1]),
        # JSON flags are read as words, never cast: "maybe" fails no statement.
        ({"column": "meta.verified", "is": True}, [1]),
        ({"column": "meta.verified", "is": False}, [8]),
        ({"column": "id", "in": [3, 5]}, [3, 5]),
    ],
)
def test_each_predicate_picks_the_rows_it_describes(accounts, predicate, ids):
    parsed = Predicate.model_validate(predicate)
    column_type = {"deletedAt": "timestamp", "banned_until": "timestamptz"}.get(parsed.column)
    assert _ids(accounts, predicate_sql(parsed, "a", accounts.dialect, column_type)) == ids


def test_any_of_excludes_an_account_matching_one_predicate(accounts):
    predicates = [
        Predicate.model_validate(raw)
        for raw in (
            {"column": "deletedAt", "is": "set"},
            {"column": "disabled", "is": True},
            {"column": "meta.provider", "equals": "anonymous"},
        )
    ]
    types = {"deletedAt": "timestamp"}
    assert _ids(accounts, any_of_sql(predicates, "a", accounts.dialect, types)) == [2, 3, 7]
    assert _ids(accounts, any_of_sql([], "a", accounts.dialect)) == []


def test_a_json_path_reads_the_value_as_text(accounts):
    expression = column_ref_sql("meta.profile.name", "a", accounts.dialect)
    with accounts.connect() as connection:
        names = connection.execute(
            text(f'SELECT {expression} FROM "Account" AS a WHERE id = 1')
        ).scalar_one()
    assert names == "Ada"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"column": "status"}, "give exactly one of is"),
        ({"column": "status", "equals": "A", "in": ["B"]}, "equals and in given"),
        ({"column": "status", "is": "soon"}, "Input should be"),
        ({"column": "1status", "is": "set"}, "not a valid SQL identifier"),
        ({"column": "meta.a b", "is": "set"}, "is not a JSON key"),
        ({"column": "status", "in": []}, "at least 1 item"),
    ],
)
def test_a_predicate_that_does_not_parse_is_refused(raw, message):
    with pytest.raises(ValidationError, match=message):
        Predicate.model_validate(raw)


class _Type:
    def __init__(self, type_name: str, display: str):
        self.type_name, self.display = type_name, display


COLUMNS = {
    "status": _Type("text", "text"),
    "disabled": _Type("bool", "boolean"),
    "meta": _Type("jsonb", "jsonb"),
    "deletedAt": _Type("timestamp", "timestamp without time zone"),
}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"column": "kind", "equals": "x"}, "x.column: column 'kind' does not exist in t"),
        ({"column": "status.a", "equals": "x"}, "x.column: 'status.a' is a path into t.status"),
        ({"column": "status", "is": True}, "x.is: t.status is text, not a boolean"),
        ({"column": "disabled", "is": "future"}, "x.is: t.disabled is boolean, not a timestamp"),
        ({"column": "meta.until", "is": "future"}, "x.is: 'meta.until' is a value in JSON"),
    ],
)
def test_predicates_the_table_cannot_answer_are_named(raw, problem):
    found = predicate_problem("x", Predicate.model_validate(raw), "t", COLUMNS)
    assert found is not None and found.startswith(problem)


def test_predicates_the_table_can_answer_have_no_problem():
    for raw in (
        {"column": "disabled", "is": True},
        {"column": "meta.provider", "equals": "anonymous"},
        {"column": "deletedAt", "is": "set"},
    ):
        assert predicate_problem("x", Predicate.model_validate(raw), "t", COLUMNS) is None
    assert column_ref_problem("x", "meta.full_name", "t", COLUMNS) is None
