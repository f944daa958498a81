"""Words for people: how many days away, and what they did."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from retention_pipeline.email.humanize import (
    GENERIC_ACTION,
    calendar_days,
    describe_action,
    known_zone,
)

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


def test_days_follow_the_readers_calendar() -> None:
    then = datetime(2026, 11, 19, 22, 0, tzinfo=UTC)
    now = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)

    # Los Angeles: 14:00 on the 19th to 02:00 on the 20th. Tokyo: both on the 20th.
    assert calendar_days(then, now, "America/Los_Angeles") == 1
    assert calendar_days(then, now, "Asia/Tokyo") == 0


def test_naive_times_and_unknown_zones_mean_utc() -> None:
    naive_then = datetime(2026, 11, 18, 15, 0)
    assert calendar_days(naive_then, NOW, "Not/AZone") == 2
    assert calendar_days(naive_then, NOW, "") == 2
    # Names the zone database holds as a directory, or too long for a file name.
    assert calendar_days(naive_then, NOW, "America") == 2
    assert calendar_days(naive_then, NOW, "x" * 300) == 2


def test_a_readers_zone_is_known_as_postgresql_knows_it() -> None:
    """The email's days and its send time (in SQL) follow one zone: an unknown one is the
    loops' in both (`compose`)."""
    assert known_zone("Asia/Kolkata") == "Asia/Kolkata"
    assert known_zone("europe/paris") == "Europe/Paris"
    assert known_zone("America") is None
    assert known_zone("Not/AZone") is None
    assert known_zone(None) is None


def test_a_zone_in_other_case_is_the_readers_own() -> None:
    """PostgreSQL reads `europe/paris` as Europe/Paris, and sends at its 09:00."""
    then = datetime(2026, 11, 19, 23, 30, tzinfo=UTC)  # 00:30 on the 20th in Paris
    assert calendar_days(then, NOW, "europe/paris") == 0
    assert calendar_days(then, NOW, "Not/AZone") == 1


@pytest.mark.parametrize(
    ("event_name", "expected"),
    [
        ("report.exported", "exported a report"),
        ("export_report", "exported a report"),
        ("invite_sent", "sent an invite"),
        ("dashboard_viewed", "viewed a dashboard"),
        ("project.created", "created a project"),
        ("Report Exported", "exported a report"),
        ("reportExported", "exported a report"),
        ("APIKeyCreated", "created an API key"),
        ("user.signed_up", "signed up"),
        ("user_logged_in", "logged in"),
        ("login", "logged in"),
        ("page_view", "viewed a page"),
        ("subscription_upgraded", "upgraded your subscription"),
        ("user.profile_updated", "updated your profile"),
        ("reports_exported", "exported reports"),
        ("onboarding_completed", "completed onboarding"),
        ("csv_export_downloaded", "downloaded a CSV export"),
        ("team_member_invited", "invited a team member"),
        ("invoice.paid", "paid an invoice"),
        ("milestone_reached", "reached a milestone"),
        ("widget.frobnicated", "frobnicated a widget"),
        ("password_reset", "reset your password"),
        ("Order Placed", "placed an order"),
    ],
)
def test_describe_action(event_name: str, expected: str) -> None:
    assert describe_action(event_name) == expected


@pytest.mark.parametrize(
    "event_name",
    ["", "___", "evt_123_xyz", "$$$", "payment_failed", "trial.expired", "a.b.c.d.e_created", "🙂"],
)
def test_unreadable_or_non_action_names_fall_back(event_name: str) -> None:
    assert describe_action(event_name) == GENERIC_ACTION


@pytest.mark.parametrize(
    "event_name",
    [
        "project.deleted",
        "subscription_cancelled",
        "plan_downgraded",
        "app.uninstalled",
        "user.unsubscribed",
        "account_deactivated",
        "delete_workspace",
    ],
)
def test_leaving_or_undoing_is_never_named(event_name: str) -> None:
    """The emails follow the actions with "all of it is still there" and "nothing was lost"."""
    assert describe_action(event_name) == GENERIC_ACTION


def test_describe_action_never_raises_or_leaks_raw_names() -> None:
    for event_name in ["user__signed__up", "x" * 10_000, "a-b_c.d:e/f", "\x00\n\t", None, 42]:
        phrase = describe_action(event_name)  # type: ignore[arg-type]
        assert phrase
        assert "_" not in phrase and "." not in phrase and "\n" not in phrase
