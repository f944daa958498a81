"""Which erasures the app's delete trigger saw, and which a read of the users table found: a
drain forgets the latter once the users table has and keeps the user again (an exclusion that
ended, a mapping fixed after a send batch or a reinstall recorded them), and always erases the
former, whatever row takes the id since.

Revision ID: 0030
Revises: 0029
"""

from alembic import op

revision = "0030"
down_revision = "0029"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # Every erasure recorded before is kept to be erased, as before this revision.
    op.execute(
        f"ALTER TABLE {q}.erased_users ADD COLUMN seen_deleted boolean NOT NULL DEFAULT true"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.erased_users DROP COLUMN seen_deleted")
