"""Looking up an app user by the text id the pipeline stores (`ResolvedTable.id_equals_sql`):
the same answer as comparing `id::text`, through the app's key index, and no error for text
that cannot be an id. Erasure runs this lookup for every send batch, so a scan of the users
table there costs seconds per 100 emails at a million users."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.database.app_tables import resolve_app_tables
from retention_pipeline.tracking.erasure import record_users_gone
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT, make_config

ACCOUNTS = 2999
# Text the pipeline may hold for a user: ids that exist, ids that do not, and text no id of the
# column's type prints as (leading zeros, upper case, out of range, not a number at all).
CASES = {
    "integer": (
        "n",
        ["1", "2999", "3001", "-4", "007", "1e3", "abc", "", "99999999999999999999", " 12"],
        {"1", "2999"},
    ),
    "bigint": (
        "n * 1000000000000",
        ["1000000000000", "9223372036854775807", "9223372036854775808", "12x", "2"],
        {"1000000000000"},
    ),
    "smallint": ("n", ["1", "40000", "2999", "0x10"], {"1", "2999"}),
    "uuid": (
        "md5(n::text)::uuid",
        [
            "c4ca4238-a0b9-2382-0dcc-509a6f75849b",  # md5('1')
            "C4CA4238-A0B9-2382-0DCC-509A6F75849B",
            "c4ca4238a0b923820dcc509a6f75849b",
            "not-a-uuid",
            "00000000-0000-0000-0000-000000000000",
        ],
        {"c4ca4238-a0b9-2382-0dcc-509a6f75849b"},
    ),
    "text": ("'usr_' || n", ["usr_1", "usr_2999", "USR_1", "usr_9999"], {"usr_1", "usr_2999"}),
    "varchar(40)": ("'usr_' || n", ["usr_1", "usr_01"], {"usr_1"}),
}


def _app(url: str, id_type: str, id_value: str) -> None:
    """An app whose users have ids of `id_type` (`id_value` of n), for n up to 2999."""
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(f"""
                CREATE TABLE accounts (
                    id {id_type} PRIMARY KEY, email text, name text, timezone text,
                    created_at timestamptz NOT NULL DEFAULT now());
                CREATE TABLE events (
                    user_id {id_type}, name text, properties jsonb, created_at timestamptz);
                CREATE TABLE sessions (user_id {id_type}, created_at timestamptz);
                INSERT INTO accounts (id, email)
                SELECT {id_value}, 'a' || n || '@northwind-notes.com'
                FROM generate_series(1, {ACCOUNTS}) AS n;
                ANALYZE accounts""")
        )
    engine.dispose()


def _config(url: str):
    tables = {
        name: mapping
        for name, mapping in SHIPPED_DOCUMENT["database"]["tables"].items()
        if name != "subscriptions"
    }
    tables["users"] = {**tables["users"], "table": "accounts"}
    return make_config(url, tables=tables)


@pytest.mark.parametrize("id_type", CASES)
def test_a_text_id_finds_its_user_as_id_text_does_through_the_key_index(create_database, id_type):
    id_value, probes, found = CASES[id_type]
    url = create_database()
    _app(url, id_type, id_value)
    config = _config(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        users = resolve_app_tables(connection, config.database.tables)["users"]
        matches = users.id_equals_sql(
            "u", "probe.id", connection.dialect.identifier_preparer, probe_key=True
        )
        rows = connection.execute(
            text(f"""
                SELECT probe.id,
                       EXISTS (SELECT FROM accounts AS u WHERE {matches}),
                       EXISTS (SELECT FROM accounts AS u WHERE u.id::text = probe.id)
                FROM unnest(CAST(:probes AS text[])) AS probe (id)"""),
            {"probes": probes},
        ).all()
        assert {probe for probe, matched, _ in rows if matched} == found
        assert all(matched == as_text for _, matched, as_text in rows)

        connection.execute(text("SET LOCAL enable_seqscan = off"))
        plan = connection.execute(
            text(f"""
                EXPLAIN SELECT probe.id FROM (VALUES (CAST(:probe AS text))) AS probe (id)
                WHERE EXISTS (SELECT FROM accounts AS u WHERE {matches})"""),
            {"probe": probes[0]},
        ).scalars()
        plan_text = "\n".join(plan)
        # Probing the key, not reading every entry of it with a filter.
        assert "accounts_pkey" in plan_text and "Index Cond: (id = " in plan_text, plan_text
    engine.dispose()


@pytest.mark.parametrize("probe_key", [True, False])
def test_users_gone_are_recorded_for_text_no_integer_id_prints_as(create_database, probe_key):
    url = create_database()
    _app(url, "integer", "n")
    config = _config(url)
    engine = create_engine(url)
    install(engine, config)
    with engine.begin() as connection:
        recorded = record_users_gone(
            connection,
            config,
            "SELECT unnest(CAST(:ids AS text[])) AS user_id",
            {"ids": ["1", "5000", "007", "99999999999999999999", "abc"]},
            probe_key=probe_key,
        )
        schema = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
        erased = set(
            connection.execute(text(f"SELECT user_id FROM {schema}.erased_users")).scalars()
        )
    assert recorded == 4
    assert erased == {"5000", "007", "99999999999999999999", "abc"}
    engine.dispose()
