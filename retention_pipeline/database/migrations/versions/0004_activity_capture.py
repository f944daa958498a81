"""Capture, then drain: the tables the triggers append to, the rebuild plan, erased users.

The triggers stop upserting the rollup inside the app's transaction; they append to one of two
capture tables, and the pipeline folds the capture into the rollup and truncates it. An install
that was keeping the rollup with the old triggers keeps its rollup: the functions are replaced
in place, so every row is counted by exactly one of the two bodies.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"

CAPTURE_TABLES = ("activity_capture_0", "activity_capture_1")


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    for table in CAPTURE_TABLES:
        # Append-only and truncated whole after each drain: no index, nothing to vacuum, and
        # no CHECK, which every app statement would pay for (about 7% of ORM-style throughput).
        # `kind` is 'e' for an event, 's' for an auth session.
        op.execute(f"""
            CREATE TABLE {q}.{table} (
                kind "char" NOT NULL,
                user_id text NOT NULL,
                at timestamptz NOT NULL,
                event_name text
            ) WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false)""")
    op.execute(f"""
        ALTER TABLE {q}.tracking_state
            ADD COLUMN capture_slot smallint NOT NULL DEFAULT 0 CHECK (capture_slot IN (0, 1)),
            ADD COLUMN rebuild_pending boolean NOT NULL DEFAULT false,
            ADD COLUMN last_drained_at timestamptz""")
    # A rebuild of the rollup from the app tables, in day ranges committed one by one, so an
    # install stopped midway resumes where it was.
    op.execute(f"""
        CREATE TABLE {q}.rebuild_chunks (
            number integer PRIMARY KEY,
            first_day date,
            end_day date,
            planned_rows bigint NOT NULL,
            done_at timestamptz,
            CHECK (first_day IS NULL OR end_day IS NULL OR first_day < end_day)
        )""")
    op.execute(f"""
        CREATE TABLE {q}.erased_users (
            user_id text NOT NULL,
            erased_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"DROP TABLE {q}.tracking_errors")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"""
        CREATE TABLE {q}.tracking_errors (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            occurred_at timestamptz NOT NULL DEFAULT now(),
            source_table text NOT NULL,
            sqlstate text NOT NULL,
            message text NOT NULL
        )""")
    op.execute(f"DROP TABLE {q}.erased_users")
    op.execute(f"DROP TABLE {q}.rebuild_chunks")
    op.execute(f"""
        ALTER TABLE {q}.tracking_state
            DROP COLUMN capture_slot, DROP COLUMN rebuild_pending, DROP COLUMN last_drained_at""")
    for table in CAPTURE_TABLES:
        op.execute(f"DROP TABLE {q}.{table}")
