"""Addresses that must not be emailed again: unsubscribed, bounced or complained.

A suppression covers one loop (the person unsubscribed from that loop's emails) or every loop
(bounces, complaints, "all emails", the `suppress` command). The audience excludes a suppressed
address in both arms.

One mailbox is one address with surrounding blanks removed, compared in lower case, local part
included: the providers people sign up with treat `Ada@Example.com` and `ada@example.com` as
one mailbox. Sub-addresses (`ada+news@...`) and dots in Gmail local parts stay distinct: whether
they reach the same mailbox depends on the provider, and the app's users table names the
address a person signed up with.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from retention_pipeline.config.models import EMAIL_ADDRESS_PATTERN
from retention_pipeline.email.unsubscribe import verify_token

SUPPRESSION_REASONS = ("unsubscribed", "bounced", "complained")
KEPT_TABLE = "email_suppressions_kept"
"""Where `db uninstall` keeps the suppression list until the next `db upgrade` restores it."""


def normalize_address(address: str) -> str:
    """The mailbox `address` names, as the suppression list stores it; a one-line `ValueError`
    for anything that is not one email address."""
    mailbox = address.strip()
    if not EMAIL_ADDRESS_PATTERN.fullmatch(mailbox):
        raise ValueError(f"{address!r} is not an email address like ada@example.com")
    return mailbox.lower()


def suppress(
    connection: Connection,
    *,
    schema: str,
    email: str,
    reason: str,
    source: str,
    user_id: str | None = None,
    loop_name: str | None = None,
) -> bool:
    """Suppress `email` for `loop_name`, or for every loop when it is None, in the caller's
    transaction.

    Idempotent: suppressing an address again keeps its first reason, source and time, and only
    fills in a user id that was missing; a loop's suppression is not added next to one for every
    loop. Returns whether the address was newly suppressed.
    """
    if reason not in SUPPRESSION_REASONS:
        raise ValueError(
            f"unknown suppression reason {reason!r} (known: {', '.join(SUPPRESSION_REASONS)})"
        )
    address = normalize_address(email)
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    # `xmax = 0` holds for a row this statement inserted, not for one its DO UPDATE touched.
    inserted = connection.execute(
        text(f"""
            INSERT INTO {s}.email_suppressions AS sup (email, user_id, reason, source, loop_name)
            SELECT :email, :user_id, :reason, :source, :loop
            WHERE NOT EXISTS (SELECT FROM {s}.email_suppressions
                              WHERE email = :email AND loop_name IS NULL
                                AND CAST(:loop AS text) IS NOT NULL)
            ON CONFLICT (email, (coalesce(loop_name, '')))
            DO UPDATE SET user_id = coalesce(sup.user_id, EXCLUDED.user_id)
            RETURNING xmax = 0"""),
        {
            "email": address,
            "user_id": user_id,
            "reason": reason,
            "source": source,
            "loop": loop_name,
        },
    ).scalar_one_or_none()
    return bool(inserted)


def unsubscribe_with_token(connection: Connection, *, schema: str, secret: str, token: str) -> str:
    """Suppress the address the token's loop (any loop, for a token of every loop) last emailed
    its user, for that loop or every loop; return that address.

    Raises a one-line `ValueError` when the token does not verify with `secret`, and
    `NothingToUnsubscribe` when no such email exists.
    """
    user_id, loop_name = verify_token(secret, token)
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    email = connection.execute(
        text(f"""
            SELECT email FROM {s}.email_send_log
            WHERE user_id = :user_id AND email <> ''
              AND (loop_name = :loop OR CAST(:loop AS text) IS NULL)
            ORDER BY claimed_at DESC, id DESC
            LIMIT 1"""),
        {"user_id": str(user_id), "loop": loop_name},
    ).scalar_one_or_none()
    if email is None:
        never = f"loop {loop_name!r} never" if loop_name else "no loop ever"
        raise NothingToUnsubscribe(f"{never} emailed user {user_id!r}: nothing to unsubscribe")
    suppress(
        connection,
        schema=schema,
        email=email,
        reason="unsubscribed",
        source=f"unsubscribe_link:{loop_name or 'all'}",
        user_id=str(user_id),
        loop_name=loop_name,
    )
    return normalize_address(email)


class NothingToUnsubscribe(ValueError):
    """A valid token whose user the loop never emailed."""


def keep_for_reinstall(connection: Connection, schema: str) -> int:
    """Before the schema is dropped: copy the suppression list into a table of its own, in a
    schema that then takes the dropped one's name; returns how many rows it keeps. Keeps
    nothing, and leaves the schema to be dropped whole, when the list is empty."""
    preparer = connection.dialect.identifier_preparer
    s = preparer.quote_schema(schema)
    live, already_kept = (
        connection.execute(
            text("SELECT to_regclass(:table) IS NOT NULL"), {"table": f"{s}.{table}"}
        ).scalar_one()
        for table in ("email_suppressions", KEPT_TABLE)
    )
    if not live:  # uninstalled before: the schema holds the kept list alone, or nothing
        if not already_kept:
            return 0
        return int(connection.execute(text(f"SELECT count(*) FROM {s}.{KEPT_TABLE}")).scalar_one())
    kept = connection.execute(text(f"SELECT count(*) FROM {s}.email_suppressions")).scalar_one()
    if not kept:
        return 0
    holder = preparer.quote_schema(f"{schema}_uninstalling")
    connection.execute(text(f"CREATE SCHEMA {holder}"))
    # A plain copy, without the constraints and indexes whose names the next install reuses.
    connection.execute(
        text(f"CREATE TABLE {holder}.{KEPT_TABLE} AS SELECT * FROM {s}.email_suppressions")
    )
    connection.execute(text(f"DROP SCHEMA {s} CASCADE"))
    connection.execute(text(f"ALTER SCHEMA {holder} RENAME TO {s}"))
    return int(kept)


def restore_kept(connection: Connection, schema: str) -> int:
    """After the migrations: put back the suppression list a `db uninstall` kept, with the
    columns both tables have; returns how many rows came back."""
    preparer = connection.dialect.identifier_preparer
    s = preparer.quote_schema(schema)
    columns = connection.execute(
        text("""
            SELECT kept.column_name FROM information_schema.columns AS kept
            JOIN information_schema.columns AS live
              ON live.table_schema = kept.table_schema AND live.column_name = kept.column_name
             AND live.table_name = 'email_suppressions'
            WHERE kept.table_schema = :schema AND kept.table_name = :kept
            ORDER BY kept.ordinal_position"""),
        {"schema": schema, "kept": KEPT_TABLE},
    ).scalars()
    names = ", ".join(preparer.quote(column) for column in columns)
    if not names:
        return 0
    restored = connection.execute(
        text(f"""
            INSERT INTO {s}.email_suppressions ({names})
            SELECT {names} FROM {s}.{KEPT_TABLE}
            ON CONFLICT DO NOTHING""")
    ).rowcount
    connection.execute(text(f"DROP TABLE {s}.{KEPT_TABLE}"))
    return int(restored)
