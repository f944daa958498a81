"""Episodes, the daily audience, the email send log, suppressions, and the views custom
condition queries read.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"""
        CREATE TABLE {q}.episodes (
            loop_name text NOT NULL,
            user_id text NOT NULL,
            started_on date NOT NULL,
            ended_on date,
            end_reason text,
            PRIMARY KEY (loop_name, user_id, started_on),
            CHECK (ended_on IS NULL OR ended_on >= started_on)
        )""")
    op.execute(
        f"CREATE UNIQUE INDEX episodes_one_open ON {q}.episodes (loop_name, user_id) "
        "WHERE ended_on IS NULL"
    )
    op.execute(f"""
        CREATE TABLE {q}.reengagement_audience (
            partition_date date NOT NULL,
            loop_name text NOT NULL,
            user_id text NOT NULL,
            email text NOT NULL,
            episode_start date NOT NULL,
            step integer NOT NULL,
            template text NOT NULL,
            arm text NOT NULL CHECK (arm IN ('treatment', 'holdout')),
            variant text NOT NULL,
            PRIMARY KEY (partition_date, loop_name, user_id)
        )""")
    # Which steps an episode already had, and who was picked lately (the frequency cap).
    op.execute(
        f"CREATE INDEX reengagement_audience_by_episode "
        f"ON {q}.reengagement_audience (loop_name, user_id, episode_start, step)"
    )
    op.execute(
        f"CREATE INDEX reengagement_audience_by_user "
        f"ON {q}.reengagement_audience (user_id, partition_date)"
    )
    op.execute(f"""
        CREATE TABLE {q}.email_send_log (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            send_key text NOT NULL UNIQUE,
            loop_name text NOT NULL,
            user_id text NOT NULL,
            episode_start date NOT NULL,
            step integer NOT NULL,
            partition_date date NOT NULL,
            email text NOT NULL,
            template text NOT NULL,
            variant text NOT NULL,
            batch_key text NOT NULL,
            subject text NOT NULL,
            html text NOT NULL,
            body_text text NOT NULL,
            headers jsonb NOT NULL DEFAULT '{{}}',
            tags jsonb NOT NULL DEFAULT '{{}}',
            status text NOT NULL CHECK (status IN ('claimed', 'sent', 'failed')),
            provider text,
            provider_id text,
            error text,
            attempts integer NOT NULL DEFAULT 0,
            claimed_at timestamptz NOT NULL DEFAULT now(),
            first_attempt_at timestamptz,
            sent_at timestamptz,
            updated_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (loop_name, user_id, episode_start, step)
        )""")
    op.execute(
        f"CREATE INDEX email_send_log_by_user ON {q}.email_send_log (user_id, partition_date)"
    )
    op.execute(
        f"CREATE INDEX email_send_log_by_day ON {q}.email_send_log (loop_name, partition_date)"
    )
    op.execute(
        f"CREATE INDEX email_send_log_unconfirmed ON {q}.email_send_log (loop_name, batch_key) "
        "WHERE status = 'claimed'"
    )
    op.execute(f"""
        CREATE TABLE {q}.email_suppressions (
            email text PRIMARY KEY CHECK (email = lower(email)),
            user_id text,
            reason text NOT NULL CHECK (reason IN ('unsubscribed', 'bounced', 'complained')),
            source text,
            created_at timestamptz NOT NULL DEFAULT now()
        )""")
    # Custom condition queries run with search_path set to this schema and the partition and
    # loop in settings, so `SELECT * FROM users WHERE ...` reads these as-of views.
    op.execute(f"""
        CREATE FUNCTION {q}.as_of() RETURNS timestamptz LANGUAGE sql STABLE AS $$
            SELECT ((current_setting('retention.partition_date')::date + 1)::timestamp
                    AT TIME ZONE (SELECT timezone FROM {q}.tracking_state))
        $$""")
    op.execute(f"""
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
        WHERE snap.partition_date = current_setting('retention.partition_date', true)::date""")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP VIEW {q}.users")
    op.execute(f"DROP FUNCTION {q}.as_of()")
    op.execute(f"DROP TABLE {q}.email_suppressions")
    op.execute(f"DROP TABLE {q}.email_send_log")
    op.execute(f"DROP TABLE {q}.reengagement_audience")
    op.execute(f"DROP TABLE {q}.episodes")
