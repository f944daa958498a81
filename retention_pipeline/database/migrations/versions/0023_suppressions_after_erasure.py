"""An unsubscribe that arrives after its user was erased still suppresses their mailbox.

Erasure blanks the send log's addresses, and the unsubscribe link carries only the user id, so
such an unsubscribe found no address and was answered 404: the person, signing up again with
the same address (or restored), was emailed again. Erasure now keeps the SHA-256 of the mailbox
of each sent email it blanks (`email_send_log.erased_mailbox_sha256`), and the suppression list
can hold a mailbox by that hash alone (`email_suppressions.mailbox_sha256`, `email` NULL): the
audience and the batch start compare a mailbox's hash with those. Rows erased before this
revision have no hash to keep.

Revision ID: 0023
Revises: 0022
"""

from alembic import op

revision = "0023"
down_revision = "0022"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.email_send_log ADD COLUMN erased_mailbox_sha256 bytea")
    op.execute(f"ALTER TABLE {q}.email_suppressions ADD COLUMN mailbox_sha256 bytea")
    op.execute(f"ALTER TABLE {q}.email_suppressions ALTER COLUMN email DROP NOT NULL")
    op.execute(
        f"ALTER TABLE {q}.email_suppressions ADD CONSTRAINT email_suppressions_address_or_hash "
        "CHECK ((email IS NULL) <> (mailbox_sha256 IS NULL))"
    )
    op.execute(
        f"CREATE UNIQUE INDEX email_suppressions_hashed_per_scope "
        f"ON {q}.email_suppressions (mailbox_sha256, (coalesce(loop_name, ''))) "
        "WHERE mailbox_sha256 IS NOT NULL"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # Dropping a suppression, or a hash an unsubscribe would need, would email someone who asked
    # not to be.
    op.execute(f"""
        DO $$ BEGIN
            IF EXISTS (SELECT FROM {q}.email_suppressions WHERE email IS NULL)
               OR EXISTS (SELECT FROM {q}.email_send_log
                          WHERE erased_mailbox_sha256 IS NOT NULL) THEN
                RAISE EXCEPTION '%', 'the suppression list or the send log holds mailboxes known '
                    || 'only by their hash, which revision 0022 cannot keep: not downgraded';
            END IF;
        END $$""")
    op.execute(f"DROP INDEX {q}.email_suppressions_hashed_per_scope")
    op.execute(
        f"ALTER TABLE {q}.email_suppressions DROP CONSTRAINT email_suppressions_address_or_hash"
    )
    op.execute(f"ALTER TABLE {q}.email_suppressions ALTER COLUMN email SET NOT NULL")
    op.execute(f"ALTER TABLE {q}.email_suppressions DROP COLUMN mailbox_sha256")
    op.execute(f"ALTER TABLE {q}.email_send_log DROP COLUMN erased_mailbox_sha256")
