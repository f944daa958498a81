"""Each loop's experiment design, frozen per period: the period every episode, assignment and
decision belongs to, and decisions keyed by the step's id (its template) instead of its index.

Revision ID: 0014
Revises: 0013
"""

from alembic import op

revision = "0014"
down_revision = "0013"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    # `change` says what started the period: the first design, or the keys that changed.
    op.execute(f"""
        CREATE TABLE {q}.experiment_periods (
            loop_name text NOT NULL,
            period integer NOT NULL CHECK (period > 0),
            design jsonb NOT NULL,
            started_on date NOT NULL,
            change text NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (loop_name, period),
            UNIQUE (loop_name, started_on)
        )""")
    # What exists already was made under one design: the first period, recorded by the next
    # audience run from the configuration it runs with.
    for table in ("episodes", "reengagement_audience", "campaign_decisions"):
        op.execute(f"ALTER TABLE {q}.{table} ADD COLUMN period integer NOT NULL DEFAULT 1")
    op.execute(f"ALTER TABLE {q}.campaign_decisions ADD COLUMN step_id text")
    # A decision's step is the template the loop's audience gave that step; a step never
    # assigned has no outcomes, so nothing was decided from it.
    op.execute(f"""
        UPDATE {q}.campaign_decisions AS d SET step_id = (
            SELECT a.template FROM {q}.reengagement_audience AS a
            WHERE a.loop_name = d.loop_name AND a.step = d.step
            ORDER BY a.partition_date DESC LIMIT 1)""")
    op.execute(f"DELETE FROM {q}.campaign_decisions WHERE step_id IS NULL")
    op.execute(f"ALTER TABLE {q}.campaign_decisions ALTER COLUMN step_id SET NOT NULL")
    op.execute(f"ALTER TABLE {q}.campaign_decisions DROP CONSTRAINT campaign_decisions_pkey")
    op.execute(
        f"ALTER TABLE {q}.campaign_decisions "
        "ADD PRIMARY KEY (loop_name, period, step_id, decided_on)"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.campaign_decisions DROP CONSTRAINT campaign_decisions_pkey")
    op.execute(
        f"DELETE FROM {q}.campaign_decisions AS d USING {q}.campaign_decisions AS later "
        "WHERE later.loop_name = d.loop_name AND later.step = d.step "
        "AND later.decided_on = d.decided_on AND later.period > d.period"
    )
    op.execute(f"ALTER TABLE {q}.campaign_decisions ADD PRIMARY KEY (loop_name, step, decided_on)")
    op.execute(f"ALTER TABLE {q}.campaign_decisions DROP COLUMN step_id")
    for table in ("episodes", "reengagement_audience", "campaign_decisions"):
        op.execute(f"ALTER TABLE {q}.{table} DROP COLUMN period")
    op.execute(f"DROP TABLE {q}.experiment_periods")
