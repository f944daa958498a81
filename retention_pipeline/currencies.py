"""How many minor units a currency's major unit holds (ISO 4217): a hundred for most, one for
the yen and the other currencies without decimals, a thousand for the Kuwaiti dinar and the
others with three. Amounts are stored in minor units (`monthly_amount_cents`); the snapshot
scales amounts given in major units by it, and reports divide by it."""

from __future__ import annotations

ZERO_DECIMAL_CURRENCIES = (
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
)  # fmt: skip
THREE_DECIMAL_CURRENCIES = ("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND")


def minor_units(currency: str | None) -> int:
    """Minor units per major unit of `currency` (a hundred when it is unknown or unnamed)."""
    code = (currency or "").strip().upper()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 1
    if code in THREE_DECIMAL_CURRENCIES:
        return 1000
    return 100


def minor_units_sql(currency: str) -> str:
    """SQL for `minor_units` of the SQL expression `currency`."""
    code = f"upper(btrim(({currency})::text))"
    return (
        f"CASE WHEN {code} IN ({_literals(ZERO_DECIMAL_CURRENCIES)}) THEN 1"
        f" WHEN {code} IN ({_literals(THREE_DECIMAL_CURRENCIES)}) THEN 1000 ELSE 100 END"
    )


def _literals(codes: tuple[str, ...]) -> str:
    """Our own currency codes (three capital letters each) as SQL literals."""
    return ", ".join(f"'{code}'" for code in codes)
