"""Count the days a reader was away, and turn product event names into words for an email."""

from __future__ import annotations

import re
from datetime import UTC, datetime, tzinfo
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

GENERIC_ACTION = "used the app"

# Past tenses that "add -ed" gets wrong.
_IRREGULAR_PAST = {
    "begin": "began",
    "build": "built",
    "buy": "bought",
    "chat": "chatted",
    "commit": "committed",
    "drop": "dropped",
    "embed": "embedded",
    "find": "found",
    "get": "got",
    "make": "made",
    "pay": "paid",
    "plan": "planned",
    "read": "read",
    "reset": "reset",
    "run": "ran",
    "see": "saw",
    "send": "sent",
    "set": "set",
    "ship": "shipped",
    "stop": "stopped",
    "submit": "submitted",
    "tag": "tagged",
    "write": "wrote",
}
# fmt: off
_REGULAR_VERBS = (
    "accept", "add", "apply", "approve", "archive", "assign", "attach", "book", "browse", "cancel",
    "change", "click", "close", "comment", "complete", "configure", "connect", "copy", "create",
    "customize", "deactivate", "delete", "deploy", "disable", "downgrade", "download", "duplicate",
    "edit", "enable", "explore", "export", "filter", "finish", "follow", "generate", "import",
    "install", "integrate", "invite", "join", "launch", "like", "link", "merge", "move", "open",
    "order", "play", "post", "preview", "print", "publish", "purchase", "reach", "record", "redeem",
    "remove", "rename", "reopen", "reply", "request", "resolve", "restore", "review", "save",
    "schedule", "search", "share", "sort", "start", "subscribe", "sync", "test", "try", "uninstall",
    "unsubscribe", "update", "upgrade", "upload", "use", "verify", "view", "visit", "watch",
)
# fmt: on

# Whole event names (after joining particles) that are phrases of their own.
_PHRASES = {
    "login": "logged in",
    "logout": "logged out",
    "signin": "signed in",
    "signout": "signed out",
    "signup": "signed up",
    "checkout": "checked out",
    "pageview": "viewed a page",
}
_PARTICLE_VERBS = {"log": "log", "logged": "log", "sign": "sign", "signed": "sign"}
_PARTICLES = {"in", "out", "up"}

# Things that happen to a user rather than actions they took: not worth naming in an email.
_NOT_ACTIONS = {"bounced", "crashed", "errored", "expired", "failed", "timed"}
_NAMESPACES = {"app", "event", "evt", "product", "user", "users"}
_OWNED = {
    "account",
    "avatar",
    "billing",
    "card",
    "email",
    "organization",
    "password",
    "payment method",
    "plan",
    "preferences",
    "profile",
    "settings",
    "subscription",
    "team",
    "workspace",
}
_UNCOUNTABLE = {"access", "analytics", "billing", "content", "data", "feedback", "onboarding"}
_ACRONYMS = {"ai", "api", "crm", "csv", "json", "mfa", "pdf", "sdk", "sms", "sso", "ui", "url"}
# Letters whose names start with a vowel sound: "an SSO login", "a CSV export".
_AN_LETTERS = set("aefhilmnorsx")
_A_PREFIXES = ("eu", "one", "uni", "use", "usa", "uti")
_AN_PREFIXES = ("hour", "honest")


def _regular_past(verb: str) -> str:
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


_PAST = {verb: _regular_past(verb) for verb in _REGULAR_VERBS} | _IRREGULAR_PAST
_BASE_OF_PAST = {past: base for base, past in _PAST.items()}
# Leaving or undoing: the emails say the reader's work is all still there, so an action like
# these is never named to them ("Last time you deleted a project ... nothing was lost").
_DEPARTURES = (
    "cancel",
    "deactivate",
    "delete",
    "disable",
    "downgrade",
    "remove",
    "uninstall",
    "unsubscribe",
)
_DEPARTED = {_PAST[verb] for verb in _DEPARTURES} | {"cancelled", "left"}


def calendar_days(then: datetime, now: datetime, tz: str | None = None) -> int:
    """How many midnights in the reader's time zone `tz` (an IANA name) lie between `then` and
    `now`. An unknown or missing zone means UTC, because a bad value in a user's profile must not
    stop an email; naive datetimes are taken as UTC."""
    zone = _zone(tz)
    return (_aware(now).astimezone(zone).date() - _aware(then).astimezone(zone).date()).days


def describe_action(event_name: str) -> str:
    """A product event name as a phrase that completes "you ...": "exported a report".

    Understands `object.verbed` (`report.exported`), `verb_object` (`export_report`), camelCase and
    spaced names. Anything it cannot read becomes `GENERIC_ACTION`; it never raises.
    """
    words = _words(event_name if isinstance(event_name, str) else "")
    for word in words:
        if word in _PHRASES:
            return _PHRASES[word]
    if any(word in _NOT_ACTIONS for word in words):
        return GENERIC_ACTION
    verb_index = _verb_index(words)
    if verb_index is None:
        return GENERIC_ACTION
    verb = words[verb_index]
    past = _PAST.get(verb, verb)
    if past in _DEPARTED:
        return GENERIC_ACTION
    thing = words[:verb_index] + words[verb_index + 1 :]
    if len(thing) > 1 and thing[0] in _NAMESPACES:
        thing = thing[1:]
    if len(thing) > 4:
        return GENERIC_ACTION
    if not thing:
        return past
    return f"{past} {_noun_phrase(thing)}"


def known_zone(tz: str | None) -> str | None:
    """The zone database's name for `tz` in any case, as PostgreSQL reads it (the send time
    follows it), or None for no zone or an unknown one. A name the zone database holds as a
    directory (`America`) or too long for a file name raises an OSError, not a
    ZoneInfoNotFoundError."""
    if not tz:
        return None
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return _zone_names().get(tz.lower())
    return tz


def _zone(tz: str | None) -> tzinfo:
    known = known_zone(tz)
    return ZoneInfo(known) if known else UTC


@cache
def _zone_names() -> dict[str, str]:
    return {name.lower(): name for name in available_timezones()}


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _words(event_name: str) -> list[str]:
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", event_name)
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", spaced)
    # Digits mark ids and versions ("evt_123", "v2"), not words a reader wants to see.
    raw = [
        word
        for word in re.findall(r"[a-z0-9]+", spaced.lower())
        if not any(c.isdigit() for c in word)
    ]
    words: list[str] = []
    for word in raw:
        if words and word in _PARTICLES and words[-1] in _PARTICLE_VERBS:
            words[-1] = _PARTICLE_VERBS[words[-1]] + word
        else:
            words.append(word)
    return words


def _verb_index(words: list[str]) -> int | None:
    # A past tense names what happened ("invite_sent": sent, not invite); look from the end,
    # where `object.verbed` names put it.
    # So does a trailing word in -ed the lists lack ("order_placed": placed, not order).
    for index in range(len(words) - 1, -1, -1):
        if words[index] in _BASE_OF_PAST:
            return index
    last = words[-1] if words else ""
    if len(last) >= 5 and last.endswith("ed") and not last.endswith("eed"):
        return len(words) - 1
    for index, word in enumerate(words):
        if word in _PAST:
            return index
    return None


def _noun_phrase(words: list[str]) -> str:
    phrase = " ".join(words)
    head = words[-1]
    shown = " ".join(word.upper() if word in _ACRONYMS else word for word in words)
    if phrase in _OWNED or head in _OWNED:
        return f"your {shown}"
    if head in _UNCOUNTABLE or _is_plural(head):
        return shown
    return f"{_article(words[0])} {shown}"


def _is_plural(word: str) -> bool:
    return word.endswith("s") and not word.endswith(("ss", "us", "is"))


def _article(word: str) -> str:
    if word in _ACRONYMS:
        return "an" if word[0] in _AN_LETTERS else "a"
    if word.startswith(_AN_PREFIXES):
        return "an"
    if word[0] in "aeiou" and not word.startswith(_A_PREFIXES):
        return "an"
    return "a"
