"""The shipped templates render as real emails: escaped, inlined, with fallbacks."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import jinja2
import pytest

from retention_pipeline.email.render import (
    TEMPLATE_DIRECTORY,
    TEMPLATE_NAMES,
    UnknownTemplateError,
    render_email,
)

APP_URL = "https://app.acme.test/dashboard?from=email&utm=1"
UNSUBSCRIBE_URL = "https://acme.test/unsubscribe?token=abc.def"
ADDRESS = "Acme Analytics Inc., 548 Market St, San Francisco, CA 94104, USA"


def context(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "user": {"name": "Ada Lovelace", "email": "ada@example.com"},
        "days_inactive": 8,
        "last_actions": ["exported a report", "sent an invite", "viewed a dashboard"],
        "product_name": "Acme Analytics",
        "app_url": APP_URL,
        "unsubscribe_url": UNSUBSCRIBE_URL,
        "company_address": ADDRESS,
        "variant": "a",
    }
    values.update(overrides)
    return values


def style_blocks(html: str) -> list[str]:
    return re.findall(r"<style[^>]*>(.*?)</style>", html, flags=re.DOTALL)


def test_every_template_name_has_its_three_files() -> None:
    for name in TEMPLATE_NAMES:
        for part in ("subject.txt.j2", "body.html.j2", "body.txt.j2"):
            assert (TEMPLATE_DIRECTORY / name / part).is_file()


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_a_normal_user_gets_a_complete_email(template: str) -> None:
    email = render_email(template, context())

    assert email.subject and "\n" not in email.subject and email.subject == email.subject.strip()
    assert "Ada" in email.html and "Lovelace" not in email.html
    html_app_url = APP_URL.replace("&", "&amp;")
    assert f'href="{html_app_url}"' in email.html
    assert f'href="{UNSUBSCRIBE_URL}"' in email.html
    assert ADDRESS in email.html and ADDRESS in email.text
    assert "Acme Analytics" in email.html
    assert email.html.lstrip().lower().startswith("<!doctype html>")
    assert "Hi Ada," in email.text
    assert APP_URL in email.text and UNSUBSCRIBE_URL in email.text
    assert "{{" not in email.html + email.text + email.subject


def test_day_zero_names_the_last_actions() -> None:
    email = render_email("re_engagement", context())

    for phrase in ("exported a report", "sent an invite", "viewed a dashboard"):
        assert phrase in email.html
        assert f"- {phrase}" in email.text
    assert "8 days" in email.text


@pytest.mark.parametrize("template", ["re_engagement", "re_engagement_last_call"])
def test_a_reader_seen_today_is_not_told_zero_days(template: str) -> None:
    """A dormant reader whose sessions fell off may have been in on the day itself."""
    for days, said in ((0, "We haven't seen much of you in Acme Analytics lately"), (1, "1 day")):
        email = render_email(template, context(days_inactive=days))
        assert "0 days" not in email.text and "0 days" not in email.html
        assert said in email.text and said in email.html
    assert "8 days" in render_email(template, context()).text


def test_the_last_call_offers_to_stop() -> None:
    email = render_email("re_engagement_last_call", context())

    assert "stop" in email.subject.lower()
    assert email.html.count(f'href="{UNSUBSCRIBE_URL}"') == 2
    assert len(email.text) < 900


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_a_hostile_name_is_escaped_in_html(template: str) -> None:
    hostile = "<script>alert(1)</script>"

    email = render_email(template, context(user={"name": hostile, "email": "x@example.com"}))

    assert "<script" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize(
    "user", [{"name": None, "email": "x@example.com"}, {"name": "  ", "email": "x@example.com"}]
)
def test_a_missing_name_falls_back(template: str, user: dict[str, Any]) -> None:
    email = render_email(template, context(user=user, last_actions=[]))

    assert "Hi there," in email.text
    assert "None" not in email.html + email.text + email.subject
    assert not email.subject.startswith(",")
    assert " ," not in email.subject


def test_a_user_without_a_name_key_falls_back() -> None:
    email = render_email("re_engagement", context(user={"email": "x@example.com"}))

    assert "Hi there," in email.text
    assert email.subject == "We miss you at Acme Analytics"


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_css_is_inlined(template: str) -> None:
    html = render_email(template, context()).html

    assert 'style="' in html
    # The call-to-action button keeps its look without any stylesheet.
    assert re.search(r'<td class="cta-cell"[^>]*style="[^"]*background-color: #4f46e5', html)
    assert re.search(r'<a class="cta-link"[^>]*style="[^"]*color: #ffffff', html)
    # Only @media rules, which cannot be inlined, may remain in <style>.
    for block in style_blocks(html):
        assert re.sub(r"@media[^{]*\{(?:[^{}]*\{[^{}]*\})*[^{}]*\}", "", block).strip() == ""
    body = html[html.index("<body") :]
    assert body[: body.index(">")].count("style=") == 1


def test_variants_change_the_subject() -> None:
    subjects = {
        template: {render_email(template, context(variant=v)).subject for v in ("a", "b")}
        for template in TEMPLATE_NAMES
    }

    assert all(len(variants) == 2 for variants in subjects.values())


def test_a_subject_stays_on_one_line_whatever_the_name() -> None:
    email = render_email("re_engagement", context(user={"name": "Ada\r\nBcc: x", "email": "a@b.c"}))

    assert "\n" not in email.subject and "\r" not in email.subject


def test_an_unknown_template_names_itself_and_the_known_ones() -> None:
    with pytest.raises(UnknownTemplateError) as caught:
        render_email("win_back", context())

    message = str(caught.value)
    assert "'win_back'" in message
    for name in TEMPLATE_NAMES:
        assert name in message


def test_a_missing_required_variable_is_an_error_not_a_dead_link() -> None:
    values = context()
    del values["app_url"]

    with pytest.raises(jinja2.UndefinedError, match="app_url"):
        render_email("re_engagement", values)


BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_a_name_cannot_smuggle_controls_or_bidi_overrides_into_the_subject(template: str) -> None:
    hostile = {"name": "\x1b[31mAda\u202egnp.exe\u2066\x00\x7f", "email": "x@example.com"}

    subjects = [
        render_email(template, context(user=hostile, variant=variant)).subject
        for variant in ("a", "b")
    ]

    assert any("Adagnp.exe" in subject for subject in subjects)  # the name is still there
    for subject in subjects:
        assert not [c for c in subject if unicodedata.category(c) in ("Cc", "Zl", "Zp")]
        assert not set(subject) & BIDI_CONTROLS


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_a_name_longer_than_any_first_name_leaves_subject_and_greeting_their_usual_length(
    template: str,
) -> None:
    # A 10 kB name once made a 10,261-character subject.
    flood = {"name": "A" * 10_000 + " Lovelace", "email": "x@example.com"}
    for variant in ("a", "b"):
        email = render_email(template, context(user=flood, variant=variant))
        assert len(email.subject) < 80, email.subject
        assert "A" * 41 not in email.html + email.text
        assert "Hi there," in email.text

    longest = {"name": "B" * 40 + " Lovelace", "email": "x@example.com"}
    assert f"Hi {'B' * 40}," in render_email(template, context(user=longest)).text
