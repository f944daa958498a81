"""The `users` view that condition queries read joins only what the query reads: the same
columns and rows, but a condition that reads no segment column reads no segment, and one that
reads no `re_engagement_sent` reads no send log.

Before, every condition joined the day's million segment rows (through the `engagement_segments`
view, a join PostgreSQL cannot leave out) and looked up the send log once per user it read. The
segments now come from the loop's own rows of `classified_segments`, made distinct by user (they
are already: it is the table's key, but PostgreSQL 15 proves no uniqueness from a partitioned
table's key, and without a proof it keeps the join), and `re_engagement_sent` compares the loop's
latest email per user with the user's latest activity (an email sent after it exists exactly
when the latest does), so both are left joins PostgreSQL drops when nothing reads them. A view
of the user's own over `users` keeps working: the columns do not change.

Revision ID: 0021
Revises: 0020
"""

import importlib

from alembic import op

revision = "0021"
down_revision = "0020"

USERS_VIEW = """
    CREATE OR REPLACE VIEW {q}.users AS
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
           coalesce(
               sent.last_sent_at > coalesce(snap.last_activity_at, snap.signed_up_at), false
           ) AS re_engagement_sent
    FROM {q}.user_activity_snapshot AS snap
    LEFT JOIN (
        SELECT DISTINCT ON (seg.user_id) seg.user_id, seg.segment, seg.reason
        FROM {q}.classified_segments AS seg
        WHERE seg.partition_date = current_setting('retention.partition_date', true)::date
          AND seg.rules_loop = (
              SELECT used.rules_loop FROM {q}.segment_rules_used AS used
              WHERE used.partition_date = current_setting('retention.partition_date', true)::date
                AND used.loop_name = current_setting('retention.loop', true))
        ORDER BY seg.user_id
    ) AS seg ON seg.user_id = snap.user_id
    LEFT JOIN (
        SELECT sent.user_id, max(sent.sent_at) AS last_sent_at
        FROM {q}.email_send_log AS sent
        WHERE sent.loop_name = current_setting('retention.loop', true)
          AND sent.status = 'sent'
          AND sent.sent_at < {q}.as_of()
        GROUP BY sent.user_id
    ) AS sent ON sent.user_id = snap.user_id
    WHERE snap.partition_date = current_setting('retention.partition_date', true)::date"""

# As 0008 made it, over the `engagement_segments` view 0019 made.
PREVIOUS_USERS_VIEW = importlib.import_module(
    "retention_pipeline.database.migrations.versions.0008_day_partitions"
).USERS_VIEW.replace("CREATE VIEW", "CREATE OR REPLACE VIEW")


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(USERS_VIEW.format(q=q))


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(PREVIOUS_USERS_VIEW.format(q=q))
