"""Daily activity snapshots and engagement segments.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"""
        CREATE TABLE {q}.user_activity_snapshot (
            partition_date date NOT NULL,
            user_id text NOT NULL,
            email text,
            name text,
            timezone text,
            signed_up_at timestamptz NOT NULL,
            account_age_days integer NOT NULL,
            last_activity_at timestamptz,
            previous_activity_at timestamptz,
            active_today boolean NOT NULL,
            last_actions jsonb NOT NULL DEFAULT '[]',
            events_7d integer NOT NULL,
            sessions_7d integer NOT NULL,
            baseline_sessions_per_week numeric(12, 2) NOT NULL,
            active_days_28d integer NOT NULL,
            subscription_status text,
            subscription_plan text,
            monthly_amount_cents integer,
            PRIMARY KEY (partition_date, user_id)
        )""")
    op.execute(f"""
        CREATE TABLE {q}.engagement_segments (
            partition_date date NOT NULL,
            loop_name text NOT NULL,
            user_id text NOT NULL,
            segment text NOT NULL CHECK (segment IN ('new', 'active', 'at_risk', 'dormant',
                'resurrected', 'never_activated', 'churned')),
            reason text NOT NULL,
            entered_on date NOT NULL,
            PRIMARY KEY (partition_date, loop_name, user_id)
        )""")
    op.execute(
        f"CREATE INDEX engagement_segments_by_segment "
        f"ON {q}.engagement_segments (loop_name, partition_date, segment)"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP TABLE {q}.engagement_segments")
    op.execute(f"DROP TABLE {q}.user_activity_snapshot")
