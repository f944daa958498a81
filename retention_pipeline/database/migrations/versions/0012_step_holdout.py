"""A third arm: `withheld`, a treated user held back from one later step of an episode by the
loop's `step_holdout`, so that step's lift is a randomized comparison of its own.

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"

# The tables whose rows carry an assignment's arm (their CHECK constraints keep PostgreSQL's
# default names).
TABLES = ("reengagement_audience", "reengagement_outcomes")


def _allow_arms(q: str, arms: tuple[str, ...]) -> None:
    allowed = ", ".join(f"'{arm}'" for arm in arms)
    for table in TABLES:
        op.execute(f"""
            ALTER TABLE {q}.{table} DROP CONSTRAINT {table}_arm_check,
                ADD CONSTRAINT {table}_arm_check CHECK (arm IN ({allowed}))""")


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    _allow_arms(q, ("treatment", "holdout", "withheld"))


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # A withheld user was never emailed and the step is behind them: as a holdout row it stays
    # unsent and passed, which is all the code before this revision reads of it.
    for table in TABLES:
        op.execute(f"UPDATE {q}.{table} SET arm = 'holdout' WHERE arm = 'withheld'")
    _allow_arms(q, ("treatment", "holdout"))
