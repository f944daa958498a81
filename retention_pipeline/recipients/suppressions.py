"""Addresses that must not be emailed again: unsubscribed, bounced or complained.

A suppression covers one loop (the person unsubscribed from that loop's emails) or every loop
(bounces, complaints, "all emails", the `suppress` command). The audience excludes a suppressed
address in both arms, and a user who unsubscribed or complained at any address
(`personal_suppression_sql`).

The list holds mailboxes as PostgreSQL makes them (`recipients.addresses.mailbox_sql`), and, for
users erased before they unsubscribed, the SHA-256 of a mailbox alone (`email` NULL): every
reader of the list compares a mailbox's hash with those (`suppressed_by_hash_sql`).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from retention_pipeline.recipients.addresses import mailbox_of, mailbox_sql, sha256_sql

SUPPRESSION_REASONS = ("unsubscribed", "bounced", "complained")
# What the person asked (not only the mailbox they were emailed at): they are held back at any
# address they have since. A bounce is the mailbox's: a new address may work.
PERSONAL_REASONS = ("unsubscribed", "complained")


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
    """Suppress the mailbox of `email` for `loop_name`, or for every loop when it is None, in
    the caller's transaction. The address is not judged here: one the pipeline emailed must be
    suppressible whatever it looks like; a person's input is checked first (`normalize_address`).

    Idempotent: suppressing an address again keeps its first time, fills in a user id that was
    missing, and keeps its first reason and source, but for a person's own request (an
    unsubscribe, a complaint, naming their user id) over a bounce: that holds them back at any
    address they change to (`personal_suppression_sql`), which a bounce does not. A loop's
    suppression is not added next to one for every loop that already holds as much. Returns
    whether the address was newly suppressed.
    """
    if reason not in SUPPRESSION_REASONS:
        raise ValueError(
            f"unknown suppression reason {reason!r} (known: {', '.join(SUPPRESSION_REASONS)})"
        )
    if not mailbox_of(email):
        raise ValueError("an empty address cannot be suppressed")
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    # The mailbox is made by PostgreSQL, as the audience and the batch start make the mailboxes
    # they compare with it: Python lower-cases a few letters otherwise (a dotted capital I).
    mailbox = mailbox_sql("CAST(:email AS text)")
    personal = ", ".join(f"'{personal_reason}'" for personal_reason in PERSONAL_REASONS)
    # A person's request (it names them) over a bounce: the reason the list gives becomes theirs.
    over_a_bounce = (
        f"sup.reason NOT IN ({personal}) AND EXCLUDED.reason IN ({personal}) "
        "AND EXCLUDED.user_id IS NOT NULL"
    )
    # `xmax = 0` holds for a row this statement inserted, not for one its DO UPDATE touched.
    inserted = connection.execute(
        text(f"""
            INSERT INTO {s}.email_suppressions AS sup (email, user_id, reason, source, loop_name)
            SELECT {mailbox}, :user_id, :reason, :source, :loop
            WHERE NOT EXISTS (
                SELECT FROM {s}.email_suppressions AS everywhere
                WHERE everywhere.email = {mailbox} AND everywhere.loop_name IS NULL
                  AND CAST(:loop AS text) IS NOT NULL
                  AND (CAST(:user_id AS text) IS NULL OR CAST(:reason AS text) NOT IN ({personal})
                       OR (everywhere.reason IN ({personal})
                           AND everywhere.user_id = CAST(:user_id AS text))))
            ON CONFLICT (email, (coalesce(loop_name, '')))
            DO UPDATE SET user_id = CASE WHEN {over_a_bounce} THEN EXCLUDED.user_id
                                         ELSE coalesce(sup.user_id, EXCLUDED.user_id) END,
                          reason = CASE WHEN {over_a_bounce} THEN EXCLUDED.reason
                                        ELSE sup.reason END,
                          source = CASE WHEN {over_a_bounce} THEN EXCLUDED.source
                                        ELSE sup.source END
            RETURNING xmax = 0"""),
        {
            "email": email,
            "user_id": user_id,
            "reason": reason,
            "source": source,
            "loop": loop_name,
        },
    ).scalar_one_or_none()
    return bool(inserted)


def covers_loop_sql(alias: str, loop_name: str, loops_configured: str | None = None) -> str:
    """SQL: whether the list's row `alias` covers the loop `loop_name` (an SQL expression): it
    covers every loop, or that one. With `loops_configured` (an SQL text[] of the loops the
    configuration has), a row of a loop it no longer has covers every loop: a loop renamed
    would otherwise email again everyone who unsubscribed from it under its old name."""
    others = f" OR NOT ({alias}.loop_name = ANY({loops_configured}))" if loops_configured else ""
    return f"({alias}.loop_name IS NULL OR {alias}.loop_name = {loop_name}{others})"


def suppressed_by_hash_sql(
    schema_sql: str, mailbox: str, loop_name: str, loops_configured: str | None = None
) -> str:
    """SQL: whether the mailbox `mailbox` (an SQL expression) is suppressed by its hash for the
    loop `loop_name` (`covers_loop_sql`): a probe of the hashes' own index."""
    return f"""EXISTS (SELECT FROM {schema_sql}.email_suppressions AS hashed
                       WHERE hashed.mailbox_sha256 = {sha256_sql(mailbox)}
                         AND {covers_loop_sql("hashed", loop_name, loops_configured)})"""


def _suppression_reason_sql(
    schema_sql: str, alias: str, match: str, loop_name: str, loops_configured: str | None
) -> str:
    """SQL: the reason (NULL for none) of the list's row `alias` matching `match` that covers
    the loop `loop_name` (`covers_loop_sql`), an every-loop row first."""
    return f"""(SELECT {alias}.reason FROM {schema_sql}.email_suppressions AS {alias}
                WHERE {match} AND {covers_loop_sql(alias, loop_name, loops_configured)}
                ORDER BY {alias}.loop_name NULLS FIRST LIMIT 1)"""


def mailbox_suppression_reason_sql(
    schema_sql: str, mailbox: str, loop_name: str, loops_configured: str | None = None
) -> str:
    """SQL: the reason (NULL for none) the mailbox `mailbox` is suppressed by its address for
    the loop `loop_name` (`covers_loop_sql`)."""
    return _suppression_reason_sql(
        schema_sql, "sup", f"sup.email = {mailbox}", loop_name, loops_configured
    )


def hashed_suppression_reason_sql(
    schema_sql: str, mailbox: str, loop_name: str, loops_configured: str | None = None
) -> str:
    """SQL: the reason (NULL for none) the mailbox `mailbox` is suppressed by its hash for the
    loop `loop_name` (`covers_loop_sql`), as `suppressed_by_hash_sql` finds it."""
    return _suppression_reason_sql(
        schema_sql,
        "hashed",
        f"hashed.mailbox_sha256 = {sha256_sql(mailbox)}",
        loop_name,
        loops_configured,
    )


def personal_suppression_sql(
    schema_sql: str, user_id: str, loop_name: str, loops_configured: str | None = None
) -> str:
    """SQL: the reason (NULL for none) the user `user_id` asked not to be emailed by the loop
    `loop_name` (`covers_loop_sql`), whatever address they were emailed at: a probe of the
    list's user index."""
    reasons = ", ".join(f"'{reason}'" for reason in PERSONAL_REASONS)
    return _suppression_reason_sql(
        schema_sql,
        "personal",
        f"personal.user_id = {user_id} AND personal.reason IN ({reasons})",
        loop_name,
        loops_configured,
    )


def any_suppressed_by_hash(connection: Connection, schema: str) -> bool:
    """Whether the list holds any mailbox by its hash alone: where none does, a reader of many
    mailboxes need not hash them."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return connection.execute(
        text(f"SELECT EXISTS (SELECT FROM {s}.email_suppressions WHERE email IS NULL)")
    ).scalar_one()


def unsubscribe_user(
    connection: Connection, *, schema: str, user_id: str, loop_name: str | None
) -> str | None:
    """What a verified unsubscribe token asks: suppress the address `loop_name` (any loop, when
    None) last emailed `user_id`, for that loop or every loop; return that address. A user
    erased since has no address left: their mailbox is suppressed by the hash erasure kept
    (`suppress_hashed_mailbox`), and None is returned. Raises `NothingToUnsubscribe` when no
    such email exists."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    emailed = connection.execute(
        text(f"""
            SELECT email, erased_mailbox_sha256 FROM {s}.email_send_log
            WHERE user_id = :user_id
              AND (email <> '' OR erased_mailbox_sha256 IS NOT NULL)
              AND (loop_name = :loop OR CAST(:loop AS text) IS NULL)
            ORDER BY claimed_at DESC, id DESC
            LIMIT 1"""),
        {"user_id": user_id, "loop": loop_name},
    ).one_or_none()
    if emailed is None:
        never = f"loop {loop_name!r} never" if loop_name else "no loop ever"
        raise NothingToUnsubscribe(f"{never} emailed user {user_id!r}: nothing to unsubscribe")
    source = f"unsubscribe_link:{loop_name or 'all'}"
    if not emailed.email:
        suppress_hashed_mailbox(
            connection,
            schema=schema,
            mailbox_sha256=emailed.erased_mailbox_sha256,
            reason="unsubscribed",
            source=source,
            loop_name=loop_name,
        )
        return None
    suppress(
        connection,
        schema=schema,
        email=emailed.email,
        reason="unsubscribed",
        source=source,
        user_id=user_id,
        loop_name=loop_name,
    )
    return mailbox_of(emailed.email)


def suppress_hashed_mailbox(
    connection: Connection,
    *,
    schema: str,
    mailbox_sha256: bytes,
    reason: str,
    source: str,
    loop_name: str | None,
) -> bool:
    """Suppress, for `reason`, the mailbox of an erased user by its SHA-256, for `loop_name` or
    every loop, in the caller's transaction; as `suppress`, idempotent, and a loop's suppression
    is not added next to one for every loop. Returns whether it was newly suppressed."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    inserted = connection.execute(
        text(f"""
            INSERT INTO {s}.email_suppressions (mailbox_sha256, reason, source, loop_name)
            SELECT :hash, :reason, :source, :loop
            WHERE NOT EXISTS (SELECT FROM {s}.email_suppressions
                              WHERE mailbox_sha256 = :hash AND loop_name IS NULL
                                AND CAST(:loop AS text) IS NOT NULL)
            ON CONFLICT (mailbox_sha256, (coalesce(loop_name, '')))
                WHERE mailbox_sha256 IS NOT NULL
            DO NOTHING
            RETURNING 1"""),
        {"hash": mailbox_sha256, "reason": reason, "source": source, "loop": loop_name},
    ).scalar_one_or_none()
    return inserted is not None


class NothingToUnsubscribe(ValueError):
    """A valid token whose user the loop never emailed."""
