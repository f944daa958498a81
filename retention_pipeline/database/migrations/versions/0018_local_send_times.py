"""Local-time delivery: each audience member's due time, and how far each send run of a loop has
claimed along them.

`due_at` is when the member's email may go out (their local send time, moved past their quiet
hours, and later past them again by a send run that came late), `first_due_at` the due time the
build gave, alike in every arm (outcome windows count from it), `stale_at` when it may no longer
(`email.max_delay` after the local send time), `send_timezone` the timezone they were read in,
`skipped_at` when a send run skipped the member as stale, and `send_time_arm` the draw of a loop
that learns its send times (`learned` or `fixed`). All NULL for a loop that sends
right after its run. A partial index on (loop, due time) lets each hourly send read only the
members due since the previous one, which `send_due_claims` records per loop and shard. An
outcome's `window_ends_on` is the last day of its window (counted from the due time's day).

Local times become instants in PostgreSQL (`local_instant`): one a daylight-saving change skips
is read with the offset of before the change (02:30 on a night that jumps from 02:00 to 03:00 is
03:30; a time skipped from its very start is the first instant after the gap), one it doubles is
its first occurrence.

Revision ID: 0018
Revises: 0016
"""

from alembic import op

revision = "0018"
down_revision = "0016"


def upgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"""
        ALTER TABLE {q}.reengagement_audience
            ADD COLUMN send_timezone text,
            ADD COLUMN due_at timestamptz,
            ADD COLUMN first_due_at timestamptz,
            ADD COLUMN stale_at timestamptz,
            ADD COLUMN skipped_at timestamptz,
            ADD COLUMN send_time_arm text CHECK (send_time_arm IN ('learned', 'fixed'))""")
    # A window of such a member ends after the day of its due time, not its audience's day.
    op.execute(f"ALTER TABLE {q}.reengagement_outcomes ADD COLUMN window_ends_on date")
    op.execute(
        f"CREATE INDEX reengagement_audience_due ON {q}.reengagement_audience (loop_name, due_at) "
        "WHERE due_at IS NOT NULL AND arm = 'treatment'"
    )
    op.execute(f"""
        CREATE TABLE {q}.send_due_claims (
            loop_name text NOT NULL,
            send_shard integer NOT NULL,
            shard_count integer NOT NULL,
            claimed_through timestamptz,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (loop_name, send_shard, shard_count)
        )""")
    # PostgreSQL reads a doubled local time as standard time, its second occurrence; the offset
    # of a day before gives the first when it reads back as the same local time.
    op.execute(f"""
        CREATE FUNCTION {q}.local_instant(local timestamp, zone text) RETURNS timestamptz
        LANGUAGE sql STABLE STRICT AS $$
            SELECT CASE WHEN earlier < reading AND earlier AT TIME ZONE zone = local
                        THEN earlier ELSE reading END
            FROM (SELECT local AT TIME ZONE zone AS reading) AS pg,
                 LATERAL (SELECT (local - ((reading - interval '1 day') AT TIME ZONE zone
                                           - (reading - interval '1 day') AT TIME ZONE 'UTC'))
                                 AT TIME ZONE 'UTC' AS earlier) AS first
        $$""")
    op.execute(f"""
        CREATE FUNCTION {q}.next_local_time(after timestamptz, at time, zone text)
        RETURNS timestamptz LANGUAGE sql STABLE STRICT AS $$
            SELECT CASE WHEN today > after THEN today
                        ELSE {q}.local_instant(local_day + 1 + at, zone) END
            FROM (SELECT (after AT TIME ZONE zone)::date AS local_day) AS d,
                 LATERAL (SELECT {q}.local_instant(local_day + at, zone) AS today) AS t
        $$""")
    op.execute(f"""
        CREATE FUNCTION {q}.in_quiet_hours(instant timestamptz, zone text, starts time, ends time)
        RETURNS boolean LANGUAGE sql STABLE STRICT AS $$
            SELECT CASE WHEN starts < ends THEN local >= starts AND local < ends
                        ELSE local >= starts OR local < ends END
            FROM (SELECT CAST(instant AT TIME ZONE zone AS time) AS local) AS l
        $$""")


def downgrade(schema: str) -> None:
    q = op.get_context().dialect.identifier_preparer.quote_schema(schema)
    op.execute(f"DROP FUNCTION {q}.in_quiet_hours(timestamptz, text, time, time)")
    op.execute(f"DROP FUNCTION {q}.next_local_time(timestamptz, time, text)")
    op.execute(f"DROP FUNCTION {q}.local_instant(timestamp, text)")
    op.execute(f"DROP TABLE {q}.send_due_claims")
    op.execute(f"ALTER TABLE {q}.reengagement_outcomes DROP COLUMN window_ends_on")
    op.execute(f"DROP INDEX {q}.reengagement_audience_due")
    op.execute(f"""
        ALTER TABLE {q}.reengagement_audience
            DROP COLUMN send_timezone, DROP COLUMN due_at, DROP COLUMN first_due_at,
            DROP COLUMN stale_at, DROP COLUMN skipped_at, DROP COLUMN send_time_arm""")
