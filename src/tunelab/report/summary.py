"""One summary entry per method over its runs (seeds): each metric's mean, spread and 95 % interval, and a
verdict against the best method. Computed from result records alone, so old experiments can be summarized."""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from . import stats
from .view import metric_text, ordered_metrics

MISSING = object()  # a metric the record does not have, unlike one written as null (a non-finite value)


def split_of(records: list[dict]) -> str:
    """Test when every run has test metrics (the honest split to rank on), else the best validation state."""
    return "test" if records and all(r.get("test") for r in records) else "best_val"


@dataclass(frozen=True)
class Comparison:
    """What every verdict against the best is computed from: the runs, the split and metric ranked on, and how
    many resamples a paired bootstrap needs to reach the multiple-comparison threshold."""

    by_method: dict[str, list[dict]]
    split: str
    metric: str
    higher: bool
    task: Any
    resamples: int


def summarize(records: list[dict], job: dict[str, Any]) -> list[dict[str, Any]]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("status") == "success":
            by_method[r["method"]].append(r)
    if not by_method:
        return []
    split = split_of([r for runs in by_method.values() for r in runs])
    task = task_for(job)
    diverged = Counter(r["method"] for r in records if r.get("status") == "diverged")
    entries = [method_entry(method, runs, split, job, task, diverged[method]) for method, runs in by_method.items()]
    primary = ordered_metrics(job)[0]
    higher = job["metrics"].get(primary) == "higher"
    # a method without a value (every run failed to give one, or one diverged) ranks last
    entries.sort(key=lambda e: (e["metrics"][primary]["mean"] is None,
                                (-1 if higher else 1) * (e["metrics"][primary]["mean"] or 0.0)))
    best = entries[0]
    pairs = stats.pairs_among(sum(e["metrics"][primary]["mean"] is not None for e in entries))
    comparison = Comparison(by_method, split, primary, higher, task, stats.resamples_for(pairs))
    for rank, entry in enumerate(entries, start=1):
        entry["rank"] = rank
        entry["verdict"] = verdict(entry, best, comparison)
    adjust_for_all_pairs(entries, pairs, higher)
    return entries


def adjust_for_all_pairs(entries: list[dict], pairs: int, higher: bool) -> None:
    """Holm's adjustment of the p-values against the best, as part of the family of every pair of ranked
    methods: the best is picked after seeing the scores, so with K methods tested at 5 % each, some "worse"
    would turn up by chance far more often than 5 % (18 % of reports with 4 equal methods, 37 % with 6, in a
    simulation). Holm over all K·(K−1)/2 pairs keeps that below 5 %; the comparisons not made count as p = 1."""
    tested = [e["verdict"] for e in entries if e["verdict"].get("p_value") is not None]
    if pairs < 2 or not tested:
        return
    adjusted = stats.holm([v["p_value"] for v in tested], family=pairs)
    for v, p in zip(tested, adjusted):
        v.update(p_value_unadjusted=v["p_value"], p_value=p, significant=p < stats.ALPHA,
                 holm_pairs=pairs)
        v["result"] = verdict_result(v, higher)


def method_entry(method: str, runs: list[dict], split: str, job: dict, task, diverged: int = 0) -> dict[str, Any]:
    """A diverged seed counts as a non-finite value, leaving the method unranked: ranked by its surviving seeds
    alone, an unstable method could come first. A metric written as null stands for a non-finite value
    (results.json writes NaN so); only a metric the record lacks is missing."""
    metrics = {}
    for metric in ordered_metrics(job):
        values = [(r.get(split) or {}).get(metric, MISSING) for r in runs] + [math.nan] * diverged
        summary = stats.summarize([math.nan if v is None else None if v is MISSING else v for v in values])
        if summary["mean"] is not None and split == "test" and task is not None:
            summary = with_test_examples(summary, [task.statistic(metric, r.get("test_per_example") or {})
                                                   for r in runs])
        low, high = task.metric_ranges.get(metric, (None, None)) if task else (None, None)
        metrics[metric] = stats.within(summary, low, high)
    hyper = {k: runs[0].get(k) for k in ("lr",) if runs[0].get(k) is not None}
    return {"method": method, "n": len(runs) + diverged, "split": split, "seeds": [r.get("seed") for r in runs],
            "hyperparameters": {**hyper, **(runs[0].get("hyperparameters") or {})}, "metrics": metrics}


def with_test_examples(summary: dict, per_seed: list) -> dict:
    """One run: its interval over test examples. Several: the interval over seeds, widened by the test
    examples' part (see stats.with_test_sampling). As it was where a run has no per-example results."""
    if not all(per_seed):
        return summary
    if len(per_seed) == 1:
        columns, statistic = per_seed[0]
        return {**summary, "ci95": stats.bootstrap_ci(statistic, columns), "ci_method": "bootstrap over test examples"}
    test_ci = stats.seed_mean_bootstrap_ci(per_seed)
    return stats.with_test_sampling(summary, test_ci) if test_ci and summary["ci95"] else summary


def verdict(entry: dict, best: dict, c: Comparison) -> dict:
    if entry is best and best["metrics"][c.metric]["mean"] is not None:
        return {"against": None, "result": "best"}
    if entry["metrics"][c.metric]["mean"] is None or best["metrics"][c.metric]["mean"] is None:
        return {"against": best["method"], "test": None, "p_value": None, "significant": False,
                "mean_difference": None, "result": "unranked"}
    mine, theirs = c.by_method[entry["method"]], c.by_method[best["method"]]
    paired_seeds = sorted({r.get("seed") for r in mine} & {r.get("seed") for r in theirs})
    test = None
    if len(paired_seeds) >= 2:
        value = {s: r[c.split][c.metric] for s, r in ((r.get("seed"), r) for r in mine)}
        other = {s: r[c.split][c.metric] for s, r in ((r.get("seed"), r) for r in theirs)}
        test = stats.paired_t([value[s] for s in paired_seeds], [other[s] for s in paired_seeds])
        if test["significant"]:
            test = also_over_test_examples(test, mine, theirs, paired_seeds, c)
    if test is None or test["p_value"] is None:  # one shared seed, or seeds that all differ alike
        test = same_seed_bootstrap(mine, theirs, paired_seeds, c)
        if test["p_value"] is None and len(paired_seeds) >= 2:
            test = {**test, "test": UNTESTED_SEEDS}
    if paired_seeds and not len(mine) == len(theirs) == len(paired_seeds):
        # the test saw only the seeds both ran: its difference is not that of the means ranked above
        test = {**test, "on_seeds": paired_seeds}
    return {"against": best["method"], **test, "result": verdict_result(test, c.higher)}


def also_over_test_examples(seed_test: dict, mine: list[dict], theirs: list[dict], seeds: list,
                            c: Comparison) -> dict:
    """A difference the seeds agree on is beyond chance only if another draw of test examples would keep it too:
    the seeds share one test split, so the t-test over them says nothing of that (one answer of 40 behind on
    every seed is "significant" to it). The paired bootstrap over test examples of the mean over seeds must
    agree; the larger p-value stands. Unchanged where there are no per-example results to resample."""
    if c.split != "test" or c.task is None:
        return seed_test
    per_seed = {}
    for name, runs in (("mine", mine), ("theirs", theirs)):
        by_seed = {r.get("seed"): r for r in runs}
        per_seed[name] = [c.task.statistic(c.metric, by_seed[s].get("test_per_example") or {}) for s in seeds]
    if not all(per_seed["mine"] + per_seed["theirs"]):
        return seed_test
    joined = {name: stats.seed_mean(columns) for name, columns in per_seed.items()}
    if not all(joined.values()) or len(joined["mine"][0][0]) != len(joined["theirs"][0][0]):
        return seed_test
    examples = stats.paired_bootstrap(joined["mine"][1], joined["mine"][0], joined["theirs"][0],
                                      resamples=c.resamples)
    if examples["p_value"] is None:
        return seed_test
    p_value = max(seed_test["p_value"], examples["p_value"])
    return {**seed_test, "test": "paired t-test over seeds, and paired bootstrap over test examples",
            "p_value": p_value, "significant": p_value < stats.ALPHA}


def verdict_result(test: dict, higher: bool) -> str:
    """worse, tie, untested, or mixed: the test, on the seeds both methods ran, finds the lower-ranked method
    better beyond chance although the mean over all its seeds ranks it lower (a failed or missing seed).
    Untested: no test could run (one run each, no per-example results), so the difference may or may not be
    noise; calling it a tie claimed what nothing measured."""
    if test.get("p_value") is None:
        return "untested"
    if not test["significant"]:
        return "tie"
    return "worse" if (test["mean_difference"] < 0) == higher else "mixed"


def same_seed_bootstrap(mine: list[dict], theirs: list[dict], shared: list, c: Comparison) -> dict:
    """The paired bootstrap over the test examples of two runs of one seed (the first shared one); runs of
    different seeds where none is shared, and then the test says so."""
    if shared:
        a, b = (next(r for r in runs if r.get("seed") == shared[0]) for runs in (mine, theirs))
        return bootstrap_verdict(a, b, c)
    test = bootstrap_verdict(mine[0], theirs[0], c)
    return {**test, "test": test["test"] + f" (seeds {mine[0].get('seed')} and {theirs[0].get('seed')})"}


UNTESTED = "none (one run each, no per-example results)"
UNTESTED_SEEDS = "none (the same difference on every seed, no per-example results)"


def bootstrap_verdict(mine: dict, theirs: dict, c: Comparison) -> dict:
    a, b = (mine.get("test_per_example") or {}), (theirs.get("test_per_example") or {})
    ca = c.task.statistic(c.metric, a) if c.task and c.split == "test" else None
    cb = c.task.statistic(c.metric, b) if c.task and c.split == "test" else None
    if not ca or not cb or len(ca[0][0]) != len(cb[0][0]):
        return {"test": UNTESTED, "p_value": None, "significant": False,
                "mean_difference": mine[c.split][c.metric] - theirs[c.split][c.metric]}
    return stats.paired_bootstrap(ca[1], ca[0], cb[0], resamples=c.resamples)


def task_for(job: dict):
    from ..tasks.base import registry

    return registry().get(job["task"])


def interval_text(summary: dict) -> str:
    if summary.get("non_finite"):
        return f"non-finite ({summary['non_finite']} of {summary['n']} runs)"
    if summary.get("mean") is None:
        return "–"
    if not summary.get("ci95"):
        return metric_text(summary["mean"])
    low, high = summary["ci95"]
    return f"{metric_text(summary['mean'])} [{metric_text(low)}, {metric_text(high)}]"
