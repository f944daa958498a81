"""Activity sources: per-source state, capture rows labelled by source, rows counted by polls.

Each source (a table or view whose rows are activity) keeps its definition (the SELECT the
capture, the rebuild and the poll share), how it is captured, a poll's watermark and when its
history starts. The capture rows say which source wrote them, so a source added to an installed
database is backfilled alone; those written before are the shorthand sources' (`events` for an
action, `sessions` for a login). A poll keeps the rows it counted within its lookback, and
counts only the rest on the next one.

Revision ID: 0015
Revises: 0014
"""

from alembic import op

revision = "0015"
down_revision = "0014"

CAPTURE_TABLES = ("activity_capture_0", "activity_capture_1")


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    for table in CAPTURE_TABLES:
        op.execute(f"ALTER TABLE {q}.{table} ADD COLUMN source text")
        op.execute(
            f"UPDATE {q}.{table} SET source = CASE kind WHEN 'e' THEN 'events' ELSE 'sessions' END"
        )
    op.execute(f"""
        CREATE TABLE {q}.tracking_sources (
            name text PRIMARY KEY,
            relation text NOT NULL,
            capture text NOT NULL CHECK (capture IN ('inserts', 'updates', 'polling')),
            definition text NOT NULL,
            watermark timestamptz,
            backfill_pending boolean NOT NULL DEFAULT false,
            first_day date,
            history text,
            installed_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"""
        CREATE TABLE {q}.polled_rows (
            source text NOT NULL,
            kind "char" NOT NULL,
            user_id text NOT NULL,
            at timestamptz NOT NULL,
            event_name text,
            n integer NOT NULL
        )""")
    op.execute(f"CREATE INDEX ON {q}.polled_rows (source, at)")
    # A backfill of sources added to an installed database adds to days the rollup holds; a
    # rebuild of everything writes into emptied days, at half the cost.
    op.execute(
        f"ALTER TABLE {q}.tracking_state "
        "ADD COLUMN rebuild_into_empty boolean NOT NULL DEFAULT false"
    )


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.tracking_state DROP COLUMN rebuild_into_empty")
    op.execute(f"DROP TABLE {q}.polled_rows")
    op.execute(f"DROP TABLE {q}.tracking_sources")
    for table in CAPTURE_TABLES:
        op.execute(f"ALTER TABLE {q}.{table} DROP COLUMN source")
