"""Each source's rows counted per day, so that the reconciliation compares every source.

The rollup holds a user-day's events and sessions summed over every source, so the check
compared each kind's total with the app's rows. Where a kind mixes a source captured by inserts
with one whose history outgrows the app's rows (a time updated in place, a polled source), the
total could only be a lower bound, and rows an inserts source lost were hidden by the other's
surplus. Every fold now adds what it counted of each source per day (`source_day_rows`), and
each source's rows of the last complete day must be at least the app's. A source counts from
`tracking_sources.rows_counted_from` (NULL: from its first row): the days before this revision
were folded without a count, so sources installed here count from tomorrow.

Revision ID: 0026
Revises: 0025
"""

from alembic import op

revision = "0026"
down_revision = "0025"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"""
        CREATE TABLE {q}.source_day_rows (
            source text NOT NULL,
            day date NOT NULL,
            rows bigint NOT NULL,
            PRIMARY KEY (source, day))""")
    op.execute(f"ALTER TABLE {q}.tracking_sources ADD COLUMN rows_counted_from date")
    op.execute(f"""
        UPDATE {q}.tracking_sources
        SET rows_counted_from = (now() AT TIME ZONE (SELECT timezone FROM {q}.tracking_state))::date
                                + 1""")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"ALTER TABLE {q}.tracking_sources DROP COLUMN rows_counted_from")
    op.execute(f"DROP TABLE {q}.source_day_rows")
