"""Erasure: a user deleted from the app, or whose account the app now excludes
(`database.tables.users.exclude`), disappears from every table of the pipeline.

Per-user tables lose the user's rows. The send log keeps each row (so counts and the
exactly-once guarantee still hold) with the address and the rendered content blanked, and an
email not yet sent is never sent. The suppression list keeps the address, without the user,
so a person who unsubscribed and signs up again is still not emailed. Each blanked row of an
email that was sent, or may have been (it failed once its request was made), keeps its mailbox's
SHA-256, so that an unsubscribe from it arriving after the erasure suppresses the mailbox by its
hash (`recipients.suppressions.unsubscribe_user`).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from retention_pipeline.audience.days_rebuilt import record_emailed_days_as_rebuilt
from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import ResolvedTable, resolve_app_tables
from retention_pipeline.database.excluded_users import kept_sql
from retention_pipeline.recipients.addresses import mailbox_sql, sha256_sql
from retention_pipeline.tracking.sql import CAPTURE_TABLES, TrackingSql
from retention_pipeline.tracking.state import TrackingError

# Beyond this share of the users looked at, and this many, users gone at once stop the pipeline
# instead of being erased: a mapping pointed at the wrong table, or an inverted exclusion, looks
# like that, and erasure cannot be undone; an app rarely loses half its users in an hour.
MASS_ERASURE_SHARE = 0.5
MASS_ERASURE_MINIMUM = 50


class MassErasure(TrackingError):
    """Most of the users the pipeline knows are to be erased at once; nothing was erased."""


PER_USER_TABLES = (
    "activity_daily",
    "action_daily",
    "user_activity_snapshot",
    "classified_segments",
    "reengagement_audience",
    "episodes",
    "reengagement_outcomes",
)


def erase_users(connection: Connection, schema: str) -> tuple[list[str], list[str]]:
    """Erase the users recorded in `erased_users`; returns their ids, and the send keys whose
    content was blanked (their outbox files go too). A user whose email is in a batch that
    went out unconfirmed waits until the batch is settled: while `erased_users` names them, the
    batch's next start withholds them (`sending.send_log.start_batch`), and the drain after that
    erases them."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    user_ids = list(
        connection.execute(
            text(f"""
                SELECT DISTINCT erased.user_id FROM {s}.erased_users AS erased
                WHERE NOT EXISTS (
                    SELECT FROM {s}.email_send_log AS log
                    WHERE log.user_id = erased.user_id AND log.status = 'claimed'
                      AND log.first_attempt_at IS NOT NULL)""")
        ).scalars()
    )
    if not user_ids:
        return [], []
    params = {"ids": user_ids}
    # The frequency cap reads erased users' sent emails apart; one that failed once its request
    # was made may have been delivered all the same, and with its audience row gone only the
    # send log of a day recorded as built again still shows it.
    record_emailed_days_as_rebuilt(
        connection,
        schema,
        "user_id = ANY(CAST(:ids AS text[])) AND status = 'failed' "
        "AND first_attempt_at IS NOT NULL",
        params,
    )
    for table in PER_USER_TABLES:
        connection.execute(
            text(f"DELETE FROM {s}.{table} WHERE user_id = ANY(CAST(:ids AS text[]))"), params
        )
    # The mailbox hash of an email that went out, or may have (its request was made), stays,
    # so that its unsubscribe link still counts.
    keys = connection.execute(
        text(f"""
            UPDATE {s}.email_send_log
            SET email = '', subject = '', html = '', body_text = '', headers = '{{}}',
                erased_mailbox_sha256 = CASE WHEN (status = 'sent' OR first_attempt_at IS NOT NULL)
                                                  AND email <> ''
                                             THEN {sha256_sql(mailbox_sql("email"))}
                                             ELSE erased_mailbox_sha256 END,
                status = CASE WHEN status = 'claimed' THEN 'failed' ELSE status END,
                error = CASE WHEN status = 'claimed' THEN :erased ELSE error END,
                updated_at = now()
            WHERE user_id = ANY(CAST(:ids AS text[]))
            RETURNING send_key"""),
        {**params, "erased": "user erased before sending"},
    ).scalars()
    keys = list(keys)
    # A bounce message may quote the address.
    connection.execute(
        text(f"""
            UPDATE {s}.email_events SET detail = '{{}}'
            WHERE send_log_id IN (SELECT id FROM {s}.email_send_log
                                  WHERE user_id = ANY(CAST(:ids AS text[])))"""),
        params,
    )
    connection.execute(
        text(
            f"UPDATE {s}.email_suppressions SET user_id = NULL "
            "WHERE user_id = ANY(CAST(:ids AS text[]))"
        ),
        params,
    )
    connection.execute(
        text(f"DELETE FROM {s}.erased_users WHERE user_id = ANY(CAST(:ids AS text[]))"), params
    )
    return user_ids, keys


def forget_captured_rows(
    connection: Connection, sql: TrackingSql, user_ids: list[str], timezone: str
) -> None:
    """Drop the erased users' rows the capture still holds: taken after the drain switched
    tables and before their delete committed, the next drain would fold them back into the
    rollup. They still count for their source, as the app's table had them."""
    if not user_ids:
        return
    for table in CAPTURE_TABLES:
        connection.execute(
            text(f"""
                WITH gone AS (
                    DELETE FROM {sql.q_schema}.{table}
                    WHERE user_id = ANY(CAST(:ids AS text[]))
                    RETURNING source, at
                )
                {
                sql.count_source_rows(
                    "SELECT source, at, 1 AS n FROM gone "
                    "WHERE source = ANY(CAST(:sources AS text[]))",
                    "CAST(:tz AS text)",
                )
            }"""),
            {
                "ids": user_ids,
                "tz": timezone,
                "sources": [source.name for source in sql.sources],
            },
        )


def _known_users_sql(s: str) -> str:
    """The users the pipeline knows: the latest snapshot's, those in an open episode or in the
    latest audience, and those with an email still claimed."""
    return f"""SELECT user_id FROM {s}.user_activity_snapshot
            WHERE partition_date = (SELECT max(partition_date) FROM {s}.user_activity_snapshot)
            UNION SELECT user_id FROM {s}.episodes WHERE ended_on IS NULL
            UNION SELECT user_id FROM {s}.reengagement_audience
            WHERE partition_date = (SELECT max(partition_date) FROM {s}.reengagement_audience)
            UNION SELECT user_id FROM {s}.email_send_log WHERE status = 'claimed'"""


def users_gone_from_app(connection: Connection, config: RetentionConfig) -> int:
    """Find the users the pipeline knows (`_known_users_sql`) that the app deleted (without
    triggers nothing else sees a delete) or now excludes, and record them for erasure; return
    how many were newly recorded."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    return record_users_gone(connection, config, _known_users_sql(s), probe_key=False)


def _gone_sql(connection: Connection, users: ResolvedTable, user_id: str, probe_key: bool) -> str:
    """Whether the text `user_id` is no user the app's users table has and keeps."""
    preparer = connection.dialect.identifier_preparer
    return f"""NOT EXISTS (
                SELECT FROM {users.sql_name(preparer)} AS u
                WHERE {users.id_equals_sql("u", user_id, preparer, probe_key=probe_key)}
                  AND {kept_sql(users, "u", connection.dialect)})"""


def record_users_gone(
    connection: Connection,
    config: RetentionConfig,
    known_users: str,
    parameters: dict[str, object] | None = None,
    *,
    probe_key: bool,
) -> int:
    """Record for erasure the users of `known_users` (SQL selecting a `user_id` column, with its
    `parameters`) that the app's users table no longer has (what the delete trigger would have
    recorded) or now excludes (`database.tables.users.exclude`: treated as deleted); return how
    many were newly recorded. `probe_key` for a few known users (`ResolvedTable.id_equals_sql`).
    The drain erases them, after `stop_mass_erasure`."""
    users = resolve_app_tables(connection, config.database.tables)["users"]
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    return connection.execute(
        text(f"""
            INSERT INTO {s}.erased_users (user_id, seen_deleted)
            SELECT known.user_id, FALSE FROM ({known_users}) AS known
            WHERE {_gone_sql(connection, users, "known.user_id", probe_key)}
              AND NOT EXISTS (
                SELECT FROM {s}.erased_users AS erased WHERE erased.user_id = known.user_id)"""),
        parameters or {},
    ).rowcount


def stop_mass_erasure(connection: Connection, sql: TrackingSql, *, all_at_once: bool) -> None:
    """Before a drain erases: forget the erasures a read of the users table recorded of users
    it has and keeps again (an exclusion that ended; a send batch or a reinstall that read it
    under a mapping fixed since), never one the delete trigger saw, whatever row took the id
    since. Then raise `MassErasure` where more than `MASS_ERASURE_SHARE` of the users the
    pipeline knows, and `MASS_ERASURE_MINIMUM` or more, are to be erased at once, whoever
    recorded them: the caller's transaction is to be rolled back. `all_at_once`
    (`retention-pipeline db erase-gone`) says they did go. `sql` has the drain's users table."""
    s = sql.q_schema
    connection.execute(
        text(f"""
            DELETE FROM {s}.erased_users AS erased
            WHERE NOT erased.seen_deleted
              AND NOT ({_gone_sql(connection, sql.users, "erased.user_id", probe_key=True)})""")
    )
    if all_at_once:
        return
    pending = connection.execute(
        text(f"SELECT count(DISTINCT user_id) FROM {s}.erased_users")
    ).scalar_one()
    if pending < MASS_ERASURE_MINIMUM:
        return
    # Of the users with a history to lose: deletions before a first snapshot, or users erased
    # before and recorded again by a reinstall, have none.
    known, to_erase = connection.execute(
        text(f"""
            SELECT count(*), count(*) FILTER (WHERE EXISTS (
                       SELECT FROM {s}.erased_users AS erased
                       WHERE erased.user_id = known.user_id))
            FROM ({_known_users_sql(s)}) AS known""")
    ).one()
    if to_erase >= MASS_ERASURE_MINIMUM and to_erase > MASS_ERASURE_SHARE * known:
        raise MassErasure(
            f"database.tables.users: {to_erase:,} of {known:,} users the pipeline knows are "
            f"gone from {sql.users.mapping.qualified_name} or excluded by "
            "database.tables.users.exclude at once; erasing them would lose their history for "
            "good, so none is erased: fix the mapping or an inverted exclusion, or, if they did "
            "go, run `retention-pipeline db erase-gone --yes`"
        )
