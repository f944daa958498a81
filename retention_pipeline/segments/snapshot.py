"""Every user's activity as of the end of one day, computed in PostgreSQL from the rollup.

The rollup buckets days in the loop timezone, so "day <= D" is exactly "before the end of D":
nothing after the partition leaks in, and a backfill gives the rows the schedule would have.
Subscriptions are the app's current state (it keeps no history), so a backfill sees today's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import Connection, text

from retention_pipeline.config.models import RetentionConfig
from retention_pipeline.database.app_tables import ResolvedTable, resolve_app_tables
from retention_pipeline.database.day_partitions import analyze_day_partition, empty_day_partition

# Distinct actions older than this are not worth naming in an email; the bound keeps the
# snapshot from re-reading a user's whole history every day.
LAST_ACTIONS_LOOKBACK_DAYS = 90
YEARLY_INTERVALS = ("year", "yearly", "annual", "annually")
WEEKLY_INTERVALS = ("week", "weekly")


@dataclass(frozen=True)
class SnapshotSummary:
    users: int
    active_today: int
    never_active: int
    leaked_rows: int
    path: str  # "full" or "incremental"
    path_reason: str
    vanished: int | None
    """Users of the day before's snapshot missing from this one (deleted from the app, or a
    mapping that lost them); None when there is no snapshot of the day before."""


class _Names:
    """Quoted names of the mapped app tables and columns."""

    def __init__(self, connection: Connection, tables: dict[str, ResolvedTable]):
        self.preparer = connection.dialect.identifier_preparer
        self.tables = tables

    def table(self, name: str) -> str:
        return self.tables[name].sql_name(self.preparer)

    def column(self, name: str, key: str, alias: str) -> str:
        return self.tables[name].column_sql(key, alias, self.preparer)

    def timestamp(self, name: str, key: str, alias: str) -> str:
        return self.tables[name].timestamp_sql(key, alias, self.preparer)


def _insert_snapshot(s: str) -> str:
    return f"""INSERT INTO {s}.user_activity_snapshot (
            partition_date, user_id, email, name, timezone, signed_up_at, account_age_days,
            last_activity_at, previous_activity_at, active_today, last_actions, events_7d,
            sessions_7d, baseline_sessions, baseline_sessions_per_week, active_days_28d,
            subscription_status, subscription_plan, monthly_amount_cents)"""


BOUNDS = """bounds AS (
            SELECT CAST(:day AS date) AS day,
                   (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz AS day_end
        )"""


def _app_users_sql(names: _Names, only: str = "") -> str:
    user_id = f"{names.column('users', 'id', 'u')}::text"
    created_at = names.timestamp("users", "created_at", "u")
    listed = f" AND {only.format(user_id)}" if only else ""
    return f"""SELECT {user_id} AS user_id,
                   {names.column("users", "email", "u")}::text AS email,
                   {names.column("users", "name", "u")}::text AS name,
                   {names.column("users", "timezone", "u")}::text AS timezone,
                   {created_at} AS signed_up_at
            FROM {names.table("users")} AS u, bounds
            WHERE {created_at} < bounds.day_end{listed}"""


# Restricts a full build to the users of :only (those a rolled-forward build has no row for).
ONLY_THESE_USERS = "{} IN (SELECT unnest(CAST(:only AS text[])))"


# What the snapshot keeps of a user's rollup rows up to the day (`a`, bounds `b`).
ACTIVITY_FIGURES = """
                   max(greatest(a.last_event_at, a.last_session_at)) AS last_activity_at,
                   max(greatest(a.last_event_at, a.last_session_at))
                       FILTER (WHERE a.day < b.day) AS previous_activity_at,
                   bool_or(a.day = b.day) AS active_today,
                   coalesce(sum(a.event_count) FILTER (WHERE a.day > b.day - 7), 0) AS events_7d,
                   coalesce(sum(a.session_count) FILTER (WHERE a.day > b.day - 7), 0)
                       AS sessions_7d,
                   coalesce(sum(a.session_count) FILTER (
                       WHERE a.day > b.day - 7 - 7 * CAST(:baseline_weeks AS integer)
                         AND a.day <= b.day - 7), 0) AS baseline_sessions,
                   count(*) FILTER (WHERE a.day > b.day - 28) AS active_days_28d"""


def _per_user(s: str, only_listed_users: bool) -> tuple[str, str]:
    """The rollup's figures per user up to the day, and each user's actions in the lookback
    (once per action, at its latest), for every user or only for the users bound as :only. Those
    are read user by user through the primary keys: an aggregate per listed user, which the
    planner cannot turn into a scan of everyone's history."""
    actions_window = f"x.day <= b.day AND x.day > b.day - {LAST_ACTIONS_LOOKBACK_DAYS}"
    if not only_listed_users:
        return (
            f"""SELECT a.user_id, {ACTIVITY_FIGURES}
            FROM {s}.activity_daily AS a, bounds AS b
            WHERE a.day <= b.day
            GROUP BY a.user_id""",
            f"""SELECT x.user_id, x.event_name, max(x.last_at) AS last_at
            FROM {s}.action_daily AS x, bounds AS b
            WHERE {actions_window}
            GROUP BY x.user_id, x.event_name""",
        )
    listed = "unnest(CAST(:only AS text[])) AS listed(user_id) CROSS JOIN bounds AS b"
    return (
        f"""SELECT listed.user_id, figures.*
            FROM {listed}
            CROSS JOIN LATERAL (
                SELECT {ACTIVITY_FIGURES}
                FROM {s}.activity_daily AS a
                WHERE a.user_id = listed.user_id AND a.day <= b.day
            ) AS figures""",
        f"""SELECT listed.user_id, per_name.event_name, per_name.last_at
            FROM {listed}
            CROSS JOIN LATERAL (
                SELECT x.event_name, max(x.last_at) AS last_at
                FROM {s}.action_daily AS x
                WHERE x.user_id = listed.user_id AND {actions_window}
                GROUP BY x.event_name
            ) AS per_name""",
    )


def _subscription_sql(names: _Names, only: str = "") -> str:
    subscriptions = names.tables["subscriptions"]
    amount = names.column("subscriptions", "amount_cents", "sub")
    status = names.column("subscriptions", "status", "sub")
    if subscriptions.maps("billing_interval"):
        interval = names.column("subscriptions", "billing_interval", "sub")
        monthly_amount = f"""CASE
                       WHEN lower({interval}::text) = ANY(CAST(:yearly AS text[]))
                           THEN round({amount} / 12.0)
                       WHEN lower({interval}::text) = ANY(CAST(:weekly AS text[]))
                           THEN round({amount} * 52 / 12.0)
                       ELSE {amount}
                   END"""
    else:  # no interval column: amounts are taken as monthly
        monthly_amount = amount
    # A live subscription describes the user better than an old canceled one, and among those
    # the latest change (when the app records one) wins.
    order = [f"({status}::text IN ('active', 'trialing', 'past_due')) DESC"]
    if subscriptions.maps("updated_at"):
        order.append(f"{names.timestamp('subscriptions', 'updated_at', 'sub')} DESC NULLS LAST")
    user_id = f"{names.column('subscriptions', 'user_id', 'sub')}::text"
    # `only` restricts to the listed users (ONLY_THESE_USERS), as their full build needs.
    listed = f"\n            WHERE {only.format(user_id)}" if only else ""
    return f"""SELECT DISTINCT ON (1)
                   {user_id} AS user_id,
                   {status}::text AS status,
                   {names.column("subscriptions", "plan", "sub")}::text AS plan,
                   ({monthly_amount})::integer AS monthly_amount_cents
            FROM {names.table("subscriptions")} AS sub{listed}
            ORDER BY 1, {", ".join(order)}"""


def _latest_actions_sql(last_per_name: str) -> str:
    """Each user's `:last_actions` latest distinct actions as a JSON array, newest first, from
    a query giving (user_id, event_name, last_at) once per user and action."""
    return f"""
            SELECT ranked.user_id,
                   jsonb_agg(jsonb_build_object('name', ranked.event_name, 'at', ranked.last_at)
                             ORDER BY ranked.last_at DESC, ranked.event_name) AS last_actions
            FROM (
                SELECT per_name.*, row_number() OVER (
                           PARTITION BY per_name.user_id
                           ORDER BY per_name.last_at DESC, per_name.event_name) AS rank
                FROM ({last_per_name}) AS per_name
            ) AS ranked
            WHERE ranked.rank <= CAST(:last_actions AS integer)
            GROUP BY ranked.user_id"""


def app_reads_sql(connection: Connection, tables: dict[str, ResolvedTable]) -> dict[str, str]:
    """The snapshot's reads of the app tables as standalone SELECTs (same binds as the
    snapshot), for checking a mapping before the pipeline's schema exists."""
    names = _Names(connection, tables)
    return {
        "users": f"WITH {BOUNDS} {_app_users_sql(names)}",
        "subscriptions": _subscription_sql(names),
    }


def snapshot_sql(
    connection: Connection,
    config: RetentionConfig,
    tables: dict[str, ResolvedTable] | None = None,
    *,
    only_listed_users: bool = False,
) -> str:
    """The statement that inserts the day's snapshot from the whole rollup up to the day, for
    every user or, with `only_listed_users`, for those bound as :only; `tables` resolves the
    mapping when None."""
    names = _Names(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    only = ONLY_THESE_USERS if only_listed_users else ""
    activity, actions = _per_user(s, only_listed_users)
    return f"""
        WITH {BOUNDS},
        app_users AS (
            {_app_users_sql(names, only)}
        ),
        activity AS (
            {activity}
        ),
        recent_actions AS ({_latest_actions_sql(actions)}),
        subscription AS (
            {_subscription_sql(names, only)}
        )
        {_insert_snapshot(s)}
        SELECT b.day, u.user_id, u.email, u.name, u.timezone, u.signed_up_at,
               b.day - (u.signed_up_at AT TIME ZONE :tz)::date,
               act.last_activity_at, act.previous_activity_at, coalesce(act.active_today, false),
               coalesce(ra.last_actions, '[]'::jsonb),
               coalesce(act.events_7d, 0), coalesce(act.sessions_7d, 0),
               coalesce(act.baseline_sessions, 0),
               round(coalesce(act.baseline_sessions, 0)::numeric
                     / CAST(:baseline_weeks AS integer), 2),
               coalesce(act.active_days_28d, 0),
               sub.status, sub.plan, sub.monthly_amount_cents
        FROM app_users AS u
        CROSS JOIN bounds AS b
        LEFT JOIN activity AS act USING (user_id)
        LEFT JOIN recent_actions AS ra USING (user_id)
        LEFT JOIN subscription AS sub USING (user_id)"""


def snapshot_parameters(config: RetentionConfig, day: date) -> dict[str, object]:
    """The values bound into the snapshot statement (and its standalone app reads)."""
    return {
        "day": day,
        "tz": config.timezone,
        "baseline_weeks": config.activity.baseline_weeks,
        "last_actions": config.activity.last_actions,
        "yearly": list(YEARLY_INTERVALS),
        "weekly": list(WEEKLY_INTERVALS),
    }


def _in_lookback(at: str) -> str:
    """Whether the timestamp `at` falls in the last actions' lookback before the day's end."""
    return f"(({at} AT TIME ZONE :tz)::date > b.day - {LAST_ACTIONS_LOOKBACK_DAYS})"


def rolled_forward_sql(
    connection: Connection,
    config: RetentionConfig,
    tables: dict[str, ResolvedTable] | None = None,
) -> str:
    """The statement that inserts the day's snapshot of every user the day before's snapshot
    holds, from that row and the rollup days entering or leaving each window: the day itself,
    the day 7 days back (leaves the 7-day sums, enters the baseline), the day the baseline
    leaves, the day 28 days back, and the day's actions. No read of the history before."""
    names = _Names(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    # A user who acted on the day gets the day before's list merged with the day's actions, user
    # by user (a few rows each, nothing older read). A list is newest first: anyone else's is
    # unchanged unless its last (oldest) action left the lookback.
    kept_actions = f"""CASE
                   WHEN t.user_id IS NOT NULL THEN (
                       SELECT jsonb_agg(jsonb_build_object('name', k.event_name, 'at', k.at)
                                        ORDER BY k.at DESC, k.event_name)
                       FROM (
                           SELECT event_name, max(at) AS at
                           FROM (
                               SELECT action->>'name', CAST(action->>'at' AS timestamptz)
                               FROM jsonb_array_elements(p.last_actions) AS action
                               UNION ALL
                               SELECT * FROM unnest(t.event_names, t.last_ats)
                           ) AS known(event_name, at)
                           WHERE {_in_lookback("at")}
                           GROUP BY event_name
                           ORDER BY at DESC, event_name
                           LIMIT CAST(:last_actions AS integer)
                       ) AS k)
                   WHEN coalesce({_in_lookback("(p.last_actions->-1->>'at')::timestamptz")}, true)
                       THEN p.last_actions
                   ELSE coalesce((
                       SELECT jsonb_agg(action ORDER BY position)
                       FROM jsonb_array_elements(p.last_actions)
                            WITH ORDINALITY AS listed(action, position)
                       WHERE {_in_lookback("(action->>'at')::timestamptz")}
                   ), '[]'::jsonb)
               END"""
    return f"""
        WITH {BOUNDS},
        app_users AS (
            {_app_users_sql(names)}
        ),
        previous AS (
            -- The bound value itself, not the bounds' column: only then does PostgreSQL read the
            -- day before's partition alone instead of every day's.
            SELECT p.* FROM {s}.user_activity_snapshot AS p
            WHERE p.partition_date = CAST(:day AS date) - 1
        ),
        todays_actions AS (
            SELECT x.user_id, array_agg(x.event_name) AS event_names,
                   array_agg(x.last_at) AS last_ats
            FROM {s}.action_daily AS x, bounds AS b
            WHERE x.day = b.day
            GROUP BY x.user_id
        ),
        window_edges AS (
            SELECT a.user_id,
                   max(greatest(a.last_event_at, a.last_session_at)) FILTER (WHERE a.day = b.day)
                       AS last_activity_today,
                   bool_or(a.day = b.day) AS active_today,
                   bool_or(a.day = b.day - 28) AS active_28_days_back,
                   coalesce(sum(a.event_count) FILTER (WHERE a.day = b.day), 0) AS events_today,
                   coalesce(sum(a.event_count) FILTER (WHERE a.day = b.day - 7), 0)
                       AS events_7_days_back,
                   coalesce(sum(a.session_count) FILTER (WHERE a.day = b.day), 0)
                       AS sessions_today,
                   coalesce(sum(a.session_count) FILTER (WHERE a.day = b.day - 7), 0)
                       AS sessions_7_days_back,
                   coalesce(sum(a.session_count) FILTER (
                       WHERE a.day = b.day - 7 - 7 * CAST(:baseline_weeks AS integer)), 0)
                       AS sessions_leaving_baseline
            FROM {s}.activity_daily AS a, bounds AS b
            WHERE a.day = ANY(ARRAY[b.day, b.day - 7, b.day - 28,
                                    b.day - 7 - 7 * CAST(:baseline_weeks AS integer)])
            GROUP BY a.user_id
        ),
        subscription AS (
            {_subscription_sql(names)}
        )
        {_insert_snapshot(s)}
        SELECT b.day, u.user_id, u.email, u.name, u.timezone, u.signed_up_at,
               b.day - (u.signed_up_at AT TIME ZONE :tz)::date,
               greatest(p.last_activity_at, e.last_activity_today), p.last_activity_at,
               coalesce(e.active_today, false),
               {kept_actions},
               p.events_7d + coalesce(e.events_today - e.events_7_days_back, 0),
               p.sessions_7d + coalesce(e.sessions_today - e.sessions_7_days_back, 0),
               p.baseline_sessions
                   + coalesce(e.sessions_7_days_back - e.sessions_leaving_baseline, 0),
               round((p.baseline_sessions
                      + coalesce(e.sessions_7_days_back - e.sessions_leaving_baseline, 0))::numeric
                     / CAST(:baseline_weeks AS integer), 2),
               p.active_days_28d + coalesce(e.active_today::integer
                                            - e.active_28_days_back::integer, 0),
               sub.status, sub.plan, sub.monthly_amount_cents
        FROM app_users AS u
        JOIN previous AS p USING (user_id)
        CROSS JOIN bounds AS b
        LEFT JOIN window_edges AS e USING (user_id)
        LEFT JOIN todays_actions AS t USING (user_id)
        LEFT JOIN subscription AS sub USING (user_id)"""


def users_new_to_the_day_before_sql(
    connection: Connection,
    config: RetentionConfig,
    tables: dict[str, ResolvedTable] | None = None,
) -> str:
    names = _Names(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    return f"""
        WITH {BOUNDS},
        app_users AS (
            {_app_users_sql(names)}
        )
        SELECT u.user_id FROM app_users AS u
        WHERE NOT EXISTS (SELECT FROM {s}.user_activity_snapshot AS p
                          WHERE p.partition_date = CAST(:day AS date) - 1
                            AND p.user_id = u.user_id)"""


def full_build_reason(connection: Connection, config: RetentionConfig, day: date) -> str | None:
    """Why the snapshot of `day` cannot be rolled forward from the day before's, or None."""
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    before = day - timedelta(days=1)
    built = connection.execute(
        text(f"""
            SELECT built_at, timezone, baseline_weeks, last_actions
            FROM {s}.snapshot_builds WHERE partition_date = :before"""),
        {"before": before},
    ).first()
    if built is None:
        return f"no snapshot of {before} to roll forward"
    settings = (config.timezone, config.activity.baseline_weeks, config.activity.last_actions)
    if (built.timezone, built.baseline_weeks, built.last_actions) != settings:
        return (
            f"the snapshot of {before} was built with another timezone, "
            "activity.baseline_weeks or activity.last_actions"
        )
    late = connection.execute(
        text(f"""
            SELECT min(day) FROM {s}.late_activity
            WHERE day <= :before AND noticed_at > :built_at"""),
        {"before": before, "built_at": built.built_at},
    ).scalar()
    if late is not None:
        return f"activity of {late} arrived after the snapshot of {before} was built"
    return None


def build_snapshot(
    connection: Connection,
    config: RetentionConfig,
    day: date,
    tables: dict[str, ResolvedTable] | None = None,
) -> SnapshotSummary:
    """Replace the snapshot of `day`, in the caller's transaction: rolled forward from the day
    before's when it can be (users it lacks are built in full), else built in full. `tables`
    (default: the mapping resolved here) says where the app's users and subscriptions are read."""
    schema = config.database.schema_
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    empty_day_partition(connection, schema, "user_activity_snapshot", day)
    parameters = snapshot_parameters(config, day)
    reason = full_build_reason(connection, config, day)
    if reason:
        connection.execute(text(snapshot_sql(connection, config, tables)), parameters)
        vanished = _vanished_since_yesterday(connection, s, day)
        path = "full"
    else:
        new_users = list(
            connection.execute(
                text(users_new_to_the_day_before_sql(connection, config, tables)), parameters
            ).scalars()
        )
        if new_users:
            connection.execute(
                text(snapshot_sql(connection, config, tables, only_listed_users=True)),
                {**parameters, "only": new_users},
            )
        rolled = connection.execute(
            text(rolled_forward_sql(connection, config, tables)), parameters
        )
        # Rolled forward are the day before's users still among the app's: the rest vanished.
        before = snapshot_user_count(connection, schema, day - timedelta(days=1))
        vanished = before - rolled.rowcount
        path = "incremental"
        reason = f"rolled forward from {day - timedelta(days=1)}; {len(new_users)} users new to it"
    analyze_day_partition(connection, schema, "user_activity_snapshot", day)
    connection.execute(
        text(f"""
            INSERT INTO {s}.snapshot_builds AS b
                (partition_date, built_at, path, timezone, baseline_weeks, last_actions)
            VALUES (:day, now(), :path, :tz, :baseline_weeks, :last_actions)
            ON CONFLICT (partition_date) DO UPDATE SET
                built_at = excluded.built_at, path = excluded.path, timezone = excluded.timezone,
                baseline_weeks = excluded.baseline_weeks, last_actions = excluded.last_actions"""),
        parameters | {"path": path},
    )
    row = connection.execute(
        text(f"""
            SELECT count(*),
                   count(*) FILTER (WHERE active_today),
                   count(*) FILTER (WHERE last_activity_at IS NULL),
                   count(*) FILTER (WHERE last_activity_at >= ((CAST(:day AS date) + 1)::timestamp
                                                               AT TIME ZONE :tz))
            FROM {s}.user_activity_snapshot WHERE partition_date = :day"""),
        {"day": day, "tz": config.timezone},
    ).one()
    return SnapshotSummary(*row, path=path, path_reason=reason, vanished=vanished)


@dataclass(frozen=True)
class Reconciliation:
    app_users: int
    snapshot_users: int
    missing: int


def reconcile_with_users(
    connection: Connection,
    config: RetentionConfig,
    day: date,
    snapshot_users: int,
    tables: dict[str, ResolvedTable] | None = None,
) -> Reconciliation:
    """Compare the snapshot of `day` (`snapshot_users` rows, one per user by its key) with the
    users the app had by the end of that day. Its rows come from those users, so equal counts
    mean none is missing; the users are matched one by one only when the counts differ."""
    names = _Names(connection, tables or resolve_app_tables(connection, config.database.tables))
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    created = names.timestamp("users", "created_at", "u")
    app = f"""SELECT {names.column("users", "id", "u")}::text AS user_id
              FROM {names.table("users")} AS u
              WHERE {created} < (CAST(:day AS date) + 1)::timestamp AT TIME ZONE :tz"""
    parameters = {"day": day, "tz": config.timezone}
    app_users = connection.execute(
        text(f"SELECT count(*) FROM ({app}) AS app"), parameters
    ).scalar_one()
    if app_users == snapshot_users:
        return Reconciliation(app_users, snapshot_users, 0)
    missing = connection.execute(
        text(f"""
            SELECT count(*) FROM ({app}) AS app
            WHERE NOT EXISTS (SELECT FROM {s}.user_activity_snapshot AS snap
                              WHERE snap.partition_date = :day AND snap.user_id = app.user_id)"""),
        parameters,
    ).scalar_one()
    return Reconciliation(app_users, snapshot_users, missing)


def _vanished_since_yesterday(connection: Connection, s: str, day: date) -> int | None:
    """`SnapshotSummary.vanished`, by matching the two days' users one by one."""
    return connection.execute(
        text(f"""
            SELECT CASE WHEN count(*) = 0 THEN NULL
                        ELSE count(*) FILTER (WHERE NOT EXISTS (
                            SELECT FROM {s}.user_activity_snapshot AS today
                            WHERE today.partition_date = :day
                              AND today.user_id = yesterday.user_id)) END
            FROM {s}.user_activity_snapshot AS yesterday
            WHERE yesterday.partition_date = CAST(:day AS date) - 1"""),
        {"day": day},
    ).scalar()


def snapshot_user_count(connection: Connection, schema: str, day: date) -> int:
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    return connection.execute(
        text(f"SELECT count(*) FROM {s}.user_activity_snapshot WHERE partition_date = :day"),
        {"day": day},
    ).scalar_one()
