"""Render the shipped email templates into a subject, an inlined-CSS HTML body and a text body."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import css_inline
from jinja2 import Environment, FileSystemLoader, StrictUndefined, Undefined, select_autoescape

TEMPLATE_NAMES: tuple[str, ...] = (
    "re_engagement",
    "re_engagement_follow_up",
    "re_engagement_last_call",
)
"""Directories under `templates/`, each with `subject.txt.j2`, `body.html.j2` and `body.txt.j2`."""

TEMPLATE_DIRECTORY = Path(__file__).parent / "templates"


class UnknownTemplateError(ValueError):
    def __init__(self, template: str) -> None:
        super().__init__(
            f"unknown email template {template!r}; known templates: {', '.join(TEMPLATE_NAMES)}"
        )
        self.template = template


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


# The longest first name a subject or greeting shows. Names come from the app's users table,
# where anything can be typed: a 10 kB "name" once made a 10,261-character subject.
FIRST_NAME_MAX_LENGTH = 40


def _first_name(name: object, fallback: str = "there") -> str:
    # Missing, empty, blank or longer than anyone's first name: all read as the fallback.
    if isinstance(name, Undefined) or name is None:
        return fallback
    words = str(name).split()
    return words[0] if words and len(words[0]) <= FIRST_NAME_MAX_LENGTH else fallback


# StrictUndefined makes a missing `app_url` or `unsubscribe_url` an error instead of a dead link;
# the templates default the optional values (name, last actions, variant) themselves.
_ENVIRONMENT = Environment(
    loader=FileSystemLoader(TEMPLATE_DIRECTORY),
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters["first_name"] = _first_name

# Mail clients drop or ignore <style>, so rules become style attributes; only @media rules, which
# cannot be inlined, stay in a <style> block as a progressive enhancement.
_INLINER = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)


# Bidirectional embeddings, overrides and isolates (and the marks that steer them): a user's name
# holding U+202E would show the rest of the subject reversed, a classic spoofing trick.
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _one_plain_line(text: str) -> str:
    """`text` without control characters (a line break would end the header) and bidirectional
    controls, its blanks collapsed to single spaces."""
    visible = "".join(
        " " if unicodedata.category(char) in ("Cc", "Zl", "Zp") else char for char in text
    )
    return " ".join(_BIDI_CONTROLS.sub("", visible).split())


def render_email(template: str, context: Mapping[str, Any]) -> RenderedEmail:
    """Render one of `TEMPLATE_NAMES` with `context` (see the templates for the variables).

    Raises `UnknownTemplateError` for a name not in `TEMPLATE_NAMES` and `jinja2.UndefinedError`
    when a required variable is missing.
    """
    if template not in TEMPLATE_NAMES:
        raise UnknownTemplateError(template)
    values = dict(context)
    subject = _ENVIRONMENT.get_template(f"{template}/subject.txt.j2").render(values)
    html = _ENVIRONMENT.get_template(f"{template}/body.html.j2").render(values)
    text = _ENVIRONMENT.get_template(f"{template}/body.txt.j2").render(values)
    return RenderedEmail(
        subject=_one_plain_line(subject),
        html=_INLINER.inline(html),
        text=re.sub(r"\n{3,}", "\n\n", text).strip() + "\n",
    )
