"""Minor units per currency: the snapshot's SQL and the reports' Python agree, and an amount in
major units is shown back as it was given."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from retention_pipeline.currencies import (
    THREE_DECIMAL_CURRENCIES,
    ZERO_DECIMAL_CURRENCIES,
    minor_units,
    minor_units_sql,
)
from retention_pipeline.outcomes.performance import _money

CODES = [*ZERO_DECIMAL_CURRENCIES, *THREE_DECIMAL_CURRENCIES, "EUR", "usd", " jpy ", "", None]


def test_postgresql_and_python_agree_on_every_currency(postgres_server_url: str) -> None:
    engine = create_engine(postgres_server_url)
    with engine.connect() as connection:
        in_sql = [
            connection.execute(
                text(f"SELECT {minor_units_sql('CAST(:code AS text)')}"), {"code": code}
            ).scalar_one()
            for code in CODES
        ]
    engine.dispose()

    assert in_sql == [minor_units(code) for code in CODES]
    assert [minor_units(code) for code in ("JPY", " jpy ", "KWD", "EUR", None)] == [
        1,
        1,
        1000,
        100,
        100,
    ]


def test_a_difference_is_shown_in_major_units_of_its_currency() -> None:
    assert _money({"JPY": 1500.0, "KWD": 2500.0, "EUR": -1200.0, None: 300.0}) == (
        "+1,500 JPY, +2 KWD, -12 EUR, +3"
    )
