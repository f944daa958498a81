"""Composing a day's emails from the audience and snapshot rows, as of the end of that day."""

from __future__ import annotations

import copy
import re
from datetime import UTC, date, datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from retention_pipeline.config import parse_config
from retention_pipeline.email.unsubscribe import verify_token
from retention_pipeline.sending import compose_emails, day_end, treatment_rows
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT
from retention_pipeline_tests.sending.support import (
    DAY,
    LOOP,
    SCHEMA,
    SECRET,
    SendingDatabase,
    User,
    add_users,
)


def compose(db: SendingDatabase, rows: list | None = None, **config_changes: object) -> list:
    config = db.config.model_copy(update=config_changes) if config_changes else db.config
    with db.engine.connect() as connection:
        return compose_emails(
            connection,
            schema=SCHEMA,
            config=config,
            loop=config.loop(LOOP),
            day=DAY,
            unsubscribe_secret=SECRET,
            rows=rows,
        )


def test_each_treated_user_gets_their_steps_template_and_variant(
    sending_db: SendingDatabase,
) -> None:
    add_users(
        sending_db.engine,
        [
            User("u1", "ada@example.com", variant="a"),
            User("u2", "bob@example.com", name="Bob Stone", variant="b"),
            User("u3", "cy@example.com", name="Cy", step=1),
            User("u4", "held@example.com", arm="holdout"),
        ],
    )

    emails = {email.to: email for email in compose(sending_db)}

    assert sorted(emails) == ["ada@example.com", "bob@example.com", "cy@example.com"]
    assert emails["ada@example.com"].subject == "Ada, we miss you at Acme"
    assert emails["bob@example.com"].subject == "Bob, your Acme work is right where you left it"
    assert emails["cy@example.com"].subject == "A 2-minute tip for getting more out of Acme"
    assert emails["ada@example.com"].key == "re_engagement:u1:2026-11-20:0"
    # Step 1 of an episode that started three days before.
    assert emails["cy@example.com"].key == "re_engagement:u3:2026-11-17:1"
    assert emails["cy@example.com"].tags == {"loop": LOOP, "step": "1", "variant": "a"}
    assert emails["bob@example.com"].tags == {"loop": LOOP, "step": "0", "variant": "b"}
    ada = emails["ada@example.com"]
    assert "https://app.acme.test" in ada.html
    assert "Acme Inc., 1 Example Street, Springfield" in ada.text


def test_time_is_measured_at_the_end_of_the_partition_day_not_now(
    sending_db: SendingDatabase,
) -> None:
    # 9 days and 14 hours before the end of 2026-11-20 (UTC); the wall clock says otherwise.
    add_users(
        sending_db.engine,
        [User("u1", "ada@example.com", last_activity_at=datetime(2026, 11, 11, 10, tzinfo=UTC))],
    )

    (email,) = compose(sending_db)

    assert "It's been 9 days since we last saw you in Acme." in email.text
    assert "The last time you were here, you:" in email.text
    assert "  - exported a report\n  - created a project\n" in email.text
    assert re.search(r"<li[^>]*>exported a report</li>", email.html)


def test_the_days_away_agree_in_the_readers_time_zone(sending_db: SendingDatabase) -> None:
    # Last seen at 20:00 UTC on the 10th: the 11th, 01:30 in Kolkata, where the end of the 20th
    # (UTC) is already the 21st. In both zones the two numbers of one email agree.
    seen = datetime(2026, 11, 10, 20, tzinfo=UTC)
    add_users(
        sending_db.engine,
        [
            User("u1", "ada@example.com", last_activity_at=seen, timezone="Asia/Kolkata"),
            User("u2", "bob@example.com", last_activity_at=seen, timezone=None),
        ],
    )

    kolkata, utc = compose(sending_db)

    assert "It's been 10 days since" in kolkata.text
    assert "It's been 10 days since" in utc.text


def test_the_absence_is_said_once_in_one_phrase(sending_db: SendingDatabase) -> None:
    # 20 days away: "It's been 20 days", never also "(2 weeks ago)".
    add_users(
        sending_db.engine,
        [User("u1", "ada@example.com", last_activity_at=datetime(2026, 10, 31, 10, tzinfo=UTC))],
    )

    (email,) = compose(sending_db)

    assert "It's been 20 days since we last saw you in Acme." in email.text
    assert "been 20 days since we last saw you" in email.html
    for body in (email.text, email.html):
        assert " ago" not in body
        assert "week" not in body


def test_composing_again_renders_the_same_bytes(sending_db: SendingDatabase) -> None:
    add_users(sending_db.engine, [User("u1", "ada@example.com"), User("u2", "bob@example.com")])

    assert compose(sending_db) == compose(sending_db)


def test_the_day_ends_at_midnight_in_the_loops_timezone() -> None:
    assert day_end(date(2026, 3, 8), "America/New_York") == datetime(2026, 3, 9, 4, tzinfo=UTC)
    assert day_end(date(2026, 11, 1), "America/New_York") == datetime(2026, 11, 2, 5, tzinfo=UTC)


def test_missing_and_hostile_names_render_safely(sending_db: SendingDatabase) -> None:
    add_users(
        sending_db.engine,
        [
            User("u1", "anon@example.com", name=None, last_activity_at=None, last_actions=()),
            User("u2", "evil@example.com", name="<script>alert(1)</script>"),
        ],
    )

    emails = {email.to: email for email in compose(sending_db)}

    anon = emails["anon@example.com"]
    assert anon.subject == "We miss you at Acme"
    assert re.search(r"<h1[^>]*>We miss you</h1>", anon.html)
    # Never active: counted from signup (2026-01-05), with no made-up last actions.
    assert "It's been 319 days" in anon.text  # calendar days to the 20th
    assert "everything in it are right where you left them" in anon.text
    evil = emails["evil@example.com"]
    assert "<script>" not in evil.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in evil.html


def test_every_email_carries_a_verifiable_one_click_unsubscribe(
    sending_db: SendingDatabase,
) -> None:
    add_users(sending_db.engine, [User("u1", "ada@example.com")])

    (email,) = compose(sending_db)

    assert email.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = email.headers["List-Unsubscribe"].strip("<>")
    assert url.startswith("https://app.acme.test/unsubscribe?token=")
    token = parse_qs(urlsplit(url).query)["token"][0]
    assert verify_token(SECRET, token) == ("u1", LOOP)
    assert url.replace("&", "&amp;") in email.html
    assert url in email.text


def test_the_loops_personalization_names_who_is_greeted_and_nothing_the_templates_ignore(
    sending_db: SendingDatabase,
) -> None:
    add_users(sending_db.engine, [User("u1", "ada@example.com")])
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = sending_db.url
    action = document["loops"][0]["steps"][0]["action"]

    # What no template reads, or a field the user record lacks, is refused when the
    # configuration loads, not ignored at send time.
    for personalization, refused in (
        ({"nick": "{{user.name}}"}, "personalization: nick: the templates read no such key"),
        ({"name": "{{user.nickname}}"}, "personalization: name: unknown user field 'nickname'"),
        ({"lastActivity": "{{user.email}}"}, "lastActivity: '{{user.email}}': the days away"),
        ({"name": "{{ user.name | title }}"}, "name: '{{ user.name | title }}' is neither"),
        ({"name": "{{user.name}}!"}, "name: '{{user.name}}!' is neither words nor a reference"),
        ({"name": "{user.name}"}, "name: '{user.name}' is neither words nor a reference"),
    ):
        action["personalization"] = personalization
        with pytest.raises(ValueError, match=re.escape(refused)):
            parse_config(document, environ={})
    # The shipped loop greets by the name and counts from the last activity.
    (shipped,) = compose(sending_db)
    assert "Hi Ada," in shipped.text
    action["personalization"] = {"name": "Captain Lovelace"}
    (greeted,) = compose(sending_db, loops=parse_config(document, environ={}).loops)
    assert "Hi Captain," in greeted.text


def test_the_audience_rows_are_the_treatment_arm_with_the_snapshot(
    sending_db: SendingDatabase,
) -> None:
    add_users(
        sending_db.engine, [User("u1", "a@example.com"), User("u2", "b@x.com", arm="holdout")]
    )
    with sending_db.engine.connect() as connection:
        rows = treatment_rows(connection, schema=SCHEMA, loop_name=LOOP, day=DAY)

    assert [(row["user_id"], row["step"], row["variant"]) for row in rows] == [("u1", 0, "a")]
    assert rows[0]["name"] == "Ada Lovelace"


def test_a_step_the_loop_no_longer_has_is_left_out_and_given_anyway_a_one_line_error(
    sending_db: SendingDatabase,
) -> None:
    add_users(sending_db.engine, [User("u1", "a@example.com", step=2), User("u2", "b@x.com")])
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = sending_db.url
    document["loops"][0]["steps"] = document["loops"][0]["steps"][:1]
    shortened = parse_config(document, environ={})

    assert [email.to for email in compose(sending_db, loops=shortened.loops)] == ["b@x.com"]
    with sending_db.engine.connect() as connection:
        every_row = treatment_rows(connection, schema=SCHEMA, loop_name=LOOP, day=DAY)
    with pytest.raises(
        ValueError,
        match="no step 're_engagement_last_call' any more, but the audience of 2026-11-20",
    ):
        compose(sending_db, every_row, loops=shortened.loops)
