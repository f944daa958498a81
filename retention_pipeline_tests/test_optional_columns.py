"""Every optional column of the mapping may be missing from the app: a day materializes (the
snapshot and the segments, in a real Dagster run) for each combination of omitted columns."""

from __future__ import annotations

import itertools
from datetime import date

import dagster as dg
import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.config.models import OPTIONAL_COLUMNS
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import make_config, shipped_asset, write_config

user_activity_snapshot = shipped_asset(SNAPSHOT)
engagement_segments = shipped_asset(SEGMENTS)

DAY = date(2026, 11, 20)
OPTIONAL = [(table, key) for table, keys in OPTIONAL_COLUMNS.items() for key in keys]
# Each app column and its type; the optional ones are left out of the table and the mapping.
COLUMNS = {
    "users": {
        "id": "bigint PRIMARY KEY",
        "email": "text",
        "name": "text",
        "timezone": "text",
        "created_at": "timestamptz",
    },
    "events": {
        "user_id": "bigint",
        "name": "text",
        "properties": "jsonb",
        "created_at": "timestamptz",
    },
    "sessions": {"user_id": "bigint", "created_at": "timestamptz"},
    "subscriptions": {
        "user_id": "bigint",
        "status": "text",
        "plan": "text",
        "amount_cents": "integer",
        "billing_interval": "text",
        "currency": "text",
        "updated_at": "timestamptz",
    },
}
# Values of every column, per row; omitted columns' values are dropped.
ROWS = {
    "users": [
        {
            "id": 1,
            "email": "a@example.com",
            "name": "Ada",
            "timezone": "Europe/Paris",
            "created_at": "2026-09-01",
        },
        {
            "id": 2,
            "email": "b@example.com",
            "name": "Bo",
            "timezone": None,
            "created_at": "2026-09-01",
        },
    ],
    "events": [
        {
            "user_id": 1,
            "name": "report.exported",
            "properties": "{}",
            "created_at": "2026-11-20 10:00Z",
        },
    ],
    "sessions": [
        {"user_id": 1, "created_at": "2026-11-20 09:00Z"},
        {"user_id": 2, "created_at": "2026-11-09 09:00Z"},
    ],
    "subscriptions": [
        {
            "user_id": 1,
            "status": "canceled",
            "plan": "starter",
            "amount_cents": 900,
            "billing_interval": "month",
            "currency": "usd",
            "updated_at": "2026-10-01",
        },
        {
            "user_id": 1,
            "status": "active",
            "plan": "pro",
            "amount_cents": 24000,
            "billing_interval": "year",
            "currency": "usd",
            "updated_at": "2026-11-01",
        },
    ],
}
COMBINATIONS = [
    frozenset(omitted)
    for size in range(len(OPTIONAL) + 1)
    for omitted in itertools.combinations(OPTIONAL, size)
]


def _label(omitted: frozenset) -> str:
    return "+".join(sorted(f"{table}.{key}" for table, key in omitted)) or "none"


@pytest.fixture(scope="module")
def database(create_database):
    url = create_database()
    engine = create_engine(url)
    yield url, engine
    engine.dispose()


@pytest.mark.parametrize("omitted", COMBINATIONS, ids=[_label(c) for c in COMBINATIONS])
def test_a_day_materializes_without_optional_columns(database, tmp_path, omitted):
    url, engine = database
    number = COMBINATIONS.index(omitted)
    app_schema, pipeline_schema = f"app_{number}", f"retention_{number}"
    tables = {}
    with engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {app_schema}"))
        for table, types in COLUMNS.items():
            kept = [key for key in types if (table, key) not in omitted]
            definition = ", ".join(f"{key} {types[key]}" for key in kept)
            connection.execute(text(f"CREATE TABLE {app_schema}.{table} ({definition})"))
            for row in ROWS[table]:
                connection.execute(
                    text(
                        f"INSERT INTO {app_schema}.{table} ({', '.join(kept)}) "
                        f"VALUES ({', '.join(f':{key}' for key in kept)})"
                    ),
                    {key: row[key] for key in kept},
                )
            columns = {key: key for key in kept if key != "id" or table == "users"}
            tables[table] = {"table": table, "schema": app_schema, "columns": columns}
    # Each case installs beside the others in the module's database.
    install(engine, make_config(url, schema=pipeline_schema, tables=tables), second_install=True)
    config_path = write_config(tmp_path, url, schema=pipeline_schema, tables=tables)

    result = dg.materialize(
        [user_activity_snapshot, engagement_segments],
        partition_key=DAY.isoformat(),
        resources={"app_database": AppDatabase(config_path=str(config_path))},
    )

    assert result.success
    (segments,) = result.asset_materializations_for_node("retention__engagement_segments")
    assert segments.metadata["re_engagement/active"].value == 1
    assert segments.metadata["re_engagement/dormant"].value == 1
    assert all(check.passed for check in result.get_asset_check_evaluations())
    with engine.connect() as connection:
        ada = connection.execute(
            text(
                f"SELECT name, timezone, subscription_status, monthly_amount_cents "
                f"FROM {pipeline_schema}.user_activity_snapshot WHERE user_id = '1'"
            )
        ).one()
    assert ada.name == (None if ("users", "name") in omitted else "Ada")
    assert ada.timezone == (None if ("users", "timezone") in omitted else "Europe/Paris")
    assert ada.subscription_status == "active"
    # Without an interval column, amounts are taken as monthly.
    assert ada.monthly_amount_cents == (
        24000 if ("subscriptions", "billing_interval") in omitted else 2000
    )
