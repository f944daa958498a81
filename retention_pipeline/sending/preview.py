"""Render one template for one user, as the send job would, to look at before sending."""

from __future__ import annotations

from datetime import date

from sqlalchemy import Connection, text

from retention_pipeline.config.models import Loop, RetentionConfig
from retention_pipeline.email.render import RenderedEmail, render_email
from retention_pipeline.email.unsubscribe import make_token, unsubscribe_url
from retention_pipeline.sending.compose import day_end, email_context


def preview_email(
    connection: Connection,
    *,
    config: RetentionConfig,
    loop: Loop,
    template: str,
    user_id: str,
    unsubscribe_secret: str,
    day: date | None = None,
    variant: str | None = None,
) -> tuple[date, RenderedEmail]:
    """The email `template` gives `user_id` as of `day` (default: the latest snapshot)."""
    steps = [index for index, step in enumerate(loop.steps) if step.action.template == template]
    if not steps:
        used = ", ".join(step.action.template for step in loop.steps)
        raise ValueError(
            f"--template: no step of loop {loop.name!r} uses {template!r} (its steps use: {used})"
        )
    step = loop.steps[steps[0]]
    s = connection.dialect.identifier_preparer.quote_schema(config.database.schema_)
    if day is None:
        day = connection.execute(
            text(f"SELECT max(partition_date) FROM {s}.user_activity_snapshot")
        ).scalar()
        if day is None:
            raise ValueError(
                "no snapshot yet: materialize retention/user_activity_snapshot "
                "(the daily_retention job) first"
            )
    row = (
        connection.execute(
            text(f"""SELECT user_id, email, name, timezone, signed_up_at, last_activity_at,
                        last_actions
                 FROM {s}.user_activity_snapshot
                 WHERE partition_date = :day AND user_id = :user"""),
            {"day": day, "user": str(user_id)},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise ValueError(f"--user: no user {user_id!r} in the snapshot of {day}")
    chosen = variant or step.action.variants[0]
    if chosen not in step.action.variants:
        raise ValueError(f"--variant: {chosen!r} is not one of {step.action.variants}")
    token = make_token(unsubscribe_secret, row["user_id"], loop.name)
    context = email_context(
        {**row, "step": steps[0], "variant": chosen},
        config=config,
        step=step,
        as_of=day_end(day, config.timezone),
        unsubscribe_link=unsubscribe_url(config.email.unsubscribe_url, token),
    )
    return day, render_email(template, context)
