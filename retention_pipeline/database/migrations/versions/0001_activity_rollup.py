"""Per-user, per-day activity rollup and the tracking state.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"""
        CREATE TABLE {q}.activity_daily (
            user_id text NOT NULL,
            day date NOT NULL,
            event_count integer NOT NULL DEFAULT 0,
            session_count integer NOT NULL DEFAULT 0,
            last_event_at timestamptz,
            last_session_at timestamptz,
            PRIMARY KEY (user_id, day)
        )""")
    op.execute(f"CREATE INDEX activity_daily_day ON {q}.activity_daily (day)")
    op.execute(f"""
        CREATE TABLE {q}.action_daily (
            user_id text NOT NULL,
            day date NOT NULL,
            event_name text NOT NULL,
            event_count integer NOT NULL,
            last_at timestamptz NOT NULL,
            PRIMARY KEY (user_id, day, event_name)
        )""")
    op.execute(f"""
        CREATE TABLE {q}.tracking_state (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            timezone text NOT NULL,
            mode text NOT NULL CHECK (mode IN ('triggers', 'incremental')),
            refreshed_through timestamptz,
            installed_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"""
        CREATE TABLE {q}.tracking_errors (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            occurred_at timestamptz NOT NULL DEFAULT now(),
            source_table text NOT NULL,
            sqlstate text NOT NULL,
            message text NOT NULL
        )""")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    for table in ("tracking_errors", "tracking_state", "action_daily", "activity_daily"):
        op.execute(f"DROP TABLE {q}.{table}")
