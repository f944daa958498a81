"""One address rule: what `suppress`, the configuration and the audience (in SQL) take for an
email address is the same set."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.recipients.addresses import (
    EMAIL_ADDRESS_PATTERN,
    EMAIL_ADDRESS_SQL_PATTERN,
    mailbox_sql,
    normalize_address,
)

ADDRESSES = [
    "ada@example.com",
    "Ada.Lovelace+news@Mail.Example.co.uk",
    "o'brien@example.ie",
    "ada@example",
    "ada@.example.com",
    "ada@example..com",
    "ada lovelace@example.com",
    "ada@exa mple.com",
    "a@b@example.com",
    "<ada@example.com>",
    "Ada <ada@example.com>",
    '"ada"@example.com',
    "ada,bob@example.com",
    "ada;bob@example.com",
    "ada@[192.0.2.1]",
    "@example.com",
    "ada@",
    "",
]


def test_python_and_postgresql_take_the_same_strings_for_addresses(postgres_server_url):
    engine = create_engine(postgres_server_url)
    with engine.connect() as connection:
        in_sql = connection.execute(
            text("SELECT a ~ :pattern FROM unnest(CAST(:addresses AS text[])) AS a"),
            {"pattern": EMAIL_ADDRESS_SQL_PATTERN, "addresses": ADDRESSES},
        ).scalars()
        assert dict(zip(ADDRESSES, in_sql, strict=True)) == {
            address: EMAIL_ADDRESS_PATTERN.fullmatch(address) is not None for address in ADDRESSES
        }
    engine.dispose()
    assert sum(EMAIL_ADDRESS_PATTERN.fullmatch(a) is not None for a in ADDRESSES) == 3


@pytest.mark.parametrize("address", [" Ada@Example.COM\t", "ada@example.com", "ADA@EXAMPLE.COM\n"])
def test_one_mailbox_in_python_and_in_sql(postgres_server_url, address):
    engine = create_engine(postgres_server_url)
    with engine.connect() as connection:
        in_sql = connection.execute(
            text(f"SELECT {mailbox_sql('CAST(:address AS text)')}"), {"address": address}
        ).scalar_one()
    engine.dispose()
    assert in_sql == normalize_address(address) == "ada@example.com"


def test_normalize_address_refuses_what_is_not_one_address_in_one_line():
    with pytest.raises(ValueError, match=r"^'ada@example' is not an email address like"):
        normalize_address("ada@example")
