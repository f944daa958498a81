"""What counts as an email address, and which mailbox it names: one rule, in Python and in SQL.
What is stored and compared is the mailbox PostgreSQL makes (`mailbox_sql`): Python lower-cases
a few letters otherwise (a dotted capital I), so Python's `mailbox_of` is for what people read.

One mailbox is one address with surrounding blanks removed, compared in lower case, local part
included: the providers people sign up with treat `Ada@Example.com` and `ada@example.com` as
one mailbox. Sub-addresses (`ada+news@...`) and dots in Gmail local parts stay distinct: whether
they reach the same mailbox depends on the provider, and the app's users table names the
address a person signed up with.
"""

from __future__ import annotations

import re

# A local part, "@", and a domain of at least two labels; no spaces, brackets or separators.
# PostgreSQL's regular expressions read it alike (`\s` and escapes keep their meaning inside
# brackets there), so the configuration, the suppression list and the audience agree.
EMAIL_ADDRESS_REGEX = r'[^\s@<>,;:()"\[\]]+@[^\s@<>,;:()"\[\].]+(\.[^\s@<>,;:()"\[\].]+)+'
EMAIL_ADDRESS_PATTERN = re.compile(EMAIL_ADDRESS_REGEX)
EMAIL_ADDRESS_SQL_PATTERN = f"^{EMAIL_ADDRESS_REGEX}$"
"""For `~` in SQL, bound as a parameter: the whole value must be one address."""
BLANKS = " \t\n\r\x0b\x0c"
"""What is trimmed around an address, in Python and in SQL alike."""
_BLANKS_SQL = "E' \\t\\n\\r\\x0b\\x0c'"  # BLANKS as a PostgreSQL escape string


def normalize_address(address: str) -> str:
    """The mailbox `address` names, as people read it; a one-line `ValueError` for anything that
    is not one email address."""
    if not EMAIL_ADDRESS_PATTERN.fullmatch(address.strip(BLANKS)):
        raise ValueError(f"{address!r} is not an email address like ada@example.com")
    return mailbox_of(address)


def mailbox_of(address: str) -> str:
    """The mailbox of an address something was already sent to, unchecked: an email that went
    out (to an address an older rule took, say) must stay suppressible whatever the rule is now."""
    return address.strip(BLANKS).lower()


def trimmed_address_sql(address: str) -> str:
    """SQL for the SQL expression `address` without the blanks around it (spaces, tabs, line
    breaks): the address an email goes to."""
    return f"btrim({address}, {_BLANKS_SQL})"


def mailbox_sql(address: str) -> str:
    """SQL for the mailbox the SQL expression `address` names, as `normalize_address` has it:
    trimmed, lower-cased."""
    return f"lower({trimmed_address_sql(address)})"


def sha256_sql(mailbox: str) -> str:
    """SQL for the SHA-256 of the SQL expression `mailbox` (a mailbox, `mailbox_sql`): how the
    suppression list holds the mailbox of a user erased before they unsubscribed."""
    return f"sha256(convert_to({mailbox}, 'UTF8'))"
