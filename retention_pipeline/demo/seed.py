"""Set-based, deterministic generator of a demo SaaS history (see the package docstring)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files

import sqlalchemy as sa

from retention_pipeline.audience.build import HOLDOUT_BUCKET_SQL
from retention_pipeline.config.models import Loop
from retention_pipeline.recipients.addresses import mailbox_sql

HABITS: tuple[str, ...] = (
    "daily",
    "weekly",
    "fading",
    "churned",
    "never_activated",
    "resurrected",
)

# Churned users need a few weeks of use and then 30 days of silence (what the pipeline calls
# churned), and the oldest signups are `days` ago, so shorter windows would hardly show them.
MIN_DAYS = 56
MAX_DAYS = 3650
# Keys fed to the hash are (user_id * 8192 + day) * 32 + k; these bounds keep them in a bigint.
MAX_USERS = 100_000_000
# A bound against typos: 100 events per 20-minute slot is one every 12 seconds all day long.
MAX_EVENTS_PER_SLOT = 100

TABLES: tuple[str, ...] = ("users", "events", "sessions", "subscriptions")


@dataclass(frozen=True)
class DemoSummary:
    """What seed_demo wrote: row counts per table and users per habit."""

    users: int
    events: int
    sessions: int
    subscriptions: int
    habits: Mapping[str, int]


# A uniform draw in [0, 1) from (seed, key, salt). hashint8extended is the hash PostgreSQL uses
# for hash partitioning, so it must stay stable across major versions (15 here, 18 embedded);
# unlike random() it does not depend on scan order or parallel workers. Salts 0-23 are for draws
# per user, 24-39 per user-day, 40-63 per event or session, so different levels never share an
# input, and each draw has its own salt. The function is IMMUTABLE plain SQL, which the planner
# inlines: no call overhead.
_CREATE_UNIT_FUNCTION = """
CREATE FUNCTION pg_temp.demo_unit(key bigint, salt integer, seed bigint) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (hashint8extended(key * 64 + salt, seed) & 4503599627370495)::float8
             / 4503599627370496.0 $$
"""

# One row per user with everything later statements need to decide, day by day, whether the user
# is active. Day offsets (`a`, `signup_a`, `turn_a`, ...) count local calendar days back from the
# user's local date of `end`, so "7 days dormant" means the same in every timezone.
# turn_a / turn_len by pattern:
#   fading_dormant:  last active before turn_a, activity decays over turn_len days before that
#   fading_sessions: the single login of the last week happens on day turn_a
#   churned:         nothing after turn_a
#   resurrected:     came back on day turn_a after a gap of turn_len days
_CREATE_PLAN = """
CREATE TEMPORARY TABLE demo_seed_plan AS
WITH drawn AS (
    SELECT g.id,
           pg_temp.demo_unit(g.id, 0, CAST(:seed AS bigint)) AS u_signup,
           pg_temp.demo_unit(g.id, 1, CAST(:seed AS bigint)) AS u_tz,
           pg_temp.demo_unit(g.id, 5, CAST(:seed AS bigint)) AS u_habit,
           pg_temp.demo_unit(g.id, 6, CAST(:seed AS bigint)) AS u_fallback,
           pg_temp.demo_unit(g.id, 7, CAST(:seed AS bigint)) AS u_turn,
           pg_temp.demo_unit(g.id, 8, CAST(:seed AS bigint)) AS u_len,
           pg_temp.demo_unit(g.id, 9, CAST(:seed AS bigint)) AS u_intensity,
           pg_temp.demo_unit(g.id, 10, CAST(:seed AS bigint)) AS u_hour,
           pg_temp.demo_unit(g.id, 11, CAST(:seed AS bigint)) AS u_login,
           pg_temp.demo_unit(g.id, 12, CAST(:seed AS bigint)) AS u_weekday,
           pg_temp.demo_unit(g.id, 13, CAST(:seed AS bigint)) AS u_second_weekday
    FROM generate_series(1, CAST(:users AS bigint)) AS g(id)
),
placed AS (
    -- Stratified draw through the inverse CDF of exponential growth (rate 1.6 over the window,
    -- about 5x more signups per day at the end than at the start): user i lands in the i-th
    -- quantile, so ids increase with created_at as in a real app.
    SELECT d.*,
           CAST(:end AS timestamptz) - interval '1 second' * floor(
               (1 - ln(1 + (d.id - 1 + d.u_signup) / CAST(:users AS bigint) * (exp(1.6) - 1))
                    / 1.6)
               * CAST(:days AS integer) * 86400
           ) AS signup_at,
           CASE
               WHEN d.u_tz < 0.22 THEN 'UTC'
               WHEN d.u_tz < 0.42 THEN 'America/New_York'
               WHEN d.u_tz < 0.58 THEN 'Europe/Berlin'
               WHEN d.u_tz < 0.68 THEN 'America/Los_Angeles'
               WHEN d.u_tz < 0.78 THEN 'Europe/London'
               WHEN d.u_tz < 0.88 THEN 'Asia/Kolkata'
               WHEN d.u_tz < 0.93 THEN 'America/Sao_Paulo'
               WHEN d.u_tz < 0.97 THEN 'Australia/Sydney'
           END AS timezone
    FROM drawn d
),
aged AS (
    SELECT p.*,
           (CAST(:end AS timestamptz) AT TIME ZONE coalesce(p.timezone, 'UTC'))::date AS end_local,
           (CAST(:end AS timestamptz) AT TIME ZONE coalesce(p.timezone, 'UTC'))::date
               - (p.signup_at AT TIME ZONE coalesce(p.timezone, 'UTC'))::date AS signup_a
    FROM placed p
),
patterned AS (
    -- Habits that need history fall back to daily or weekly for recent signups, as new users are.
    SELECT a.*,
           CASE
               WHEN a.u_habit < 0.22 THEN 'daily'
               WHEN a.u_habit < 0.50 THEN 'weekly'
               WHEN a.u_habit < 0.62 THEN 'never_activated'
               WHEN a.u_habit < 0.69 AND a.signup_a >= 36 THEN 'fading_dormant'
               WHEN a.u_habit < 0.76 AND a.signup_a >= 36 THEN 'fading_sessions'
               WHEN a.u_habit < 0.90 AND a.signup_a >= 42 THEN 'churned'
               WHEN a.u_habit >= 0.90 AND a.signup_a >= 21 THEN 'resurrected'
               WHEN a.u_fallback < 0.4 THEN 'daily'
               ELSE 'weekly'
           END AS pattern
    FROM aged a
),
turned AS (
    SELECT p.*,
           CASE p.pattern
               WHEN 'fading_dormant' THEN 8 + floor(p.u_turn * 14)::integer
               WHEN 'fading_sessions' THEN 1 + floor(p.u_turn * 6)::integer
               WHEN 'churned' THEN 30 + floor(p.u_turn * (p.signup_a - 39))::integer
               WHEN 'resurrected' THEN 1 + floor(p.u_turn * 3)::integer
           END AS turn_a
    FROM patterned p
)
SELECT t.id,
       t.timezone,
       coalesce(t.timezone, 'UTC') AS zone,
       t.signup_at,
       t.end_local,
       t.signup_a,
       t.pattern,
       CASE WHEN t.pattern LIKE 'fading%' THEN 'fading' ELSE t.pattern END AS habit,
       t.turn_a,
       CASE t.pattern
           WHEN 'fading_dormant' THEN 7 + floor(t.u_len * 15)::integer
           -- The gap ends at least four days after signup so there is activity to resurrect from.
           WHEN 'resurrected'
               THEN 10 + floor(t.u_len * least(11, t.signup_a - t.turn_a - 13))::integer
       END AS turn_len,
       -- The most recent day the user can be active: lets each day's statement skip most users
       -- without drawing anything for them.
       CASE t.pattern
           WHEN 'fading_dormant' THEN t.turn_a + 1
           WHEN 'churned' THEN t.turn_a + 1
           WHEN 'fading_sessions' THEN t.turn_a
           WHEN 'never_activated'
               THEN t.signup_a + CASE WHEN t.u_login < 0.5 THEN 0 ELSE 1 END
           ELSE 0
       END AS last_a,
       CASE t.pattern
           WHEN 'daily' THEN 3 + floor(t.u_intensity * 5)::integer
           WHEN 'weekly' THEN 2 + floor(t.u_intensity * 4)::integer
           ELSE 2 + floor(t.u_intensity * 5)::integer
       END AS intensity,
       480 + floor(t.u_hour * 720)::integer AS pref_minute,
       floor(t.u_weekday * 7)::integer AS weekday_1,
       CASE
           WHEN t.u_second_weekday < 0.5
               THEN (floor(t.u_weekday * 7)::integer + 1 + floor(t.u_second_weekday * 12)::integer)
                    % 7
           ELSE -1
       END AS weekday_2
FROM turned t
"""

_FIRST_NAMES = [
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Priya",
    "Arjun",
    "Mei",
    "Hiro",
    "Sofia",
    "Lucas",
    "Amara",
    "Kwame",
    "Elena",
    "Mateo",
    "Fatima",
    "Omar",
    "Hannah",
    "Jonas",
    "Chloe",
    "Noah",
]
_LAST_NAMES = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Patel",
    "Sharma",
    "Chen",
    "Tanaka",
    "Rossi",
    "Silva",
    "Okafor",
    "Mensah",
    "Novak",
    "Garcia",
    "Haddad",
    "Schmidt",
    "Fischer",
    "Dubois",
    "Kim",
    "Nguyen",
    "Smith",
]


def _sql_text_array(values: tuple[str, ...] | list[str]) -> str:
    # Only ever called on the constant word lists above, never on caller input.
    return "ARRAY[" + ", ".join(f"'{value}'" for value in values) + "]"


_INSERT_USERS = f"""
INSERT INTO {{schema}}.users (id, email, name, timezone, created_at)
SELECT n.id,
       CASE
           WHEN n.first_name IS NULL THEN 'user.' || n.id || '@example.com'
           ELSE lower(n.first_name) || '.' || lower(n.last_name) || '.' || n.id || '@example.com'
       END,
       n.first_name || ' ' || n.last_name,
       n.timezone,
       n.signup_at
FROM (
    SELECT p.id, p.timezone, p.signup_at,
           CASE WHEN pg_temp.demo_unit(p.id, 4, CAST(:seed AS bigint)) >= 0.04
               THEN ({_sql_text_array(_FIRST_NAMES)})[
                   1 + floor(pg_temp.demo_unit(p.id, 2, CAST(:seed AS bigint))
                             * {len(_FIRST_NAMES)})::integer]
           END AS first_name,
           ({_sql_text_array(_LAST_NAMES)})[
               1 + floor(pg_temp.demo_unit(p.id, 3, CAST(:seed AS bigint))
                         * {len(_LAST_NAMES)})::integer] AS last_name
    FROM demo_seed_plan p
) n
ORDER BY n.id
"""

_USER_AGENTS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0",
)

# One statement per local day offset :a, oldest first, so ids grow day by day as in a real app.
# `active` holds the user-days with a login; sessions and events are both drawn from it. Within a
# user-day, logins and events come in time order and are numbered in that order, after the rows of
# the users before (a running sum in user order: the input is already in that order, so its sort
# is a linear check), continuing from the rows already written. Ids are therefore dense and do not
# depend on the plan, and no statement sorts the events themselves.
_INSERT_DAY = f"""
WITH candidates AS (
    SELECT p.*,
           CAST(:a AS integer) AS a,
           p.id * 8192 + CAST(:a AS integer) AS day_key,
           (p.end_local - CAST(:a AS integer) - DATE '1970-01-05') % 7 AS weekday,
           pg_temp.demo_unit(p.id * 8192 + CAST(:a AS integer), 24, CAST(:seed AS bigint))
               AS u_active
    FROM demo_seed_plan p
    WHERE CAST(:a AS integer) BETWEEN p.last_a AND p.signup_a
),
started AS (
    SELECT c.*,
           -- Around the user's preferred hour, +-3 h, local time; on the signup day, just after
           -- signing up.
           greatest(
               (c.end_local - c.a + make_interval(secs => c.pref_minute * 60 + floor(
                   (pg_temp.demo_unit(c.day_key, 27, CAST(:seed AS bigint)) - 0.5) * 21600
               ))) AT TIME ZONE c.zone,
               CASE WHEN c.a = c.signup_a THEN c.signup_at + interval '5 minutes' END
           ) AS start_at
    FROM candidates c
    WHERE c.a = c.signup_a
       OR CASE c.pattern
              WHEN 'daily' THEN c.u_active < 0.85
              WHEN 'weekly'
                  THEN c.u_active < CASE WHEN c.weekday IN (c.weekday_1, c.weekday_2)
                                         THEN 0.85 ELSE 0.03 END
              WHEN 'fading_dormant'
                  THEN c.u_active < 0.85 * least(1.0, (c.a - c.turn_a)::float8 / c.turn_len)
              WHEN 'fading_sessions'
                  THEN c.a = c.turn_a
                       OR (c.a >= 10 AND c.u_active < 0.85)
                       OR (c.a >= 7 AND c.u_active < 0.35)
              WHEN 'churned' THEN c.u_active < 0.6
              WHEN 'resurrected'
                  THEN c.a = c.turn_a
                       OR (c.a < c.turn_a AND c.u_active < 0.6)
                       OR (c.a > c.turn_a + c.turn_len AND c.u_active < 0.7)
              ELSE false
          END
),
sized AS (
    -- Event k falls in the k-th 20-minute slot after start_at; on the last day only the slots
    -- that end by :end are kept, so nothing lands after it.
    SELECT s.id AS user_id,
           s.a,
           s.signup_a,
           s.day_key,
           s.start_at,
           least(
               CASE
                   WHEN s.pattern = 'never_activated' THEN 0
                   WHEN s.pattern = 'fading_sessions' AND s.a = s.turn_a THEN 1
                   ELSE 1 + floor(pg_temp.demo_unit(s.day_key, 26, CAST(:seed AS bigint))
                                  * s.intensity)::integer
               END,
               floor(extract(epoch FROM CAST(:end AS timestamptz) - s.start_at) / 1200)::integer
           ) AS n_events
    FROM started s
    WHERE s.start_at <= CAST(:end AS timestamptz)
),
counted AS (
    SELECT z.*,
           CASE
               WHEN z.n_events > 1
                    AND pg_temp.demo_unit(z.day_key, 25, CAST(:seed AS bigint)) < 0.3 THEN 2
               ELSE 1
           END AS n_sessions
    FROM sized z
),
active AS MATERIALIZED (
    SELECT c.*,
           sum(c.n_sessions) OVER by_user - c.n_sessions AS sessions_before,
           sum(c.n_events) OVER by_user - c.n_events AS events_before
    FROM counted c
    WINDOW by_user AS (ORDER BY c.user_id ROWS UNBOUNDED PRECEDING)
),
new_sessions AS (
    -- The first login opens the day just before its first event, a second one comes mid-way.
    INSERT INTO {{schema}}.sessions (id, user_id, created_at, expires_at, ip_address, user_agent)
    SELECT prev.id + a.sessions_before + j.j,
           a.user_id,
           u.created_at,
           u.created_at + interval '30 days',
           ({_sql_text_array(["198.51.100.", "203.0.113.", "192.0.2."])})[
               1 + floor(u.u_ip * 3)::integer] || (1 + floor(u.u_ip * 762)::integer % 254),
           ({_sql_text_array(_USER_AGENTS)})[1 + floor(u.u_agent * {len(_USER_AGENTS)})::integer]
    FROM (SELECT coalesce(max(id), 0) AS id FROM {{schema}}.sessions) AS prev
    CROSS JOIN active a
    CROSS JOIN LATERAL generate_series(1, a.n_sessions) AS j(j)
    CROSS JOIN LATERAL (
        SELECT CASE
                   WHEN j.j = 1 THEN a.start_at - interval '1 second' * (20 + floor(w.u_when * 270))
                   ELSE a.start_at
                        + interval '1 second' * floor((0.3 + 0.5 * w.u_when) * (a.n_events * 1200))
               END AS created_at,
               pg_temp.demo_unit(w.device_key, 41, CAST(:seed AS bigint)) AS u_ip,
               pg_temp.demo_unit(w.device_key, 42, CAST(:seed AS bigint)) AS u_agent
        FROM (
            SELECT pg_temp.demo_unit(a.day_key * 32 + j.j, 40, CAST(:seed AS bigint)) AS u_when,
                   -- Mostly the user's usual device and network, sometimes another one.
                   CASE
                       WHEN pg_temp.demo_unit(a.day_key * 32 + j.j, 43, CAST(:seed AS bigint))
                            < 0.15 THEN a.day_key * 32 + j.j
                       ELSE a.user_id
                   END AS device_key
        ) w
    ) u
)
INSERT INTO {{schema}}.events (id, user_id, name, properties, created_at)
SELECT prev.id + (e.events_before + e.k - 1) * CAST(:events_per_slot AS integer) + e.r,
       e.user_id,
       e.name,
       CASE e.name
           WHEN 'dashboard.viewed' THEN jsonb_build_object(
               'dashboard_id', e.user_id * 16 + floor(e.u_detail * 6)::integer,
               'project_id', e.project_id)
           WHEN 'comment.added' THEN jsonb_build_object(
               'project_id', e.project_id,
               'length', 12 + floor(e.u_detail * 400)::integer)
           WHEN 'file.uploaded' THEN jsonb_build_object(
               'project_id', e.project_id,
               'file_type', ({_sql_text_array(["pdf", "png", "csv", "docx"])})[
                   1 + floor(e.u_detail * 4)::integer],
               'size_kb', 4 + floor(e.u_detail * 1e6)::integer % 20000)
           WHEN 'report.exported' THEN jsonb_build_object(
               'report_id', e.user_id * 16 + floor(e.u_detail * 8)::integer,
               'format', ({_sql_text_array(["csv", "pdf", "xlsx"])})[
                   1 + floor(e.u_detail * 3)::integer])
           WHEN 'project.created' THEN jsonb_build_object(
               'project_id', e.project_id,
               'template', ({_sql_text_array(["blank", "kanban", "roadmap", "crm"])})[
                   1 + floor(e.u_detail * 4)::integer])
           WHEN 'invite.sent' THEN jsonb_build_object(
               'project_id', e.project_id,
               'role', ({_sql_text_array(["member", "member", "viewer", "admin"])})[
                   1 + floor(e.u_detail * 4)::integer])
           ELSE jsonb_build_object(
               'provider', ({_sql_text_array(["slack", "github", "google_drive", "hubspot"])})[
                   1 + floor(e.u_detail * 4)::integer])
       END,
       e.created_at
FROM (SELECT coalesce(max(id), 0) AS id FROM {{schema}}.events) AS prev
CROSS JOIN (
    SELECT a.user_id,
           a.events_before,
           k.k,
           r.r,
           a.start_at + interval '1 second' * floor(
               (k.k - 1 + (r.r - 1 + pg_temp.demo_unit(a.day_key * 32 + k.k, 50, r.seed))
                          / CAST(:events_per_slot AS integer))
               * 1200
           ) AS created_at,
           -- The first thing a new user does is create a project.
           CASE
               WHEN a.a = a.signup_a AND k.k = 1 AND r.r = 1 THEN 'project.created'
               WHEN u.u_name < 0.40 THEN 'dashboard.viewed'
               WHEN u.u_name < 0.60 THEN 'comment.added'
               WHEN u.u_name < 0.74 THEN 'file.uploaded'
               WHEN u.u_name < 0.86 THEN 'report.exported'
               WHEN u.u_name < 0.92 THEN 'project.created'
               WHEN u.u_name < 0.97 THEN 'invite.sent'
               ELSE 'integration.connected'
           END AS name,
           a.user_id * 16 + floor(u.u_project * 4)::integer AS project_id,
           u.u_detail
    FROM active a
    CROSS JOIN LATERAL generate_series(1, a.n_events) AS k(k)
    -- Event r of a slot draws with the seed shifted by r - 1: the first is the event drawn
    -- without bursts, the others are independent of it.
    CROSS JOIN LATERAL (
        SELECT g.r, CAST(:seed AS bigint) + g.r - 1 AS seed
        FROM generate_series(1, CAST(:events_per_slot AS integer)) AS g(r)
    ) r
    CROSS JOIN LATERAL (
        SELECT pg_temp.demo_unit(a.day_key * 32 + k.k, 51, r.seed) AS u_name,
               pg_temp.demo_unit(a.day_key * 32 + k.k, 52, r.seed) AS u_project,
               pg_temp.demo_unit(a.day_key * 32 + k.k, 53, r.seed) AS u_detail
    ) u
) e
"""

# Stripe-like subscriptions; users on the free plan have no row. Trials last 14 days; Stripe
# keeps advancing the period of a past_due subscription while it retries the invoice, so active
# and past_due share the period arithmetic.
_INSERT_SUBSCRIPTIONS = """
INSERT INTO {schema}.subscriptions (
    id, user_id, stripe_subscription_id, stripe_customer_id, status, plan, amount_cents,
    currency, billing_interval, current_period_end, canceled_at, created_at, updated_at
)
SELECT row_number() OVER (ORDER BY t.created_at, t.user_id),
       t.user_id,
       'sub_' || substr(md5('sub:' || CAST(:seed AS text) || ':' || t.user_id), 1, 24),
       'cus_' || substr(md5('cus:' || CAST(:seed AS text) || ':' || t.user_id), 1, 14),
       t.status,
       t.plan,
       CASE t.plan WHEN 'starter' THEN 1900 WHEN 'pro' THEN 4900 ELSE 19900 END
           * CASE t.billing_interval WHEN 'year' THEN 10 ELSE 1 END,
       CASE t.timezone
           WHEN 'Europe/Berlin' THEN 'eur'
           WHEN 'Europe/London' THEN 'gbp'
           ELSE 'usd'
       END,
       t.billing_interval,
       CASE t.status
           WHEN 'trialing' THEN t.created_at + interval '14 days'
           WHEN 'canceled' THEN t.canceled_at
           ELSE t.renewed_at + t.period
       END,
       t.canceled_at,
       t.created_at,
       CASE t.status
           WHEN 'trialing' THEN t.created_at
           WHEN 'canceled' THEN t.canceled_at
           WHEN 'past_due'
               THEN least(t.renewed_at + interval '1 hour' * (1 + floor(t.u_dunning * 72)),
                          CAST(:end AS timestamptz))
           ELSE t.renewed_at
       END
FROM (
    SELECT s.*,
           CASE s.status
               WHEN 'canceled' THEN CASE
                   -- Churned users canceled within a few days of going quiet.
                   WHEN s.pattern = 'churned'
                       THEN CAST(:end AS timestamptz) - interval '1 day' * s.turn_a
                            + interval '1 second' * floor(s.u_cancel * 432000)
                   -- A trial that never converted.
                   WHEN s.pattern = 'never_activated' THEN s.created_at + interval '14 days'
                   ELSE s.created_at + (CAST(:end AS timestamptz) - s.created_at)
                                       * (0.3 + 0.7 * s.u_cancel)
               END
           END AS canceled_at,
           -- The last renewal at or before :end, in whole billing periods since created_at.
           s.created_at + s.period * CASE s.billing_interval
               WHEN 'year' THEN extract(year FROM age(CAST(:end AS timestamptz), s.created_at))
               ELSE extract(year FROM age(CAST(:end AS timestamptz), s.created_at)) * 12
                    + extract(month FROM age(CAST(:end AS timestamptz), s.created_at))
           END::integer AS renewed_at
    FROM (
        SELECT c.*,
               CASE WHEN c.billing_interval = 'year' THEN interval '1 year'
                   ELSE interval '1 month' END AS period,
               CASE
                   WHEN c.pattern = 'churned'
                       THEN CASE WHEN c.u_status < 0.9 THEN 'canceled' ELSE 'past_due' END
                   WHEN CAST(:end AS timestamptz) - c.created_at < interval '14 days'
                       THEN 'trialing'
                   WHEN c.pattern = 'never_activated' THEN 'canceled'
                   WHEN c.u_status < c.cancel_share THEN 'canceled'
                   WHEN c.u_status < c.cancel_share + c.past_due_share
                        AND CAST(:end AS timestamptz) - c.created_at >= interval '30 days'
                       THEN 'past_due'
                   ELSE 'active'
               END AS status
        FROM (
            SELECT p.id AS user_id,
                   p.pattern,
                   p.turn_a,
                   p.timezone,
                   least(p.signup_at + interval '1 second'
                             * floor(pg_temp.demo_unit(p.id, 15, CAST(:seed AS bigint)) * 172800),
                         CAST(:end AS timestamptz)) AS created_at,
                   CASE
                       WHEN pg_temp.demo_unit(p.id, 16, CAST(:seed AS bigint)) < 0.55 THEN 'starter'
                       WHEN pg_temp.demo_unit(p.id, 16, CAST(:seed AS bigint)) < 0.90 THEN 'pro'
                       ELSE 'business'
                   END AS plan,
                   CASE WHEN pg_temp.demo_unit(p.id, 17, CAST(:seed AS bigint)) < 0.2 THEN 'year'
                       ELSE 'month' END AS billing_interval,
                   pg_temp.demo_unit(p.id, 18, CAST(:seed AS bigint)) AS u_status,
                   pg_temp.demo_unit(p.id, 19, CAST(:seed AS bigint)) AS u_cancel,
                   pg_temp.demo_unit(p.id, 14, CAST(:seed AS bigint)) AS u_dunning,
                   CASE p.habit WHEN 'fading' THEN 0.20 WHEN 'resurrected' THEN 0.10
                       WHEN 'weekly' THEN 0.05 ELSE 0.02 END AS cancel_share,
                   CASE p.habit WHEN 'fading' THEN 0.25 WHEN 'resurrected' THEN 0.10
                       WHEN 'weekly' THEN 0.08 ELSE 0.05 END AS past_due_share
            FROM demo_seed_plan p
            WHERE pg_temp.demo_unit(p.id, 20, CAST(:seed AS bigint)) < CASE p.habit
                WHEN 'daily' THEN 0.70
                WHEN 'weekly' THEN 0.45
                WHEN 'fading' THEN 0.55
                WHEN 'churned' THEN 0.85
                WHEN 'resurrected' THEN 0.50
                ELSE 0.10
            END
        ) c
    ) s
) t
"""


@dataclass(frozen=True)
class EmailEffect:
    """The demo's true email effect. A user last active on (UTC) day L is dormant from day L+7,
    when the loop's audience takes them in; if the holdout draw (the same hash of the user's
    mailbox and `holdout_salt` the audience uses) puts them in the treatment, and they do not
    come back on their own before, they come back with probability `comeback_probability` on day
    L+9 to L+12 (two to five days after the email): one `dashboard.viewed` event tagged
    `{"utm_source": "re_engagement"}`. Users who never made an event (never activated) do not
    answer, and held-out users come back only on their own. So among users assigned the day
    they turn dormant, the true lift of the 7-day window is `comeback_probability` times the
    share who would not come back on their own within it."""

    comeback_probability: float = 0.5
    holdout_salt: str = "re_engagement"
    holdout_fraction: float = 0.1

    @classmethod
    def for_loop(cls, loop: Loop) -> EmailEffect:
        """The effect of the loop's email, treated as its holdout draw says."""
        return cls(holdout_salt=loop.holdout_salt, holdout_fraction=loop.holdout.fraction)


# After the habits, one statement over every quiet spell of every user: from a (UTC) day with a
# session (every active day has one) to the next. Drawn per spell (salts 28 and 29 of the
# user-day draws, keyed by the spell's first day), so the same arguments give the same rows.
_INSERT_COMEBACKS = f"""
WITH active_days AS (
    SELECT DISTINCT s.user_id, (s.created_at AT TIME ZONE 'UTC')::date AS day
    FROM {{schema}}.sessions AS s
),
spells AS (
    SELECT d.user_id, d.day AS last_day,
           lead(d.day) OVER (PARTITION BY d.user_id ORDER BY d.day) AS next_day,
           (d.user_id * 8192 + ((CAST(:end AS timestamptz) AT TIME ZONE 'UTC')::date - d.day))
               AS spell_key
    FROM active_days AS d
),
answers AS (
    SELECT sp.user_id, sp.next_day, p.pref_minute,
           sp.last_day + 9
               + floor(pg_temp.demo_unit(sp.spell_key, 28, CAST(:seed AS bigint)) * 4)::integer
               AS comeback_day
    FROM spells AS sp JOIN demo_seed_plan AS p ON p.id = sp.user_id
    JOIN {{schema}}.users AS u ON u.id = sp.user_id
    WHERE p.pattern <> 'never_activated'
      AND {HOLDOUT_BUCKET_SQL.format(mailbox=mailbox_sql("u.email"), salt="CAST(:salt AS text)")}
          >= CAST(:holdout_per_10000 AS integer)
      AND pg_temp.demo_unit(sp.spell_key, 29, CAST(:seed AS bigint))
          < CAST(:comeback_probability AS float8)
)
INSERT INTO {{schema}}.events (id, user_id, name, properties, created_at)
SELECT prev.id + row_number() OVER (ORDER BY c.created_at, c.user_id), c.user_id,
       'dashboard.viewed', CAST(:tag AS jsonb), c.created_at
FROM (SELECT coalesce(max(id), 0) AS id FROM {{schema}}.events) AS prev
CROSS JOIN (
    SELECT a.user_id, (a.comeback_day + make_interval(secs => a.pref_minute * 60))
               AT TIME ZONE 'UTC' AS created_at
    FROM answers AS a
    WHERE a.next_day IS NULL OR a.comeback_day < a.next_day
) AS c
WHERE c.created_at <= CAST(:end AS timestamptz)
"""

COMEBACK_TAG = {"utm_source": "re_engagement"}


def _schema_statements(schema: str) -> tuple[list[str], list[str]]:
    """Split schema.sql into (CREATE TABLE statements, CREATE INDEX statements)."""
    source = files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("--"))
    statements = [s.strip().replace("{schema}", schema) for s in code.split(";") if s.strip()]
    indexes = [s for s in statements if s.upper().startswith("CREATE INDEX")]
    tables = [s for s in statements if s not in indexes]
    return tables, indexes


# JIT would compile every day's statement anew (the planner overestimates generate_series rows),
# which cost more than the statement itself; each day's running sum over its user-days should
# stay in memory, and so should the sorts that build the indexes over tens of millions of rows.
_SEED_SETTINGS = {"jit": "off", "work_mem": "256MB", "maintenance_work_mem": "1GB"}


def _set_local(connection: sa.Connection, settings: Mapping[str, str]) -> dict[str, str]:
    """Set these settings for the current transaction and return their previous values."""
    previous = {}
    for name, value in settings.items():
        previous[name] = connection.execute(
            sa.text("SELECT current_setting(:name)"), {"name": name}
        ).scalar_one()
        connection.execute(
            sa.text("SELECT set_config(:name, :value, true)"), {"name": name, "value": value}
        )
    return previous


def seed_demo(
    connection: sa.Connection,
    *,
    users: int,
    days: int,
    seed: int,
    end: datetime,
    schema: str = "public",
    email_effect: EmailEffect = EmailEffect(),
    events_per_slot: int = 1,
) -> DemoSummary:
    """Create the demo app tables in `schema` if missing and fill them with `days` of history.

    The same arguments always write byte-identical rows, ids and timestamps included.
    `events_per_slot` turns each drawn event into that many events of the same 20-minute slot
    (the benchmarks' deep shape, about 30 events per active user-day at 10); at 1 the rows are
    those written without it. Everything
    runs inside PostgreSQL, in the caller's transaction; the caller commits. Raises ValueError on
    bad arguments or when the tables already hold rows.
    """
    if connection.dialect.name != "postgresql":
        raise ValueError(f"demo seeding needs PostgreSQL, not {connection.dialect.name}")
    if not 1 <= users <= MAX_USERS:
        raise ValueError(f"users must be between 1 and {MAX_USERS}, got {users}")
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise ValueError(f"days must be between {MIN_DAYS} and {MAX_DAYS}, got {days}")
    if end.tzinfo is None or end.utcoffset() is None:
        raise ValueError("end must be a timezone-aware datetime")
    if not 1 <= events_per_slot <= MAX_EVENTS_PER_SLOT:
        raise ValueError(
            f"events_per_slot must be between 1 and {MAX_EVENTS_PER_SLOT}, got {events_per_slot}"
        )

    quoted = connection.dialect.identifier_preparer.quote_schema(schema)
    tables, indexes = _schema_statements(quoted)
    connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
    for statement in tables:
        connection.exec_driver_sql(statement)

    nonempty = connection.execute(
        sa.text(
            "SELECT " + ", ".join(f"EXISTS (SELECT 1 FROM {quoted}.{table})" for table in TABLES)
        )
    ).one()
    for table, has_rows in zip(TABLES, nonempty, strict=True):
        if has_rows:
            raise ValueError(
                f"{schema}.{table} already holds rows; refusing to seed demo data twice "
                "(use an empty schema or drop the demo tables first)"
            )

    params = {"users": users, "days": days, "seed": seed, "end": end}
    previous_settings = _set_local(connection, _SEED_SETTINGS)

    connection.exec_driver_sql("DROP TABLE IF EXISTS pg_temp.demo_seed_plan")
    connection.exec_driver_sql("DROP FUNCTION IF EXISTS pg_temp.demo_unit(bigint, integer, bigint)")
    connection.exec_driver_sql(_CREATE_UNIT_FUNCTION)
    connection.execute(sa.text(_CREATE_PLAN), params)

    connection.execute(sa.text(_INSERT_USERS.format(schema=quoted)), params)
    oldest = connection.execute(sa.text("SELECT max(signup_a) FROM demo_seed_plan")).scalar_one()
    insert_day = sa.text(_INSERT_DAY.format(schema=quoted))
    for a in range(oldest, -1, -1):
        connection.execute(insert_day, {**params, "a": a, "events_per_slot": events_per_slot})
    connection.execute(
        sa.text(_INSERT_COMEBACKS.format(schema=quoted)),
        {
            **params,
            "salt": email_effect.holdout_salt,
            "holdout_per_10000": round(email_effect.holdout_fraction * 10000),
            "comeback_probability": email_effect.comeback_probability,
            "tag": json.dumps(COMEBACK_TAG),
        },
    )
    connection.execute(sa.text(_INSERT_SUBSCRIPTIONS.format(schema=quoted)), params)

    # Ids run densely from 1, so the highest id is the row count. Explicit ids leave the identity
    # sequences behind; move them on so later app inserts do not collide.
    counts = {}
    for table in TABLES:
        counts[table] = connection.execute(
            sa.text(f"SELECT coalesce(max(id), 0) FROM {quoted}.{table}")
        ).scalar_one()
        connection.execute(
            sa.text("SELECT setval(pg_get_serial_sequence(:table, 'id'), :next, false)"),
            {"table": f"{quoted}.{table}", "next": counts[table] + 1},
        )
    for statement in indexes:
        connection.exec_driver_sql(statement)
    habit_counts = dict(
        connection.execute(
            sa.text("SELECT habit, count(*) FROM demo_seed_plan GROUP BY habit")
        ).all()
    )

    connection.exec_driver_sql("DROP TABLE pg_temp.demo_seed_plan")
    connection.exec_driver_sql("DROP FUNCTION pg_temp.demo_unit(bigint, integer, bigint)")
    _set_local(connection, previous_settings)
    for table in TABLES:
        connection.exec_driver_sql(f"ANALYZE {quoted}.{table}")

    return DemoSummary(
        users=counts["users"],
        events=counts["events"],
        sessions=counts["sessions"],
        subscriptions=counts["subscriptions"],
        habits={habit: habit_counts.get(habit, 0) for habit in HABITS},
    )
