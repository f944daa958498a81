"""Outcomes of every assignment, the decisions the measurements lead to, and which decision
set an assignment's variant.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # One row per assignment (an audience row: loop, day, user) and window. `evaluated_through`
    # is the last day whose activity the row has seen: a later evaluation replaces an earlier
    # one, never the reverse.
    op.execute(f"""
        CREATE TABLE {q}.reengagement_outcomes (
            loop_name text NOT NULL,
            partition_date date NOT NULL,
            user_id text NOT NULL,
            window_days integer NOT NULL CHECK (window_days > 0),
            episode_start date NOT NULL,
            step integer NOT NULL,
            arm text NOT NULL CHECK (arm IN ('treatment', 'holdout')),
            variant text NOT NULL,
            emailed boolean NOT NULL,
            status text NOT NULL CHECK (status IN ('returned', 'not_returned', 'pending')),
            returned_on date,
            active_revenue_cents bigint,
            evaluated_through date NOT NULL,
            PRIMARY KEY (loop_name, partition_date, user_id, window_days),
            CHECK ((status = 'returned') = (returned_on IS NOT NULL))
        )""")
    op.execute(f"CREATE INDEX reengagement_outcomes_by_user ON {q}.reengagement_outcomes (user_id)")
    # A decision per loop, step and day, made from the outcomes known that day and followed by
    # the audiences of the days after it.
    op.execute(f"""
        CREATE TABLE {q}.campaign_decisions (
            loop_name text NOT NULL,
            step integer NOT NULL,
            decided_on date NOT NULL,
            variant_shares jsonb NOT NULL,
            paused boolean NOT NULL,
            reason text NOT NULL,
            evidence jsonb NOT NULL,
            decided_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (loop_name, step, decided_on)
        )""")
    # The decision whose shares picked the assignment's variant; NULL for an even split.
    op.execute(f"ALTER TABLE {q}.reengagement_audience ADD COLUMN decided_on date")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.reengagement_audience DROP COLUMN decided_on")
    op.execute(f"DROP TABLE {q}.campaign_decisions")
    op.execute(f"DROP TABLE {q}.reengagement_outcomes")
