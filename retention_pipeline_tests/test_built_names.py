"""Names that are built: first and last name joined by a space (blanks skipped, all blank is no
name), or a path into a JSON column (`raw_user_meta_data.full_name`), as Supabase keeps it; the
email and timezone may be JSON paths too. The built name reaches the email's greeting."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.cli import main
from retention_pipeline.config import ConfigError, parse_config
from retention_pipeline.defs.audience import AUDIENCE
from retention_pipeline.defs.segments import SEGMENTS, SNAPSHOT
from retention_pipeline.resources.app_database import AppDatabase
from retention_pipeline.resources.email import OutboxEmail
from retention_pipeline_tests.helpers import (
    SHIPPED_DOCUMENT,
    demo_until_yesterday,
    shipped_asset,
    shipped_job,
    write_config,
)

# Every third user has a blank first name, every seventh no name at all; the old `name` column is
# emptied, so only the built name can reach the email. The metadata's email is another mailbox.
NAME_COLUMNS = """
    ALTER TABLE users
        ADD COLUMN first_name text, ADD COLUMN last_name text,
        ADD COLUMN raw_user_meta_data jsonb NOT NULL DEFAULT '{}';
    UPDATE users SET
        first_name = CASE WHEN id % 7 = 0 THEN NULL
                          WHEN id % 3 = 0 THEN '  ' ELSE 'Ada' || id END,
        last_name = CASE WHEN id % 7 = 0 THEN ' ' ELSE 'Lovelace' END,
        raw_user_meta_data = jsonb_build_object(
            'full_name', CASE WHEN id % 7 = 0 THEN NULL
                              WHEN id % 3 = 0 THEN 'Lovelace' ELSE 'Ada' || id || ' Lovelace' END,
            'email', 'meta.' || email,
            'tz', timezone),
        name = 'Wrong Name'"""


def expected_name(user_id: int) -> str | None:
    if user_id % 7 == 0:
        return None
    return "Lovelace" if user_id % 3 == 0 else f"Ada{user_id} Lovelace"


NAME_MAPPINGS = {
    "first and last": {"name": ["first_name", "last_name"]},
    "JSON paths": {
        "name": "raw_user_meta_data.full_name",
        "email": "raw_user_meta_data.email",
        "timezone": "raw_user_meta_data.tz",
    },
}


@pytest.mark.parametrize("mapping", list(NAME_MAPPINGS))
def test_a_built_name_reaches_the_greeting(create_database, tmp_path: Path, mapping: str):
    url = create_database()
    engine, day = demo_until_yesterday(url)
    with engine.begin() as connection:
        connection.execute(text(NAME_COLUMNS))
    tables: dict[str, Any] = copy.deepcopy(SHIPPED_DOCUMENT["database"]["tables"])
    tables["users"]["columns"].update(NAME_MAPPINGS[mapping])
    resources = {
        "app_database": AppDatabase(config_path=str(write_config(tmp_path, url, tables=tables))),
        "email": OutboxEmail(directory=str(tmp_path / "outbox"), from_address="a@acme.test"),
    }
    partition = day.isoformat()
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [shipped_asset(SNAPSHOT), shipped_asset(SEGMENTS), shipped_asset(AUDIENCE)],
            partition_key=partition,
            instance=instance,
            resources=resources,
        ).success
        assert (
            shipped_job("send_re_engagement")
            .execute_in_process(
                partition_key=f"{partition}|0", instance=instance, resources=resources
            )
            .success
        )
    with engine.connect() as connection:
        names = dict(
            connection.execute(
                text("""SELECT user_id, name FROM retention.user_activity_snapshot
                        WHERE partition_date = :day"""),
                {"day": day},
            ).all()
        )
        sent = connection.execute(
            text(
                "SELECT user_id, email, body_text FROM retention.email_send_log "
                "WHERE status = 'sent'"
            )
        ).all()
        addresses = dict(connection.execute(text("SELECT id::text, email FROM users")).all())
    engine.dispose()
    assert names == {user: expected_name(int(user)) for user in names}
    assert sent
    greeted = {int(user) % 7 == 0 or int(user) % 3 == 0 for user, _, _ in sent}
    assert greeted == {True, False}  # blank and missing names among the emailed
    for user, address, body in sent:
        name = expected_name(int(user))
        assert f"Hi {name.split()[0] if name else 'there'}," in body
        meta = mapping == "JSON paths"
        assert address == (f"meta.{addresses[user]}" if meta else addresses[user])


def test_each_bad_name_email_or_timezone_is_one_line_naming_it(
    app_database_url, tmp_path: Path, capsys
):
    engine = create_engine(app_database_url)
    with engine.begin() as connection:
        connection.execute(text(NAME_COLUMNS))
    engine.dispose()
    tables: dict[str, Any] = copy.deepcopy(SHIPPED_DOCUMENT["database"]["tables"])
    tables["users"]["columns"].update(
        name=["first_name", "surname"],
        email="email.address",
        timezone="raw_user_meta_data.tz",  # fine: a path into jsonb
    )
    config = write_config(tmp_path, app_database_url, tables=tables)

    assert main(["--config", str(config), "check"]) == 2

    assert capsys.readouterr().err.splitlines() == [
        "error: database.tables.users.columns.email: 'email.address' is a path into "
        "public.users.email, which is text, not json or jsonb",
        "error: database.tables.users.columns.name.1: column 'surname' does not exist in "
        "public.users (it has: created_at, email, first_name, id, last_name, name, "
        "raw_user_meta_data, timezone)",
    ]
    tables["users"]["columns"].update(name="first_name.given", email="email")
    config = write_config(tmp_path, app_database_url, tables=tables)
    assert main(["--config", str(config), "check"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: database.tables.users.columns.name: 'first_name.given' is a path into "
        "public.users.first_name, which is text, not json or jsonb",
    ]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("id", "raw_user_meta_data.sub", "columns.id: 'raw_user_meta_data.sub' is a JSON path"),
        ("created_at", "meta.at", "columns.created_at: 'meta.at' is a JSON path"),
        ("name", [], "columns.name: [] is not a column, a JSON path"),
        ("name", ["first_name", 3], "columns.name: ['first_name', 3] is not a column"),
        ("name", "meta.full name", "columns.name: 'meta.full name': 'full name' is not a JSON"),
    ],
)
def test_a_bad_user_column_value_is_one_line_naming_its_key(key, value, expected):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["tables"]["users"]["columns"][key] = value
    with pytest.raises(ConfigError) as raised:
        parse_config(document, environ={})
    message = str(raised.value)
    assert "\n" not in message
    assert f"configuration: database.tables.users.{expected}" in message
