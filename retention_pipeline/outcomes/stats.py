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
- `thompson_shares`: how much of a step's treatment traffic each template variant gets, by
  Thompson sampling on Beta posteriors, with a floor per variant so every variant keeps being
  measured.
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
        tau2 = mixing_sd * mixing_sd
        half = np.sqrt(
            variance * (variance + tau2) / tau2 * np.log((variance + tau2) / (variance * alpha**2))
        )
        difference = x1 / n1 - x2 / n2
    return difference - half, difference + half


def thompson_shares(
    successes: ArrayLike,
    failures: ArrayLike,
    *,
    minimum_share: float,
    rng: np.random.Generator,
    draws: int = 4000,
) -> NDArray:
    """Traffic shares of the variants along the last axis (leading axes are independent
    problems, as in a simulation): the posterior probability that each variant has the
    highest success rate, under Beta(1 + successes, 1 + failures), squeezed so that every
    variant keeps at least `minimum_share`."""
    s = np.asarray(successes, dtype=float)
    f = np.asarray(failures, dtype=float)
    variants = s.shape[-1]
    if not 0 <= minimum_share * variants <= 1:
        raise ValueError(
            f"minimum_share {minimum_share} is impossible with {variants} variants "
            f"(at most {1 / variants:.3f})"
        )
    samples = rng.beta(
        1 + s[..., None, :], 1 + f[..., None, :], size=(*s.shape[:-1], draws, variants)
    )
    winners = samples.argmax(axis=-1)
    best = (winners[..., None] == np.arange(variants)).mean(axis=-2)
    return minimum_share + (1 - variants * minimum_share) * best
