"""The statistics on simulated campaigns with known true return rates: holdout 10%, treatment
14% (two variants at 12% and 16%, half the traffic each). Vectorized, with fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest

from retention_pipeline.outcomes.stats import (
    always_valid_difference,
    newcombe_difference,
    stratified_difference,
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
    returned = np.zeros((runs, days, 2))
    outcomes = np.zeros((runs, days, 2))
    arriving: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
    better_share = []
    for day in range(days):
        if day in arriving:
            assigned_on, new_returned, new_outcomes = arriving.pop(day)
            returned[:, assigned_on] = new_returned
            outcomes[:, assigned_on] = new_outcomes
        shares = thompson_shares(returned, outcomes, minimum_share=0.1, rng=rng, draws=1000)
        better_share.append(shares[:, 1])
        sent_a = rng.binomial(per_day, shares[:, 0])
        sent = np.stack([sent_a, per_day - sent_a], axis=1)
        arriving[day + delay] = (day, rng.binomial(sent, rates), sent)
    better_share = np.array(better_share)

    # Nothing known yet: an even split, up to the sampling noise of 1000 draws.
    assert np.allclose(better_share[:delay], 0.5, atol=0.06)
    assert np.all(better_share <= 0.9 + 1e-9)
    for day in range(14, days):
        assert np.mean(better_share[day] > 0.5) >= 0.95, day


# Simpson's paradox: variant a returns 6 points more than b on every day, but b got 90% of the
# traffic on the good days (around 50%) and a 90% on the bad ones (around 10%), so b's pooled
# rate (43%) is far above a's (17%). Per day: (a returned, a outcomes, b returned, b outcomes).
SIMPSON_DAYS = np.array(
    [(53, 100, 423, 900), (53, 100, 423, 900), (117, 900, 7, 100), (117, 900, 7, 100)]
)


def test_a_variant_better_on_every_day_wins_though_pooled_counts_favour_the_other():
    a_returned, a_outcomes, b_returned, b_outcomes = SIMPSON_DAYS.T
    assert b_returned.sum() / b_outcomes.sum() > a_returned.sum() / a_outcomes.sum() + 0.2

    difference, variance = stratified_difference(a_returned, a_outcomes, b_returned, b_outcomes)
    # +6 points every day, whatever the split.
    day_differences = a_returned / a_outcomes - b_returned / b_outcomes
    assert np.allclose(day_differences, 0.06)
    assert difference == pytest.approx(0.06)
    assert 0 < variance < 0.001

    returned = np.stack([a_returned, b_returned], axis=-1)
    outcomes = np.stack([a_outcomes, b_outcomes], axis=-1)
    shares = thompson_shares(
        returned, outcomes, minimum_share=0.1, rng=np.random.default_rng(4), draws=4000
    )
    assert shares[0] > 0.8  # a, better on every day, gets most of the traffic
    pooled = thompson_shares(
        returned.sum(axis=0, keepdims=True),
        outcomes.sum(axis=0, keepdims=True),
        minimum_share=0.1,
        rng=np.random.default_rng(4),
    )
    assert pooled[1] > 0.89  # what pooling the days decides: b


def test_the_stratified_interval_covers_the_true_difference_as_shares_and_base_rate_move():
    """Ten days, base rate from 5% to 50%, variant a 3 points better, a's share of 300 users a
    day from 10% to 90% as the base rate rises: the 95% interval of the stratified difference
    covers +3 points in 94% to 96.5% of 4000 runs; the pooled difference is biased far above."""
    rng = np.random.default_rng(17)
    base = np.linspace(0.05, 0.5, 10)
    a_share = np.linspace(0.1, 0.9, 10)
    a_outcomes = np.round(300 * a_share).astype(int)
    b_outcomes = 300 - a_outcomes
    a_returned = rng.binomial(a_outcomes, base + 0.03, size=(REPETITIONS, 10))
    b_returned = rng.binomial(b_outcomes, base, size=(REPETITIONS, 10))
    difference, variance = stratified_difference(a_returned, a_outcomes, b_returned, b_outcomes)
    half = 1.959963984540054 * np.sqrt(variance)
    assert 0.94 <= covered(difference - half, difference + half, 0.03) <= 0.965
    pooled = a_returned.sum(axis=-1) / a_outcomes.sum() - b_returned.sum(axis=-1) / b_outcomes.sum()
    assert np.mean(pooled) > 0.1


def test_thompson_refuses_an_impossible_minimum_share():
    with pytest.raises(ValueError, match="minimum_share 0.4 is impossible with 3 variants"):
        thompson_shares([[1, 2, 3]], [[4, 5, 6]], minimum_share=0.4, rng=np.random.default_rng(0))
