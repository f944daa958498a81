"""The statistics behind campaign performance, on plain numbers (numpy arrays work too).

- `newcombe_difference`: the 95% interval of a difference of two proportions reported in the
  performance table, Newcombe's hybrid score interval (method 10 of Newcombe 1998), built from
  two Wilson intervals: it keeps its coverage at small counts and at 0% or 100%.
- `always_valid_difference`: the interval decisions use. The pipeline looks every morning, and
  a fixed-sample interval looked at daily excludes zero by chance far more often than 5% of the
  time. This is the normal-mixture confidence sequence (the mixture sequential probability ratio
  test of Robbins, as in Johari, Pekelis and Walsh, "Always valid inference", 2017): it holds
  simultaneously at every look, however many, so stopping on the first look that excludes
  zero still errs at most 5% of the time.
- `stratified_difference`: a difference of two proportions measured over several days whose
  base rate moves and whose split between the groups changes from day to day (as variant shares
  do): each day's difference, weighted by its size (Mantel-Haenszel), with its variance. Pooling
  the days instead mixes the split with the base rate (Simpson's paradox).
- `thompson_shares`: how much of a step's treatment traffic each template variant gets, by
  Thompson sampling on the variants' day-stratified return rates, with a floor per variant so
  every variant keeps being measured.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

Z_95 = 1.959963984540054
ALPHA = 0.05
# The spread of lifts the confidence sequence is tuned for (the mixing distribution's standard
# deviation): it is tightest when the interval's half-width nears this, and valid whatever it is.
MIXING_SD = 0.05


def wilson_interval(
    successes: ArrayLike, trials: ArrayLike, z: float = Z_95
) -> tuple[NDArray, NDArray]:
    """Wilson's score interval of a proportion; NaN where there are no trials."""
    x = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = x / n
        denominator = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denominator
        half = z / denominator * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def newcombe_difference(
    successes_1: ArrayLike,
    trials_1: ArrayLike,
    successes_2: ArrayLike,
    trials_2: ArrayLike,
    z: float = Z_95,
) -> tuple[NDArray, NDArray, NDArray]:
    """The difference p1 - p2 and its hybrid score interval (lower, upper); NaN where an arm
    has no trials."""
    x1, n1 = np.asarray(successes_1, dtype=float), np.asarray(trials_1, dtype=float)
    x2, n2 = np.asarray(successes_2, dtype=float), np.asarray(trials_2, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p2 = x1 / n1, x2 / n2
    low_1, high_1 = wilson_interval(x1, n1, z)
    low_2, high_2 = wilson_interval(x2, n2, z)
    difference = p1 - p2
    lower = difference - np.sqrt((p1 - low_1) ** 2 + (high_2 - p2) ** 2)
    upper = difference + np.sqrt((high_1 - p1) ** 2 + (p2 - low_2) ** 2)
    return difference, lower, upper


def always_valid_difference(
    successes_1: ArrayLike,
    trials_1: ArrayLike,
    successes_2: ArrayLike,
    trials_2: ArrayLike,
    alpha: float = ALPHA,
    mixing_sd: float = MIXING_SD,
) -> tuple[NDArray, NDArray]:
    """The (lower, upper) bounds of a 1 - alpha confidence sequence for p1 - p2: valid at every
    look at once. The variance is estimated from proportions shrunk towards one half by one
    success and one failure, so an arm at 0% or 100% still has a width."""
    x1, n1 = np.asarray(successes_1, dtype=float), np.asarray(trials_1, dtype=float)
    x2, n2 = np.asarray(successes_2, dtype=float), np.asarray(trials_2, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        shrunk_1, shrunk_2 = (x1 + 1) / (n1 + 2), (x2 + 1) / (n2 + 2)
        variance = shrunk_1 * (1 - shrunk_1) / n1 + shrunk_2 * (1 - shrunk_2) / n2
        difference = x1 / n1 - x2 / n2
    half = always_valid_half_width(variance, alpha, mixing_sd)
    return difference - half, difference + half


def always_valid_half_width(
    variance: ArrayLike, alpha: float = ALPHA, mixing_sd: float = MIXING_SD
) -> NDArray:
    """The half-width of the normal-mixture confidence sequence of an estimate with `variance`."""
    v = np.asarray(variance, dtype=float)
    tau2 = mixing_sd * mixing_sd
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(v * (v + tau2) / tau2 * np.log((v + tau2) / (v * alpha**2)))


def stratified_difference(
    successes_1: ArrayLike,
    trials_1: ArrayLike,
    successes_2: ArrayLike,
    trials_2: ArrayLike,
) -> tuple[NDArray, NDArray]:
    """The day-stratified difference p1 - p2 over the days along the last axis, and its
    variance; NaN when no day has trials in both groups.

    Each day's difference is weighted by n1 n2 / (n1 + n2), the Mantel-Haenszel weight of a
    risk difference (the inverse of its variance were both rates equal), so a day counts by its
    size and never by how it was split. The variance is that of the weighted mean of the days'
    independent differences, each day's rates shrunk by one success and one failure so that a
    day at 0% or 100% still counts as uncertain. Days without trials in a group say nothing
    about the difference and are left out."""
    x1, n1 = np.asarray(successes_1, dtype=float), np.asarray(trials_1, dtype=float)
    x2, n2 = np.asarray(successes_2, dtype=float), np.asarray(trials_2, dtype=float)
    both = (n1 > 0) & (n2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(both, n1 * n2 / (n1 + n2), 0.0)
        total = weight.sum(axis=-1)
        day_difference = np.where(both, x1 / n1 - x2 / n2, 0.0)
        shrunk_1, shrunk_2 = (x1 + 1) / (n1 + 2), (x2 + 1) / (n2 + 2)
        day_variance = np.where(
            both, shrunk_1 * (1 - shrunk_1) / n1 + shrunk_2 * (1 - shrunk_2) / n2, 0.0
        )
        difference = (weight * day_difference).sum(axis=-1) / total
        variance = (weight**2 * day_variance).sum(axis=-1) / total**2
    return difference, variance


def thompson_shares(
    returned: ArrayLike,
    outcomes: ArrayLike,
    *,
    minimum_share: float,
    rng: np.random.Generator,
    draws: int = 4000,
) -> NDArray:
    """Traffic shares of the variants along the last axis, from their returns and known
    outcomes per assignment day along the axis before it (leading axes are independent
    problems, as in a simulation): the posterior probability that each variant has the highest
    return rate, squeezed so that every variant keeps at least `minimum_share`.

    The shares change from day to day and so does the base rate, so the variants are compared
    day by day, never on pooled counts (a variant given more traffic on good days would look
    better). Each variant's day rate has the posterior Beta(1 + returned, 1 + not returned);
    the variants' rates are averaged over the same days with the same weights, a day weighing
    1 / sum over variants of 1 / outcomes (for two variants the Mantel-Haenszel weight
    n1 n2 / (n1 + n2)), only days where every variant has an outcome. Each such average is
    drawn from the normal with its posterior mean and variance (the sum of many independent
    days, so close to normal; exact Beta draws would not add up to a closed form). The
    difference of two averages is then the day-stratified difference, and its posterior has the
    variance `stratified_difference` gives. Before any such day every variant is as likely to be
    best: an even split."""
    r = np.asarray(returned, dtype=float)
    n = np.asarray(outcomes, dtype=float)
    variants = r.shape[-1]
    if not 0 <= minimum_share * variants <= 1:
        raise ValueError(
            f"minimum_share {minimum_share} is impossible with {variants} variants "
            f"(at most {1 / variants:.3f})"
        )
    every_variant = (n > 0).all(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(every_variant, 1 / (1 / n).sum(axis=-1, keepdims=True), 0.0)
        total = weight.sum(axis=-2)
        mean = (r + 1) / (n + 2)
        variance = mean * (1 - mean) / (n + 3)
        rate = (weight * mean).sum(axis=-2) / total
        spread = np.sqrt((weight**2 * variance).sum(axis=-2)) / total
    known = total > 0
    rate = np.where(known, rate, 0.0)
    spread = np.where(known, spread, 1.0)
    samples = rng.normal(
        rate[..., None, :], spread[..., None, :], size=(*rate.shape[:-1], draws, variants)
    )
    winners = samples.argmax(axis=-1)
    best = np.where(known, (winners[..., None] == np.arange(variants)).mean(axis=-2), 1 / variants)
    return minimum_share + (1 - variants * minimum_share) * best
