"""The statistics behind every comparison: intervals over seeds, bootstrap intervals over test examples, and
paired tests against the best method. Everything comes from scipy; this module only chooses and labels."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
# resampled values computed at once (resamples × examples): all 2,000 resamples of a few hundred examples in
# one call, a bounded memory for a test split of millions
RESAMPLED_VALUES_PER_BATCH = 4_000_000


def resamples_per_batch(examples: int) -> int:
    return max(1, min(BOOTSTRAP_RESAMPLES, RESAMPLED_VALUES_PER_BATCH // max(examples, 1)))


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation and a 95 % Student-t interval over runs (seeds); no interval for one run.
    A NaN or infinite value (a diverged run) leaves the mean undefined, counted in `non_finite`: dropping it
    would rank a method by its surviving seeds alone."""
    present = [float(v) for v in values if v is not None]
    x = np.asarray([v for v in present if math.isfinite(v)], dtype=float)
    out = {"n": int(len(present)), "mean": float(x.mean()) if len(x) else None, "std": None, "ci95": None,
           "ci_method": "t-interval over seeds"}
    if len(x) < len(present):
        return {**out, "mean": None, "non_finite": len(present) - len(x)}
    if len(x) >= 2:
        out["std"] = float(x.std(ddof=1))
        half = stats.t.ppf(1 - ALPHA / 2, len(x) - 1) * out["std"] / math.sqrt(len(x))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def bootstrap_ci(statistic: Callable[..., float], columns: Sequence[np.ndarray], seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of `statistic(*columns)` over examples (rows resampled together),
    so even a single run shows how much its test score depends on which examples were drawn.

    `statistic(*columns, axis=-1)` reduces along `axis` (numpy's convention, as np.mean does): it is given
    a batch of resamples at once, rows along the last axis."""
    if len(columns[0]) < 2:
        return None
    result = stats.bootstrap(tuple(np.asarray(c) for c in columns), statistic, paired=True, vectorized=True,
                             n_resamples=BOOTSTRAP_RESAMPLES, batch=resamples_per_batch(len(columns[0])),
                             confidence_level=1 - ALPHA, method="percentile", random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return [float(low), float(high)]


def seed_mean_bootstrap_ci(per_seed: Sequence[tuple[Sequence[np.ndarray], Callable[..., float]]],
                           seed: int = 0) -> list[float] | None:
    """95 % bootstrap interval, over the test examples, of the mean over seeds of each seed's statistic: every
    resample draws the same examples for all seeds (they share the test split). None where the seeds' example
    columns differ in length (not the same examples)."""
    joined = seed_mean(per_seed)
    return bootstrap_ci(joined[1], joined[0], seed) if joined else None


def seed_mean(per_seed: Sequence[tuple[Sequence[np.ndarray], Callable[..., float]]]):
    """(every seed's example columns, one after another; the statistic giving the mean over seeds of each
    seed's statistic), so a resample of rows draws the same examples for every seed; None where the seeds'
    columns differ in length."""
    widths = [len(columns) for columns, _ in per_seed]
    flat = [np.asarray(c) for columns, _ in per_seed for c in columns]
    if len({len(c) for c in flat}) != 1:
        return None
    bounds = np.cumsum([0, *widths])

    def mean_over_seeds(*columns, axis=-1):
        return np.mean([fn(*columns[lo:hi], axis=axis) for (_, fn), lo, hi in zip(per_seed, bounds, bounds[1:])],
                       axis=0)
    return flat, mean_over_seeds


def with_test_sampling(summary: dict, test_ci: list[float]) -> dict:
    """The t-interval over seeds widened by how much the seeds' mean depends on the test examples drawn: the
    seeds share one test split, so their spread says nothing of that. Half-widths add in quadrature (training
    noise and test sampling are independent); seeds that agree exactly no longer give a zero-width interval."""
    low, high = summary["ci95"]
    half = math.hypot((high - low) / 2, (test_ci[1] - test_ci[0]) / 2)
    return {**summary, "ci95": [summary["mean"] - half, summary["mean"] + half],
            "ci_method": "t-interval over seeds and bootstrap over test examples, combined"}


def within(summary: dict, low: float | None, high: float | None) -> dict:
    """The interval cut to the values the metric can take (accuracy in [0, 1], a loss from 0): a t-interval
    over a few seeds, symmetric about the mean, reaches past them."""
    if not summary.get("ci95"):
        return summary
    lo, hi = summary["ci95"]
    return {**summary, "ci95": [lo if low is None else max(lo, low), hi if high is None else min(hi, high)]}


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired t-test of a against b over the same seeds; with identical pairs there is no difference to test.
    The same non-zero difference on every seed leaves the t statistic undefined (p None): it says nothing of
    how much that difference depends on the test examples (one example of 20, say), so the caller tests that."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a - b
    if len(diff) < 2:
        return {"test": "paired t-test over seeds", "p_value": None, "significant": False,
                "mean_difference": float(diff.mean()) if len(diff) else None}
    if np.allclose(diff, diff[0], rtol=0, atol=1e-12):
        if abs(diff[0]) > 1e-12:
            return {"test": "paired t-test over seeds (undefined: the same difference on every seed)",
                    "p_value": None, "significant": False, "mean_difference": float(diff.mean())}
        p = 1.0
    else:
        p = float(stats.ttest_rel(a, b).pvalue)
    return {"test": "paired t-test over seeds", "p_value": p, "significant": p < ALPHA,
            "mean_difference": float(diff.mean())}


def paired_bootstrap(statistic: Callable[..., float], a_columns: Sequence[np.ndarray],
                     b_columns: Sequence[np.ndarray], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Two-sided paired bootstrap over the same test examples: how often does resampling the examples flip
    the sign of statistic(a) - statistic(b)? For single runs, where there are no seeds to pair. `statistic`
    reduces along `axis`, as for `bootstrap_ci`."""
    rng = np.random.default_rng(seed)
    a_columns, b_columns = [np.asarray(c) for c in a_columns], [np.asarray(c) for c in b_columns]
    n = len(a_columns[0])
    observed = float(statistic(*a_columns, axis=-1) - statistic(*b_columns, axis=-1))
    if n < 2:  # every resample is the same example: nothing to learn about chance
        return {"test": "paired bootstrap over test examples (too few examples)", "p_value": None,
                "significant": False, "mean_difference": observed}
    flips, batch = 0, resamples_per_batch(n)
    for start in range(0, resamples, batch):
        rows = rng.integers(0, n, (min(batch, resamples - start), n))
        mine, theirs = ([c[rows] for c in columns] for columns in (a_columns, b_columns))
        delta = statistic(*mine, axis=-1) - statistic(*theirs, axis=-1)
        flips += int(np.sum(delta <= 0 if observed > 0 else delta >= 0))
    p = min(1.0, 2 * (flips + 1) / (resamples + 1))
    return {"test": "paired bootstrap over test examples", "p_value": p, "significant": p < ALPHA,
            "mean_difference": observed}


def pairs_among(methods: int) -> int:
    return methods * (methods - 1) // 2


def resamples_for(pairs: int) -> int:
    """Paired-bootstrap resamples that can reach Holm's smallest threshold (ALPHA / pairs) with room to spare:
    its p-value is at least 2 / (resamples + 1), so 2,000 resamples decide nothing below 0.001 (20 methods)."""
    return max(BOOTSTRAP_RESAMPLES, math.ceil(4 * pairs / ALPHA))


def holm(p_values: Sequence[float], family: int) -> list[float]:
    """Holm's step-down adjusted p-values of `p_values`, as members of a family of `family` tests whose others
    were not made (counted as p = 1, which can only make fewer rejections: Holm is monotone in the p-values)."""
    order = np.argsort(p_values, kind="stable")
    adjusted, running = [0.0] * len(p_values), 0.0
    for position, index in enumerate(order):
        running = max(running, min(1.0, (family - position) * p_values[index]))
        adjusted[index] = running
    return adjusted
