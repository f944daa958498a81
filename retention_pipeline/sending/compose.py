"""Render the emails of one day's audience, reproducibly.

Everything time-relative is measured against the end of the partition day in the loops' timezone,
never the wall clock, and everything else comes from rows stored for that day: a retry, or a
rerun a week later, renders the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, text

from retention_pipeline.config.models import USER_FIELD_REFERENCE
from retention_pipeline.email.humanize import (
    GENERIC_ACTION,
    calendar_days,
    describe_action,
    known_zone,
)
from retention_pipeline.email.message import OutgoingEmail
from retention_pipeline.email.render import render_email
from retention_pipeline.email.unsubscribe import make_token, unsubscribe_headers, unsubscribe_url
from retention_pipeline.sending.shards import WHOLE_LOOP, Shard, user_in_shard

if TYPE_CHECKING:
    from retention_pipeline.config.models import Loop, RetentionConfig, Step


def send_key(loop_name: str, user_id: str, episode_start: date, step: int) -> str:
    """The send log's key of one email: unique per loop, user, episode and step."""
    return f"{loop_name}:{user_id}:{episode_start.isoformat()}:{step}"


def day_end(day: date, timezone: str) -> datetime:
    """The first instant after `day` in `timezone`: the moment a partition is "as of"."""
    return datetime.combine(day + timedelta(days=1), time.min, tzinfo=ZoneInfo(timezone))


def loop_templates(loop: Loop) -> list[str]:
    """The templates of the loop's steps as configured: what its audience rows may be sent."""
    return [step.action.template for step in loop.steps]


def treatment_rows(
    connection: Connection,
    *,
    schema: str,
    loop_name: str,
    day: date,
    unclaimed_only: bool = False,
    shard: Shard = WHOLE_LOOP,
    limit: int | None = None,
    templates: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The loop's treatment rows of `reengagement_audience` for `day` whose users are in
    `shard`, with what the snapshot of that day knows about each user, ordered by user id (the
    first `limit` of them, when given). Also the rows `claim` pairs emails with.
    `unclaimed_only` leaves out rows already in the send log, whose content is fixed there.
    `templates`, the loop's steps as configured, leaves out the rows of a step taken out of the
    configuration since the day was built: it is sent to nobody any more.

    Members an hourly send skipped as stale (`sending.due`) are left out: the loop may send
    after its run again, with no quiet hours, but they stay unsent. Members due later (a
    local time or quiet hours the configuration no longer has) are not: the day's send follows
    the configuration as it is now, and sends them with the others."""
    s = connection.dialect.identifier_preparer.quote_schema(schema)
    unclaimed = f"""AND NOT EXISTS (
                SELECT FROM {s}.email_send_log AS log
                WHERE log.loop_name = a.loop_name AND log.user_id = a.user_id
                  AND log.episode_start = a.episode_start AND log.step = a.step)"""
    result = connection.execute(
        text(f"""
            SELECT a.user_id, a.email, a.episode_start, a.step, a.template, a.variant,
                   snap.name, snap.timezone, snap.signed_up_at, snap.last_activity_at,
                   coalesce(snap.last_actions, '[]'::jsonb) AS last_actions
            FROM {s}.reengagement_audience AS a
            LEFT JOIN {s}.user_activity_snapshot AS snap
                ON snap.partition_date = a.partition_date AND snap.user_id = a.user_id
            WHERE a.partition_date = :day AND a.loop_name = :loop AND a.arm = 'treatment'
              AND a.skipped_at IS NULL AND {user_in_shard("a.user_id")}
              {unclaimed if unclaimed_only else ""}
              {"AND a.template = ANY(CAST(:templates AS text[]))" if templates is not None else ""}
            ORDER BY a.user_id
            LIMIT :limit"""),
        {
            "day": day,
            "loop": loop_name,
            "limit": limit,
            "templates": list(templates or ()),
            **shard.params,
        },
    )
    return [dict(row) for row in result.mappings()]


def compose_emails(
    connection: Connection,
    *,
    schema: str,
    config: RetentionConfig,
    loop: Loop,
    day: date,
    unsubscribe_secret: str,
    unclaimed_only: bool = False,
    shard: Shard = WHOLE_LOOP,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> list[OutgoingEmail]:
    """One rendered email per treatment row of the loop's audience for `day` whose user is in
    `shard`, in user-id order; of `rows` (`treatment_rows` of the day), when given.

    Each renders the template of the row's step with the row's variant. The unsubscribe link and
    the RFC 8058 headers carry an HMAC token of the user and the loop, signed with
    `unsubscribe_secret`; the tags name the loop, step and variant. `unclaimed_only` skips the
    rows already claimed in the send log.
    """
    as_of = day_end(day, config.timezone)
    base_url = config.email.unsubscribe_url
    emails = []
    if rows is None:
        rows = treatment_rows(
            connection,
            schema=schema,
            loop_name=loop.name,
            day=day,
            unclaimed_only=unclaimed_only,
            shard=shard,
            templates=loop_templates(loop),
        )
    # A row's step is an index into its experiment period's steps, which may be ordered
    # otherwise than the configuration's now: the row's template is the step.
    steps = {step.action.template: step for step in loop.steps}
    for row in rows:
        step = steps.get(row["template"])
        if step is None:
            raise ValueError(
                f"loop {loop.name!r} has no step {row['template']!r} any more, but the audience "
                f"of {day} has user {row['user_id']!r} at it"
            )
        token = make_token(unsubscribe_secret, row["user_id"], loop.name)
        context = email_context(
            row,
            config=config,
            step=step,
            as_of=as_of,
            unsubscribe_link=unsubscribe_url(base_url, token),
        )
        rendered = render_email(step.action.template, context)
        emails.append(
            OutgoingEmail(
                key=send_key(loop.name, row["user_id"], row["episode_start"], row["step"]),
                to=row["email"],
                subject=rendered.subject,
                html=rendered.html,
                text=rendered.text,
                headers=unsubscribe_headers(base_url, token),
                tags={"loop": loop.name, "step": str(row["step"]), "variant": row["variant"]},
            )
        )
    return emails


def email_context(
    row: Mapping[str, Any],
    *,
    config: RetentionConfig,
    step: Step,
    as_of: datetime,
    unsubscribe_link: str,
) -> dict[str, Any]:
    """What `step`'s template sees for one user (`row`: the audience row joined with the
    snapshot), with every time-relative word computed against `as_of`, never the wall clock."""
    # Days away are counted from within the day, not from the next midnight: at the end of the
    # 20th, a user last seen on the 11th has been away 9 days, not 10.
    said_at = as_of - timedelta(microseconds=1)
    # An unknown zone is the loops', as the due time's (in SQL) is.
    reader_timezone = known_zone(row["timezone"]) or config.timezone
    user = {
        "id": row["user_id"],
        "email": row["email"],
        "name": row["name"],
        "timezone": row["timezone"],
        "last_activity_at": row["last_activity_at"],
    }
    personalization = _personalization(step, user)
    return {
        # The greeting's name is the step's personalization's, when it gives one.
        "user": {**user, "name": personalization.get("name", user["name"])},
        "personalization": personalization,
        "variant": row["variant"],
        "product_name": config.email.product_name,
        "app_url": config.email.app_url,
        "company_address": config.email.company_address,
        "unsubscribe_url": unsubscribe_link,
        "days_inactive": _days_inactive(row, said_at, reader_timezone),
        "last_actions": _phrases(row["last_actions"]),
    }


def _days_inactive(row: Mapping[str, Any], said_at: datetime, timezone: str) -> int:
    # Calendar days in the reader's time zone, the one measure of the absence an email gives
    # (never also "2 weeks ago"); a user never active counts from signup.
    since = row["last_activity_at"] or row["signed_up_at"]
    if since is None:
        return 0
    return max(0, calendar_days(since, said_at, timezone))


def _phrases(last_actions: list[Mapping[str, Any]]) -> list[str]:
    # "you: used the app" says nothing, and two event names may read the same.
    phrases: list[str] = []
    for action in last_actions:
        phrase = describe_action(str(action.get("name") or ""))
        if phrase != GENERIC_ACTION and phrase not in phrases:
            phrases.append(phrase)
    return phrases


def _personalization(step: Step, user: Mapping[str, Any]) -> dict[str, Any]:
    """The step's `personalization` entries with `{{user.FIELD}}` references resolved (the
    configuration admits only fields the user record has)."""
    values = {}
    for name, value in step.action.personalization.items():
        match = USER_FIELD_REFERENCE.match(value)
        values[name] = user[match.group(1)] if match else value
    return values
