"""Each step's own effect and the loop's per episode, randomized.

Simulations with a known marginal effect per step (vectorized, fixed seeds): dormant users of two
kinds, half about to come back on their own (50% between two steps), half drifting away (4%),
and every email adds the same points to whoever gets it: +10 for the first, +3 for the second,
0 (or -3) for the third. The first email wins back more of the first kind, so the treated users
still dormant at a later step are not like the held-out users still dormant then: today's
comparison of those two is biased against the later step; step k's recipients against the users
withheld from step k is not.

Then the real thing on PostgreSQL: withheld users at the second step, never emailed, their step
passed, the step's comparison and its pause decision made on them, and the loop counted once
per episode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from retention_pipeline.config import ConfigError, parse_config
from retention_pipeline.outcomes.decisions import decide, harmful
from retention_pipeline.outcomes.evaluate import evaluate_outcomes
from retention_pipeline.outcomes.performance import performance_frame, performance_rows
from retention_pipeline.outcomes.stats import newcombe_difference
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline.tracking.install import install
from retention_pipeline_tests.email.fake_resend import serve_fake_resend
from retention_pipeline_tests.helpers import SHIPPED_DOCUMENT
from retention_pipeline_tests.test_audience import add_users, audience, come_back, run_day, send_day

KIND_SHARES = np.array([0.5, 0.5])
# The chance of coming back on one's own between two steps, per kind.
ON_THEIR_OWN = np.array([0.5, 0.04])
HOLDOUT = 0.1
STEP_HOLDOUT = 0.1
EFFECTS = (0.10, 0.03, 0.0)
REPETITIONS = 2000


@dataclass(frozen=True)
class StepCounts:
    """One step of simulated episodes: its recipients, the treated users withheld from it, and
    the held-out users still dormant when it falls due, each with how many came back before the
    next step."""

    sent: np.ndarray
    sent_returned: np.ndarray
    withheld: np.ndarray
    withheld_returned: np.ndarray
    holdout: np.ndarray
    holdout_returned: np.ndarray


def simulate(rng, shape, episodes: int, effects, step_holdout: float):
    """`episodes` episodes per element of `shape` through the loop's steps, step k falling due
    for the users still dormant; a step's outcome is a return before the next one. Returns the
    counts of each step and, per episode, (treated returned, treated, held out returned, held
    out). Drawn per kind, as binomial counts, so 2,000 repetitions take milliseconds."""
    kinds = rng.multinomial(episodes, KIND_SHARES, size=shape)
    held = rng.binomial(kinds, HOLDOUT)
    treated = kinds - held
    dormant_treated, dormant_held = treated, held
    steps = []
    for index, effect in enumerate(effects):
        withheld = rng.binomial(dormant_treated, step_holdout) if index else 0 * dormant_treated
        sent = dormant_treated - withheld
        sent_returned = rng.binomial(sent, ON_THEIR_OWN + effect)
        withheld_returned = rng.binomial(withheld, ON_THEIR_OWN)
        held_returned = rng.binomial(dormant_held, ON_THEIR_OWN)
        steps.append(
            StepCounts(
                *(
                    counts.sum(axis=-1)
                    for counts in (
                        sent,
                        sent_returned,
                        withheld,
                        withheld_returned,
                        dormant_held,
                        held_returned,
                    )
                )
            )
        )
        dormant_treated = dormant_treated - sent_returned - withheld_returned
        dormant_held = dormant_held - held_returned
    loop = (
        (treated - dormant_treated).sum(axis=-1),
        treated.sum(axis=-1),
        (held - dormant_held).sum(axis=-1),
        held.sum(axis=-1),
    )
    return steps, loop


def true_loop_effect(effects, step_holdout: float) -> float:
    """How many more treated episodes than held-out ones come back by the last step's end."""
    treated_stay, held_stay = np.ones_like(ON_THEIR_OWN), np.ones_like(ON_THEIR_OWN)
    for index, effect in enumerate(effects):
        sent_share = 1 - step_holdout if index else 1
        treated_stay = treated_stay * (1 - ON_THEIR_OWN - effect * sent_share)
        held_stay = held_stay * (1 - ON_THEIR_OWN)
    return float(KIND_SHARES @ (held_stay - treated_stay))


def coverage(lower, upper, truth: float) -> float:
    return float(np.mean((lower <= truth) & (truth <= upper)))


def own_comparison(step: StepCounts, index: int):
    """The pipeline's comparison of a step: the first against the holdout, a later one's
    recipients against the users withheld from it."""
    if index == 0:
        return step.sent_returned, step.sent, step.holdout_returned, step.holdout
    return step.sent_returned, step.sent, step.withheld_returned, step.withheld


def todays_comparison(step: StepCounts):
    """Before the step holdout: the treated users still dormant at the step against the
    held-out users still dormant then."""
    return step.sent_returned, step.sent, step.holdout_returned, step.holdout


def test_each_steps_interval_covers_its_own_marginal_effect_95_times_in_100():
    steps, loop = simulate(np.random.default_rng(17), REPETITIONS, 10_000, EFFECTS, STEP_HOLDOUT)

    for index, (step, effect) in enumerate(zip(steps, EFFECTS, strict=True)):
        _, lower, upper = newcombe_difference(*own_comparison(step, index))
        covered = coverage(lower, upper, effect)
        assert 0.93 <= covered <= 0.97, (index, covered)
    # The loop, per episode: every step as sent (later ones to 90% of the treated).
    _, lower, upper = newcombe_difference(*loop)
    assert 0.93 <= coverage(lower, upper, true_loop_effect(EFFECTS, STEP_HOLDOUT)) <= 0.97


def test_todays_comparison_of_later_steps_is_biased_and_the_withheld_one_is_not():
    """The figures of the closing note: the second step's +3 points as each comparison reads it,
    on average over 2,000 repetitions of 10,000 episodes, and how often its interval covers +3."""
    rng = np.random.default_rng(18)
    before, _ = simulate(rng, REPETITIONS, 10_000, EFFECTS, step_holdout=0)
    after, _ = simulate(rng, REPETITIONS, 10_000, EFFECTS, STEP_HOLDOUT)

    today, today_lower, today_upper = newcombe_difference(*todays_comparison(before[1]))
    own, own_lower, own_upper = newcombe_difference(*own_comparison(after[1], 1))

    assert np.mean(today) == pytest.approx(0.019, abs=0.002)  # 3 points read as 1.9
    assert coverage(today_lower, today_upper, EFFECTS[1]) == pytest.approx(0.88, abs=0.02)
    assert np.mean(own) == pytest.approx(EFFECTS[1], abs=0.001)
    assert 0.93 <= coverage(own_lower, own_upper, EFFECTS[1]) <= 0.97
    # A harmless third step reads as harmful.
    third, _, _ = newcombe_difference(*todays_comparison(before[2]))
    assert np.mean(third) == pytest.approx(-0.011, abs=0.002)


def paused_share(rng, third_step_effect: float, step_holdout: float, comparison) -> float:
    """Over 60 days of new episodes, about 400 outcomes of the third step a day, the share of
    2,000 runs in which the pause rule, looking every day at the outcomes so far, pauses it."""
    effects = (*EFFECTS[:2], third_step_effect)
    # Episodes a day such that about 400 treated users a day are due the third step.
    due = (
        (1 - HOLDOUT)
        * KIND_SHARES
        @ ((1 - ON_THEIR_OWN - effects[0]) * (1 - ON_THEIR_OWN - effects[1] * (1 - step_holdout)))
    )
    steps, _ = simulate(rng, (REPETITIONS, 60), round(400 / due), effects, step_holdout)
    looks = [counts.cumsum(axis=1) for counts in comparison(steps[2])]
    return float(np.mean(harmful(*looks).any(axis=1)))


def withheld_comparison(step: StepCounts):
    return own_comparison(step, 2)


def test_a_harmless_third_step_is_paused_in_at_most_5_runs_in_100():
    assert paused_share(np.random.default_rng(60), 0.0, STEP_HOLDOUT, withheld_comparison) <= 0.05


def test_a_third_step_that_costs_3_points_is_paused_in_at_least_80_runs_in_100():
    assert paused_share(np.random.default_rng(61), -0.03, STEP_HOLDOUT, withheld_comparison) >= 0.8


def test_todays_comparison_pauses_a_harmless_third_step_twice_as_often_as_the_rule_allows():
    """In the same world without the step holdout."""
    assert paused_share(np.random.default_rng(62), 0.0, 0, todays_comparison) > 0.08


UTC = ZoneInfo("UTC")
D = date(2026, 11, 10)
LONG_AGO = datetime(2026, 10, 1, tzinfo=UTC)


def config_for(url: str, *, holdout: float, step_holdout: float):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["database"]["url"] = url
    loop = document["loops"][0]
    loop["name"] = "loop_0"
    loop["steps"][0]["condition"] = {"type": "segment", "segment": "dormant"}
    loop["holdout"] = {"fraction": holdout}
    loop["step_holdout"] = step_holdout
    return parse_config(document, environ={})


@pytest.fixture
def engine(app_database_url):
    engine = create_engine(app_database_url)
    install(engine, config_for(app_database_url, holdout=0.1, step_holdout=0.1))
    yield engine
    engine.dispose()


def evaluate(engine, config, day: date) -> None:
    update_rollup(engine, config)
    with engine.begin() as connection:
        evaluate_outcomes(connection, config=config, loop=config.loops[0], day=day)


def sent_steps(engine) -> set[tuple[str, int]]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT user_id, step FROM retention.email_send_log"))
        return {(user, step) for user, step in rows}


def test_a_later_step_is_measured_and_paused_against_the_users_withheld_from_it(
    engine, app_database_url
):
    config = config_for(app_database_url, holdout=0.3, step_holdout=0.5)
    loop = config.loops[0]
    add_users(engine, range(1, 401), last_seen=LONG_AGO)
    follow_up_day = D + timedelta(days=3)
    with serve_fake_resend() as fake:
        run_day(engine, config, D)
        send_day(engine, config, D)
        first_emails = len(fake.delivered_to())
        run_day(engine, config, follow_up_day)
        send_day(engine, config, follow_up_day)
        follow_up_addresses = fake.delivered_to()[first_emails:]
    first = {row[0]: row[3] for row in audience(engine, D)}
    follow_up = {row[0]: row[3] for row in audience(engine, follow_up_day)}

    withheld = {user for user, arm in follow_up.items() if arm == "withheld"}
    recipients = {user for user, arm in follow_up.items() if arm == "treatment"}
    held_out = {user for user, arm in first.items() if arm == "holdout"}
    # Only treated episodes lose a step to the step holdout, about half of them here.
    assert {first[user] for user in withheld} == {"treatment"}
    assert {follow_up[user] for user in held_out} == {"holdout"}
    assert 100 <= len(withheld) <= 180 and len(withheld) + len(recipients) == 400 - len(held_out)
    # Never emailed, and the step is behind them: nothing is due the next day.
    first_recipients = {user for user, arm in first.items() if arm == "treatment"}
    assert sent_steps(engine) == {(user, 0) for user in first_recipients} | {
        (user, 1) for user in recipients
    }
    assert sorted(follow_up_addresses) == sorted(f"user{user}@example.com" for user in recipients)
    assert run_day(engine, config, D + timedelta(days=4)).excluded["no_step_due"] == 400
    # The held-out users, still dormant two days after the follow-up, all come back then; the
    # treated, recipients and withheld alike, do not. The holdout says the follow-up does harm
    # (-100 points); against the users withheld from it, it does none.
    come_back(engine, sorted(held_out), datetime(2026, 11, 15, 12, tzinfo=UTC))
    decided_on = follow_up_day + timedelta(days=7)
    evaluate(engine, config, decided_on)
    with engine.connect() as connection:
        rows = performance_rows(connection, "retention", loop, through=decided_on)
    by_scope = {(row.scope, row.window_days): row for row in rows}
    second = by_scope[("step 1 re_engagement_follow_up", 7)]
    assert second.compared_with == "withheld"
    assert (second.treatment.assigned, second.holdout.assigned) == (len(recipients), len(withheld))
    assert second.treatment.returned == second.holdout.returned == 0
    assert second.evidence == "undecided"

    decisions = decide(loop, rows, decided_on)
    assert not decisions[1].paused
    assert decisions[1].evidence["lift"]["compared_with"] == "withheld"
    assert decisions[1].evidence["lift"]["withheld_outcomes"] == len(withheld)
    # The first step is still measured against the holdout, which came back: paused.
    assert decisions[0].paused and decisions[0].evidence["lift"]["compared_with"] == "holdout"

    # The loop counts each episode once, whatever number of steps it got, in its first arm.
    loop_line = by_scope[("loop, per episode", 7)]
    assert (loop_line.treatment.assigned, loop_line.holdout.assigned) == (
        400 - len(held_out),
        len(held_out),
    )
    assert loop_line.treatment.emailed == 400 - len(held_out)
    assert loop_line.holdout.returned == len(held_out)
    frame = performance_frame(rows)
    compared_with = dict(zip(frame["scope"], frame["compared with"], strict=True))
    assert compared_with["loop, per episode"] == compared_with["step 0 re_engagement"] == "holdout"
    assert compared_with["step 1 re_engagement_follow_up"] == "withheld"


def test_a_withheld_user_gets_the_next_step_at_its_delay(engine, app_database_url):
    config = config_for(app_database_url, holdout=0.0, step_holdout=0.5)
    add_users(engine, range(1, 101), last_seen=LONG_AGO)
    for offset in (0, 3, 7):
        run_day(engine, config, D + timedelta(days=offset))
    withheld = {row[0] for row in audience(engine, D + timedelta(days=3)) if row[3] == "withheld"}
    last_call = {row[0]: row[1:4] for row in audience(engine, D + timedelta(days=7))}

    assert withheld and withheld <= set(last_call)
    assert {last_call[user][:2] for user in withheld} == {(2, "re_engagement_last_call")}
    # The last call's draw is its own: some withheld from the follow-up get it, some not.
    assert {last_call[user][2] for user in withheld} == {"treatment", "withheld"}


def test_without_a_step_holdout_later_steps_go_to_every_treated_user_unmeasured(
    engine, app_database_url
):
    config = config_for(app_database_url, holdout=0.1, step_holdout=0)
    add_users(engine, range(1, 101), last_seen=LONG_AGO)
    run_day(engine, config, D)
    run_day(engine, config, D + timedelta(days=3))
    assert {row[3] for row in audience(engine, D + timedelta(days=3))} == {"treatment", "holdout"}
    evaluate(engine, config, D + timedelta(days=10))
    with engine.connect() as connection:
        rows = performance_rows(connection, "retention", config.loops[0])
    (second,) = [row for row in rows if row.step == 1 and row.window_days == 7]
    assert second.verdict == "nobody withheld from the step: lift unavailable"
    assert not decide(config.loops[0], rows, D + timedelta(days=10))[1].paused


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1, "loops.0.step_holdout: Input should be less than 1"),
        (-0.1, "loops.0.step_holdout: Input should be greater than or equal to 0"),
        ("some", "loops.0.step_holdout: Input should be a valid number"),
    ],
)
def test_the_step_holdout_is_checked_with_one_line_naming_the_key(value, message):
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["loops"][0]["step_holdout"] = value
    with pytest.raises(ConfigError) as error:
        parse_config(document, environ={})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_step_holdout_defaults_to_a_tenth():
    document = copy.deepcopy(SHIPPED_DOCUMENT)
    document["loops"][0].pop("step_holdout", None)
    assert parse_config(document, environ={}).loops[0].step_holdout == 0.1


def test_revision_0012_allows_the_withheld_arm_and_its_downgrade_keeps_them_unsent(
    engine, app_database_url
):
    from alembic import command

    from retention_pipeline.database import migrate

    config = config_for(app_database_url, holdout=0.0, step_holdout=0.5)
    add_users(engine, range(1, 41), last_seen=LONG_AGO)
    run_day(engine, config, D)
    run_day(engine, config, D + timedelta(days=3))
    evaluate(engine, config, D + timedelta(days=3))
    follow_up = audience(engine, D + timedelta(days=3))
    withheld = {row[0] for row in follow_up if row[3] == "withheld"}
    assert withheld

    with engine.begin() as connection:
        command.downgrade(migrate._alembic_config(connection, "retention"), "0011")
    # Still not emailed, the step still behind them: as the code before the revision reads it.
    assert {row[0] for row in audience(engine, D + timedelta(days=3)) if row[3] == "holdout"} == (
        withheld
    )
    with engine.connect() as connection:
        assert connection.execute(
            text("SELECT DISTINCT arm FROM retention.reengagement_outcomes ORDER BY arm")
        ).scalars().all() == ["holdout", "treatment"]
    install(engine, config)
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE retention.reengagement_audience SET arm = 'withheld' WHERE step = 1")
        )
