"""The statistics on simulated campaigns with known true return rates: holdout 10%, treatment
14% (two variants at 12% and 16%, half the traffic each). Vectorized, with fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest

from retention_pipeline.outcomes.stats import (
    always_valid_difference,
    newcombe_difference,
    thompson_shares,
    wilson_interval,
)

HOLDOUT, VARIANT_A, VARIANT_B = 0.10, 0.12, 0.16
REPETITIONS = 4000


def covered(lower, upper, truth) -> float:
    return float(np.mean((lower <= truth) & (truth <= upper)))


@pytest.mark.parametrize(
    ("holdout_users", "treated_users"), [(300, 2700), (30, 270), (12, 60)], ids=str
)
def test_the_95_interval_covers_the_true_lift_95_times_in_100(holdout_users, treated_users):
    rng = np.random.default_rng(holdout_users)
    half = treated_users // 2
    holdout = rng.binomial(holdout_users, HOLDOUT, REPETITIONS)
    a = rng.binomial(half, VARIANT_A, REPETITIONS)
    b = rng.binomial(half, VARIANT_B, REPETITIONS)

    _, lower, upper = newcombe_difference(a + b, 2 * half, holdout, holdout_users)
    step_coverage = covered(lower, upper, (VARIANT_A + VARIANT_B) / 2 - HOLDOUT)
    _, lower, upper = newcombe_difference(b, half, holdout, holdout_users)
    variant_coverage = covered(lower, upper, VARIANT_B - HOLDOUT)

    assert 0.93 <= step_coverage <= 0.97, step_coverage
    assert 0.93 <= variant_coverage <= 0.97, variant_coverage


def test_the_interval_holds_at_zero_and_at_everyone():
    _, lower, upper = newcombe_difference(0, 50, 0, 10)
    assert lower < 0 < upper
    _, lower, upper = newcombe_difference(50, 50, 10, 10)
    assert lower < 0 < upper and upper <= 1
    low, high = wilson_interval(0, 20)
    assert low == pytest.approx(0) and 0 < high < 0.2
    difference, lower, upper = newcombe_difference(0, 0, 1, 10)
    assert np.isnan(difference) and np.isnan(lower) and np.isnan(upper)


def test_newcombe_matches_the_published_example():
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80 gives 0.2000 (0.0524, 0.3339).
    difference, lower, upper = newcombe_difference(56, 70, 48, 80)
    assert (float(difference), float(lower), float(upper)) == pytest.approx(
        (0.2, 0.0524, 0.3339), abs=1e-4
    )


def daily_looks(rng, treated_rate: float, days: int = 60, holdout_a_day=20, treated_a_day=180):
    """Cumulative returns of both arms at each of `days` daily looks, per repetition."""
    holdout = rng.binomial(holdout_a_day, HOLDOUT, (REPETITIONS, days)).cumsum(axis=1)
    treated = rng.binomial(treated_a_day, treated_rate, (REPETITIONS, days)).cumsum(axis=1)
    looks = np.arange(1, days + 1)
    return treated, looks * treated_a_day, holdout, looks * holdout_a_day


def test_sixty_daily_looks_without_an_effect_decide_wrongly_at_most_5_in_100():
    treated, treated_n, holdout, holdout_n = daily_looks(np.random.default_rng(60), HOLDOUT)

    lower, upper = always_valid_difference(treated, treated_n, holdout, holdout_n)
    false_decisions = np.mean(((lower > 0) | (upper < 0)).any(axis=1))
    # The same looks with the fixed-sample interval: why decisions need the sequence.
    _, naive_lower, naive_upper = newcombe_difference(treated, treated_n, holdout, holdout_n)
    naive_false_decisions = np.mean(((naive_lower > 0) | (naive_upper < 0)).any(axis=1))

    assert false_decisions <= 0.05, false_decisions
    assert naive_false_decisions > 0.2, naive_false_decisions


def test_the_sequence_finds_a_real_lift_within_sixty_days():
    treated, treated_n, holdout, holdout_n = daily_looks(np.random.default_rng(61), 0.14)

    lower, _ = always_valid_difference(treated, treated_n, holdout, holdout_n)

    assert np.mean((lower > 0).any(axis=1)) > 0.85


def test_thompson_sends_most_traffic_to_the_better_variant_within_14_days():
    """200 treated users a day split between the variants (12% and 16%); a user's outcome is
    known 7 days later (the first window). From day 14 on the better variant gets most of the
    traffic in at least 95% of 300 runs, and the worse one never less than its minimum share."""
    rng = np.random.default_rng(14)
    runs, per_day, delay, days = 300, 200, 7, 21
    rates = np.array([VARIANT_A, VARIANT_B])
    successes = np.zeros((runs, 2))
    failures = np.zeros((runs, 2))
    arriving: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    better_share = []
    for day in range(days):
        if day in arriving:
            new_successes, new_failures = arriving.pop(day)
            successes += new_successes
            failures += new_failures
        shares = thompson_shares(successes, failures, minimum_share=0.1, rng=rng, draws=1000)
        better_share.append(shares[:, 1])
        sent_a = rng.binomial(per_day, shares[:, 0])
        sent = np.stack([sent_a, per_day - sent_a], axis=1)
        returned = rng.binomial(sent, rates)
        arriving[day + delay] = (returned, sent - returned)
    better_share = np.array(better_share)

    # Nothing known yet: an even split, up to the sampling noise of 1000 draws.
    assert np.allclose(better_share[:delay], 0.5, atol=0.06)
    assert np.all(better_share <= 0.9 + 1e-9)
    for day in range(14, days):
        assert np.mean(better_share[day] > 0.5) >= 0.95, day


def test_thompson_refuses_an_impossible_minimum_share():
    with pytest.raises(ValueError, match="minimum_share 0.4 is impossible with 3 variants"):
        thompson_shares([1, 2, 3], [4, 5, 6], minimum_share=0.4, rng=np.random.default_rng(0))
