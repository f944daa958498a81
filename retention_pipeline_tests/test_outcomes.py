"""Outcomes, performance and decisions on real PostgreSQL: pending windows, late data, arms
where nobody returns, a loop without a holdout, and a paused step that is not sent the next
day."""

from __future__ import annotations

import copy
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import yaml
from sqlalchemy import create_engine, text

from retention_pipeline.config import ConfigError, parse_config
from retention_pipeline.outcomes.decisions import (
    Decision,
    decide,
    decide_day,
    decisions_in_force,
    store_decisions,
)
from retention_pipeline.outcomes.evaluate import evaluate_outcomes
from retention_pipeline.outcomes.performance import performance_metadata, performance_rows
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT
from retention_pipeline_tests.test_audience import add_users, audience, run_day

UTC = ZoneInfo("UTC")
D = date(2026, 11, 10)
LONG_AGO = datetime(2026, 10, 1, tzinfo=UTC)


def config_for(url: str, *, holdout: float, adjust: bool = True, success=None, send_at=None):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    loop = document["loops"][0]
    loop["name"] = "loop_0"
    loop["steps"][0]["condition"] = {"type": "segment", "segment": "dormant"}
    loop["holdout"] = {"fraction": holdout}
    loop["adjust"] = adjust
    if success:
        loop["success"] = success
    if send_at:
        loop["send_at"] = send_at
    return parse_config(document, environ={})


@pytest.fixture
def engine(app_database_url):
    engine = create_engine(app_database_url)
    install(engine, config_for(app_database_url, holdout=0.5))
    yield engine
    engine.dispose()


def visit(engine, users, day: date, hour: int = 12) -> None:
    with engine.begin() as connection:
        for user in users:
            connection.execute(
                text("INSERT INTO sessions (user_id, created_at) VALUES (:id, :at)"),
                {"id": user, "at": datetime(day.year, day.month, day.day, hour, tzinfo=UTC)},
            )


def evaluate(engine, config, day: date):
    update_rollup(engine, config)
    with engine.begin() as connection:
        return evaluate_outcomes(connection, config=config, loop=config.loops[0], day=day)


def outcomes(engine, window: int) -> dict[str, tuple[str, date | None]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT user_id, status, returned_on FROM retention.reengagement_outcomes "
                "WHERE window_days = :window"
            ),
            {"window": window},
        ).all()
    return {user: (status, returned_on) for user, status, returned_on in rows}


def test_windows_stay_pending_until_over_and_late_data_updates_them(engine, app_database_url):
    config = config_for(app_database_url, holdout=0.5)
    add_users(engine, range(1, 21), last_seen=LONG_AGO)
    run_day(engine, config, D)
    visit(engine, ["1", "2"], D + timedelta(days=2))

    evaluate(engine, config, D + timedelta(days=1))
    assert {status for status, _ in outcomes(engine, 7).values()} == {"pending"}

    evaluate(engine, config, D + timedelta(days=3))
    seven = outcomes(engine, 7)
    assert seven["1"] == seven["2"] == ("returned", D + timedelta(days=2))
    assert outcomes(engine, 30)["1"] == ("returned", D + timedelta(days=2))
    assert seven["3"] == ("pending", None)

    evaluate(engine, config, D + timedelta(days=7))
    assert outcomes(engine, 7)["3"] == ("not_returned", None)
    assert outcomes(engine, 14)["3"] == ("pending", None)

    # A session of day D+5 that reaches the database only now: the next day's run sees it.
    visit(engine, ["3"], D + timedelta(days=5))
    evaluate(engine, config, D + timedelta(days=8))
    assert outcomes(engine, 7)["3"] == ("returned", D + timedelta(days=5))
    # Re-running an older day does not undo what a newer evaluation knew.
    evaluate(engine, config, D + timedelta(days=4))
    assert outcomes(engine, 7)["3"] == ("returned", D + timedelta(days=5))
    assert outcomes(engine, 7)["4"] == ("not_returned", None)

    evaluate(engine, config, D + timedelta(days=30))
    assert {status for status, _ in outcomes(engine, 30).values()} == {
        "returned",
        "not_returned",
    }


def test_named_events_count_as_success_only_when_they_happen(engine, app_database_url):
    config = config_for(
        app_database_url, holdout=0.5, success={"type": "events", "events": ["project.created"]}
    )
    add_users(engine, ["1", "2"], last_seen=LONG_AGO)
    run_day(engine, config, D)
    with engine.begin() as connection:
        for user, name in (("1", "project.created"), ("2", "dashboard.viewed")):
            connection.execute(
                text("INSERT INTO events (user_id, name, created_at) VALUES (:id, :name, :at)"),
                {"id": user, "name": name, "at": datetime(2026, 11, 12, 10, tzinfo=UTC)},
            )
    evaluate(engine, config, D + timedelta(days=7))
    seven = outcomes(engine, 7)
    assert seven["1"] == ("returned", D + timedelta(days=2))
    assert seven["2"] == ("not_returned", None)


def test_arms_where_nobody_returns_still_get_an_interval(engine, app_database_url):
    config = config_for(app_database_url, holdout=0.5)
    add_users(engine, range(1, 61), last_seen=LONG_AGO)
    run_day(engine, config, D)
    evaluate(engine, config, D + timedelta(days=7))
    with engine.connect() as connection:
        rows = performance_rows(connection, "retention", config.loops[0], through=D)
    (overall,) = [
        row for row in rows if row.step is None and not row.first_episodes and row.window_days == 7
    ]
    assert overall.treatment.returned == overall.holdout.returned == 0
    assert overall.treatment.finished + overall.holdout.finished == 60
    lift, lower, upper = overall.lift
    assert lift == 0 and -0.25 < lower < 0 < upper < 0.25
    assert overall.verdict.startswith("+0.0 points, 95% CI -")
    assert overall.evidence == "undecided (30 of 100 outcomes)"
    # The 30-day window is not over: nothing to say yet.
    (later,) = [
        row for row in rows if row.step is None and not row.first_episodes and row.window_days == 30
    ]
    assert later.verdict == "not enough data yet (0 of 10 outcomes)"


def test_first_episodes_are_measured_apart_from_repeat_ones(engine, app_database_url):
    """A user keeps their arm into later episodes, where the treated who unsubscribed are gone
    and their held-out counterparts are not: the loop's line of first episodes alone is the one
    the loop's own emails cannot bias."""
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = app_database_url
    loop = document["loops"][0]
    loop.update(name="loop_0", holdout={"fraction": 0.5}, cooldown_days=0)
    loop["steps"][0]["condition"] = {"type": "segment", "segment": "dormant"}
    config = parse_config(document, environ={})
    users = [str(user) for user in range(1, 101)]
    add_users(engine, range(1, 101), last_seen=LONG_AGO)
    run_day(engine, config, D)  # every user's first episode
    visit(engine, users, D + timedelta(days=1))  # all back: the episodes end
    later = D + timedelta(days=9)  # away 7 days again: a second episode each
    run_day(engine, config, later)
    evaluate(engine, config, later + timedelta(days=7))
    with engine.connect() as connection:
        rows = performance_rows(connection, "retention", config.loops[0])
    (every,) = [
        row for row in rows if row.step is None and not row.first_episodes and row.window_days == 7
    ]
    (first,) = [
        row for row in rows if row.step is None and row.first_episodes and row.window_days == 7
    ]
    assert every.treatment.assigned + every.holdout.assigned == 200
    assert first.treatment.assigned + first.holdout.assigned == 100
    assert first.scope == "loop, first episodes"
    # Everyone came back within the first episodes' window, nobody within the second's.
    assert first.treatment.rate == first.holdout.rate == 1.0
    assert every.treatment.rate == every.holdout.rate == 0.5
    assert "loop_0/loop_first_episodes/7d/treated_outcomes" in performance_metadata(rows)


def test_a_days_performance_built_again_later_counts_only_the_windows_over_by_then(
    engine, app_database_url
):
    """The performance (and its decisions) of D + 3, re-materialized once D + 7's outcomes are
    in, is what that day's run gave: the 7-day windows of D were not over then."""
    from retention_pipeline.outcomes.decisions import decide_day

    config = config_for(app_database_url, holdout=0.5)
    add_users(engine, range(1, 61), last_seen=LONG_AGO)
    run_day(engine, config, D)
    visit(engine, [str(user) for user in range(1, 31)], D + timedelta(days=2))
    evaluate(engine, config, D + timedelta(days=7))

    def seven_day_windows_finished(day: date) -> int:
        with engine.begin() as connection:
            rows, _ = decide_day(connection, "retention", config.loops[0], day)
        (overall,) = [
            row
            for row in rows
            if row.step is None and not row.first_episodes and row.window_days == 7
        ]
        return overall.treatment.finished + overall.holdout.finished

    assert seven_day_windows_finished(D + timedelta(days=3)) == 0
    assert seven_day_windows_finished(D + timedelta(days=7)) == 60


def test_a_loop_without_a_holdout_reports_the_lift_as_unavailable(engine, app_database_url):
    config = config_for(app_database_url, holdout=0.0)
    add_users(engine, range(1, 31), last_seen=LONG_AGO)
    run_day(engine, config, D)
    visit(engine, ["1"], D + timedelta(days=1))
    evaluate(engine, config, D + timedelta(days=7))
    with engine.connect() as connection:
        rows = performance_rows(connection, "retention", config.loops[0], through=D)
    (overall,) = [
        row for row in rows if row.step is None and not row.first_episodes and row.window_days == 7
    ]
    assert overall.holdout.assigned == 0 and overall.treatment.returned == 1
    assert overall.lift is None and overall.relative_lift is None
    assert overall.verdict == "no holdout: lift unavailable"
    metadata = performance_metadata(rows)
    assert metadata["loop_0/loop/7d/treated_return_rate"] == pytest.approx(100 / 30, abs=0.01)
    assert not any("lift" in key for key in metadata)


def test_a_harmful_step_is_paused_and_not_sent_the_next_day(
    engine, app_database_url, tmp_path, capsys
):
    config = config_for(app_database_url, holdout=0.5)
    add_users(engine, range(1, 301), last_seen=LONG_AGO)
    run_day(engine, config, D)
    held_out = [user for user, _, _, arm, _, _ in audience(engine, D) if arm == "holdout"]
    # Everyone held out comes back, no treated user does: the email does harm.
    visit(engine, held_out, D + timedelta(days=2))
    decided_on = D + timedelta(days=7)
    evaluate(engine, config, decided_on)
    with engine.begin() as connection:
        rows = performance_rows(connection, "retention", config.loops[0], through=decided_on)
        decisions = decide(config.loops[0], rows, decided_on)
        store_decisions(connection, "retention", config.loops[0], decided_on, decisions)
    assert decisions[0].paused and decisions[0].reason.startswith("paused: lift -100.0 points")
    assert decisions[0].evidence["lift"]["holdout_returned"] == len(held_out)
    assert not decisions[1].paused and not decisions[2].paused

    # New users go dormant: the next day nobody gets the paused first step.
    add_users(engine, range(1001, 1041), last_seen=datetime(2026, 11, 9, 12, tzinfo=UTC))
    next_day = decided_on + timedelta(days=1)
    summary = run_day(engine, config, next_day)
    assert summary.excluded["step_paused"] == 40
    assert all(step != 0 for _, step, _, _, _, _ in audience(engine, next_day))
    # With adjust: false the loop ignores its decisions.
    unadjusted = config_for(app_database_url, holdout=0.5, adjust=False)
    assert run_day(engine, unadjusted, next_day).excluded["step_paused"] == 0
    assert {row[1] for row in audience(engine, next_day) if int(row[0]) > 1000} == {0}
    # `report` says so of the pause it keeps on record.
    from retention_pipeline.cli import main

    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = app_database_url
    document["loops"][0].update(name="loop_0", adjust=False)
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(document))
    capsys.readouterr()
    assert main(["report", "--config", str(path)]) == 0
    reported = capsys.readouterr().out
    assert "adjust: false; variants share traffic evenly, no step is paused" in reported
    assert f"decided {decided_on} (not applied: adjust: false): " in reported, reported


def test_the_decision_evidence_reads_as_the_pause_rule_decides():
    """`report` shows the evidence the pause acts on: not "worse than no email" where both arms
    are short of the pause rule's outcomes and the step is left alone."""
    from retention_pipeline.outcomes.decisions import harmful
    from retention_pipeline.outcomes.performance import ArmCounts, PerformanceRow

    def row(treated_returned: int, control_returned: int, each: int) -> PerformanceRow:
        return PerformanceRow(
            loop="loop_0",
            step=0,
            template="re_engagement",
            variant=None,
            window_days=7,
            treatment=ArmCounts(assigned=each, finished=each, returned=treated_returned),
            holdout=ArmCounts(assigned=each, finished=each, returned=control_returned),
        )

    few = row(5, 30, 60)
    assert few.always_valid[1] < 0 and not harmful(5, 60, 30, 60)
    assert few.evidence == "undecided (60 of 100 outcomes)"
    many = row(17, 100, 200)
    assert harmful(17, 200, 100, 200)
    assert many.evidence == "worse than no email"


def test_a_paused_step_stays_paused_for_the_period_when_its_interval_moves_back(
    engine, app_database_url
):
    """The pause rule's error bound holds for a rule that stops at its first crossing: a pause
    taken back when outcomes still pending nudge the interval over zero would send a harmful
    step again."""
    config = config_for(app_database_url, holdout=0.5)
    loop = config.loops[0]
    add_users(engine, range(1, 301), last_seen=LONG_AGO)
    run_day(engine, config, D)
    decided_on = D + timedelta(days=7)
    evaluate(engine, config, decided_on)  # nobody came back in either arm: not harmful

    def first_step_paused_on(connection, day: date) -> None:
        pause = Decision(0, day, {"a": 1.0}, True, "paused: ...", {})
        store_decisions(connection, "retention", loop, day, [pause])

    with engine.begin() as connection:
        first_step_paused_on(connection, decided_on - timedelta(days=1))
        _, decisions = decide_day(connection, "retention", loop, decided_on)
    (first,) = [decision for decision in decisions if decision.step == 0]
    assert first.paused
    assert first.reason.startswith(
        f"paused since {decided_on - timedelta(days=1)}, for the rest of the period; today: "
    )
    with engine.connect() as connection:
        assert decisions_in_force(connection, "retention", loop, decided_on + timedelta(days=1), 1)[
            0
        ].paused
    # A day decided again before a later pause decides from its own outcomes.
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM retention.campaign_decisions"))
        first_step_paused_on(connection, decided_on + timedelta(days=1))
        _, again = decide_day(connection, "retention", loop, decided_on)
    assert [decision.paused for decision in again if decision.step == 0] == [False]


def test_the_audience_follows_the_decided_variant_shares(engine, app_database_url):
    config = config_for(app_database_url, holdout=0.1)
    loop = config.loops[0]
    add_users(engine, range(1, 401), last_seen=LONG_AGO)
    shares = {"a": 0.1, "b": 0.9}
    with engine.begin() as connection:
        store_decisions(
            connection,
            "retention",
            loop,
            D - timedelta(days=1),
            [Decision(0, D - timedelta(days=1), shares, False, "b leads", {})],
        )
    run_day(engine, config, D)
    rows = audience(engine, D)
    share_b = sum(row[4] == "b" for row in rows) / len(rows)
    holdout = {row[0] for row in rows if row[3] == "holdout"}
    assert 0.85 < share_b < 0.95
    run_day(engine, config, D)
    assert audience(engine, D) == rows  # deterministic for a user and a decision

    run_day(engine, config_for(app_database_url, holdout=0.1, adjust=False), D)
    even = audience(engine, D)
    assert 0.4 < sum(row[4] == "b" for row in even) / len(even) < 0.6
    # The shares never move a user between arms.
    assert {row[0] for row in even if row[3] == "holdout"} == holdout


def test_a_success_query_decides_who_came_back(engine, app_database_url):
    from retention_pipeline.outcomes.evaluate import success_days
    from retention_pipeline.segments.conditions import ConditionError

    query = (
        "SELECT user_id, created_at AS at FROM public.events "
        "WHERE name LIKE 'project.%' -- a project made"
    )
    config = config_for(
        app_database_url, holdout=0.5, success={"type": "query", "query": query, "timeout": "5s"}
    )
    loop = config.loops[0]
    add_users(engine, ["1", "2"], last_seen=LONG_AGO)
    run_day(engine, config, D)
    with engine.begin() as connection:
        for user, name in (("1", "project.created"), ("2", "dashboard.viewed")):
            connection.execute(
                text("INSERT INTO events (user_id, name, created_at) VALUES (:id, :name, :at)"),
                {"id": user, "name": name, "at": datetime(2026, 11, 13, 10, tzinfo=UTC)},
            )
    day = D + timedelta(days=7)
    successes = success_days(engine, "retention", loop, loop.success, day, "UTC")
    assert successes == [("1", D + timedelta(days=3))]
    with engine.begin() as connection:
        evaluate_outcomes(connection, config=config, loop=loop, day=day, successes=successes)
    assert outcomes(engine, 7) == {
        "1": ("returned", D + timedelta(days=3)),
        "2": ("not_returned", None),
    }

    wrong = config_for(
        app_database_url,
        holdout=0.5,
        success={"type": "query", "query": "SELECT user_id FROM public.events"},
    ).loops[0]
    with pytest.raises(ConditionError, match=r"^loops.loop_0.success.query: returns no at col"):
        success_days(engine, "retention", wrong, wrong.success, day, "UTC")
    writes = config_for(
        app_database_url,
        holdout=0.5,
        success={"type": "query", "query": "DELETE FROM public.events RETURNING user_id, 1 AS at"},
    ).loops[0]
    with pytest.raises(ConditionError, match="must be a single SELECT"):
        success_days(engine, "retention", writes, writes.success, day, "UTC")


@pytest.mark.parametrize(
    ("loop_patch", "message"),
    [
        ({"windows": ["7d", "3d"]}, "loops.0.windows: windows must grow, each once (7d, 3d)"),
        ({"windows": ["36h"]}, "loops.0.windows: '36h' must be a whole number of days, like 7d"),
        ({"success": {"type": "events"}}, "loops.0.success.events: Field required"),
        (
            {"success": {"type": "query", "query": "SELECT 1", "timeout": "soon"}},
            "loops.0.success.timeout: 'soon' is not a duration",
        ),
        ({"adjust": "maybe"}, "loops.0.adjust: Input should be a valid boolean"),
    ],
)
def test_measurement_settings_are_checked_with_one_line_naming_the_key(loop_patch, message):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["loops"][0].update(loop_patch)
    with pytest.raises(ConfigError) as error:
        parse_config(document, environ={})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_measurement_defaults():
    loop = parse_config(copy.deepcopy(SHIPPED_DOCUMENT), environ={}).loops[0]
    assert loop.window_days == [7, 14, 30]
    assert loop.success.type == "activity" and loop.adjust is True


def test_the_report_command_prints_the_verdicts(engine, app_database_url, tmp_path, capsys):
    from retention_pipeline.cli import main

    config = config_for(app_database_url, holdout=0.5)
    add_users(engine, range(1, 61), last_seen=LONG_AGO)
    run_day(engine, config, D)
    visit(engine, [str(user) for user in range(1, 31)], D + timedelta(days=1))
    evaluate(engine, config, D + timedelta(days=7))
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = app_database_url
    document["loops"][0].update(name="loop_0", holdout={"fraction": 0.5})
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(document))

    assert main(["report", "--config", str(path), "--loop", "loop_0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loop_0: outcomes of the assignments\n")
    headline = out.splitlines()[1]
    assert headline.startswith("the loop, per episode, within 7 days: ") and headline.endswith(
        " held-out episodes known)"
    )
    assert "step 0 re_engagement / b" in out and "points, 95% CI" in out
    assert "not enough data yet (0 of 10 outcomes)" in out  # the 30-day window

    assert main(["report", "--config", str(path), "--since", "2026-11-11"]) == 0
    assert capsys.readouterr().out == "loop_0: no assignments since 2026-11-11 yet\n\n"
    assert main(["report", "--config", str(path), "--loop", "nope"]) == 2
    assert "no loop named 'nope'" in capsys.readouterr().err


def test_a_local_time_loops_windows_count_from_each_members_send_day(engine, app_database_url):
    """Built at the end of D (UTC), Tokyo's next 09:00 is midnight UTC of D+2, Los Angeles' 17:00
    UTC of D+1: each member's windows start on the day of their due time, in both arms, so a
    return before the email went out is not one it caused."""
    config = config_for(app_database_url, holdout=0.5, send_at={"local_time": "09:00"})
    add_users(engine, range(1, 21), last_seen=LONG_AGO)
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE users SET timezone = CASE WHEN id <= 10 THEN 'Asia/Tokyo' "
                 "ELSE 'America/Los_Angeles' END")
        )  # fmt: skip
    run_day(engine, config, D)
    with engine.connect() as connection:
        first_days = dict(
            connection.execute(
                text("SELECT user_id, (due_at AT TIME ZONE 'UTC')::date "
                     "FROM retention.reengagement_audience")
            ).all()
        )  # fmt: skip
    assert {first_days[str(user)] for user in range(1, 11)} == {D + timedelta(days=2)}
    assert {first_days[str(user)] for user in range(11, 21)} == {D + timedelta(days=1)}
    visit(engine, ["1", "11"], D + timedelta(days=1))
    visit(engine, ["2"], D + timedelta(days=2))

    evaluate(engine, config, D + timedelta(days=7))
    seven = outcomes(engine, 7)
    assert seven["11"] == ("returned", D + timedelta(days=1))
    assert seven["12"] == ("not_returned", None)  # Los Angeles' window: D+1 .. D+7
    assert seven["2"] == ("returned", D + timedelta(days=2))
    assert seven["1"] == seven["3"] == ("pending", None)  # Tokyo's: D+2 .. D+8

    evaluate(engine, config, D + timedelta(days=8))
    seven = outcomes(engine, 7)
    # User 1 came back on D+1, before Tokyo's email went out: not a return the email caused.
    assert seven["1"] == seven["3"] == ("not_returned", None)
    assert len(seven) == 20  # both arms
    with engine.connect() as connection:
        ends = dict(
            connection.execute(
                text("SELECT user_id, window_ends_on FROM retention.reengagement_outcomes "
                     "WHERE window_days = 7 AND user_id IN ('1', '11')")
            ).all()
        )  # fmt: skip
    # The performance counts a window as over from its last day on.
    assert ends == {"1": D + timedelta(days=8), "11": D + timedelta(days=7)}
