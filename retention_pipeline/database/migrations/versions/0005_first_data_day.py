"""The first day with activity when the pipeline was installed: where the daily partitions start
when the configuration sets no `start_date`.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.tracking_state ADD COLUMN first_data_day date")
    op.execute(
        f"UPDATE {q}.tracking_state SET first_data_day = (SELECT min(day) FROM {q}.activity_daily)"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.tracking_state DROP COLUMN first_data_day")
