"""Snapshots and segments partitioned by day: a day is rebuilt by emptying its own partition, read
with its own statistics, and dropped whole once older than `database.keep_days`. Existing rows
move into one partition per day.

Revision ID: 0008
Revises: 0007
"""

from datetime import date, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

TABLES = ("user_activity_snapshot", "engagement_segments")

# The view condition queries read (0003), which depends on both tables.
USERS_VIEW = """
    CREATE VIEW {q}.users AS
    SELECT snap.user_id AS id,
           snap.email,
           snap.name,
           snap.timezone,
           snap.signed_up_at AS created_at,
           snap.last_activity_at,
           snap.events_7d,
           snap.sessions_7d,
           snap.baseline_sessions_per_week,
           snap.active_days_28d,
           snap.subscription_status,
           snap.subscription_plan,
           snap.monthly_amount_cents,
           seg.segment,
           seg.reason AS segment_reason,
           EXISTS (
               SELECT FROM {q}.email_send_log AS sent
               WHERE sent.loop_name = current_setting('retention.loop', true)
                 AND sent.user_id = snap.user_id
                 AND sent.status = 'sent'
                 AND sent.sent_at < {q}.as_of()
                 AND sent.sent_at > coalesce(snap.last_activity_at, snap.signed_up_at)
           ) AS re_engagement_sent
    FROM {q}.user_activity_snapshot AS snap
    LEFT JOIN {q}.engagement_segments AS seg
        ON seg.partition_date = snap.partition_date
       AND seg.user_id = snap.user_id
       AND seg.loop_name = current_setting('retention.loop', true)
    WHERE snap.partition_date = current_setting('retention.partition_date', true)::date"""

PRIMARY_KEYS = {
    "user_activity_snapshot": "(partition_date, user_id)",
    "engagement_segments": "(partition_date, loop_name, user_id)",
}


def _literal(day: date) -> str:
    return sa.literal(day, sa.Date).compile(
        dialect=op.get_bind().dialect, compile_kwargs={"literal_binds": True}
    )


def upgrade(schema: str) -> None:
    preparer = op.get_context().dialect.identifier_preparer
    q = preparer.quote_schema(schema)
    op.execute(f"DROP VIEW {q}.users")
    for table in TABLES:
        old = f"{table}_unpartitioned"
        op.execute(f"ALTER TABLE {q}.{table} RENAME TO {old}")
        op.execute(f"ALTER TABLE {q}.{old} RENAME CONSTRAINT {table}_pkey TO {old}_pkey")
        op.execute(f"""
            CREATE TABLE {q}.{table} (LIKE {q}.{old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
            PARTITION BY RANGE (partition_date)""")
        op.execute(f"ALTER TABLE {q}.{table} ADD PRIMARY KEY {PRIMARY_KEYS[table]}")
        days = op.get_bind().execute(sa.text(f"SELECT DISTINCT partition_date FROM {q}.{old}"))
        for (day,) in days.all():
            partition = preparer.quote(f"{table}_{day:%Y%m%d}")
            op.execute(f"""
                CREATE TABLE {q}.{partition} PARTITION OF {q}.{table}
                FOR VALUES FROM ({_literal(day)}) TO ({_literal(day + timedelta(days=1))})""")
        op.execute(f"INSERT INTO {q}.{table} SELECT * FROM {q}.{old}")
        op.execute(f"DROP TABLE {q}.{old}")
    op.execute(
        f"CREATE INDEX engagement_segments_by_segment "
        f"ON {q}.engagement_segments (loop_name, partition_date, segment)"
    )
    op.execute(USERS_VIEW.format(q=q))


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP VIEW {q}.users")
    for table in TABLES:
        partitioned = f"{table}_partitioned"
        op.execute(f"ALTER TABLE {q}.{table} RENAME TO {partitioned}")
        op.execute(
            f"ALTER TABLE {q}.{partitioned} RENAME CONSTRAINT {table}_pkey TO {partitioned}_pkey"
        )
        op.execute(
            f"CREATE TABLE {q}.{table} (LIKE {q}.{partitioned} INCLUDING DEFAULTS "
            "INCLUDING CONSTRAINTS)"
        )
        op.execute(f"ALTER TABLE {q}.{table} ADD PRIMARY KEY {PRIMARY_KEYS[table]}")
        op.execute(f"INSERT INTO {q}.{table} SELECT * FROM {q}.{partitioned}")
        op.execute(f"DROP TABLE {q}.{partitioned}")
    op.execute(
        f"CREATE INDEX engagement_segments_by_segment "
        f"ON {q}.engagement_segments (loop_name, partition_date, segment)"
    )
    op.execute(USERS_VIEW.format(q=q))
