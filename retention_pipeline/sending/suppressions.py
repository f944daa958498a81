"""Addresses that must not be emailed again: unsubscribed, bounced or complained.

The audience excludes every address in `email_suppressions`, in both arms.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from retention_pipeline.email.unsubscribe import verify_token

SUPPRESSION_REASONS = ("unsubscribed", "bounced", "complained")


def suppress(
    connection: Connection,
    *,
    schema: str,
    email: str,
    reason: str,
    source: str,
    user_id: str | None = None,
) -> bool:
    """Suppress `email` (compared lower-cased), in the caller's transaction.

    Idempotent: suppressing an address again keeps its first reason, source and time, and only
    fills in a user id that was missing. Returns whether the address was newly suppressed.
    """
    if reason not in SUPPRESSION_REASONS:
        raise ValueError(
            f"unknown suppression reason {reason!r} (known: {', '.join(SUPPRESSION_REASONS)})"
        )
    address = email.strip().lower()
    if not address:
        raise ValueError("cannot suppress an empty email address")
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    # `xmax = 0` holds for a row this statement inserted, not for one its DO UPDATE touched.
    inserted = connection.execute(
        text(f"""
            INSERT INTO {s}.email_suppressions AS sup (email, user_id, reason, source)
            VALUES (:email, :user_id, :reason, :source)
            ON CONFLICT (email) DO UPDATE SET user_id = coalesce(sup.user_id, EXCLUDED.user_id)
            RETURNING xmax = 0"""),
        {"email": address, "user_id": user_id, "reason": reason, "source": source},
    ).scalar_one()
    return bool(inserted)


def unsubscribe_with_token(connection: Connection, *, schema: str, secret: str, token: str) -> str:
    """Suppress the address the token's loop last emailed its user; return that address.

    Raises a one-line `ValueError` when the token does not verify with `secret`, or when the
    loop never emailed the user.
    """
    user_id, loop_name = verify_token(secret, token)
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    email = connection.execute(
        text(f"""
            SELECT email FROM {s}.email_send_log
            WHERE user_id = :user_id AND loop_name = :loop
            ORDER BY claimed_at DESC, id DESC
            LIMIT 1"""),
        {"user_id": str(user_id), "loop": loop_name},
    ).scalar_one_or_none()
    if email is None:
        raise ValueError(
            f"loop {loop_name!r} never emailed user {user_id!r}: nothing to unsubscribe"
        )
    suppress(
        connection,
        schema=schema,
        email=email,
        reason="unsubscribed",
        source=f"unsubscribe_link:{loop_name}",
        user_id=str(user_id),
    )
    return email.strip().lower()
