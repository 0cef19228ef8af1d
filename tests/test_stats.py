"""The statistics against scipy and numpy on known inputs, and the summary's verdicts."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sp

from tunelab.report import stats
from tunelab.report.summary import summarize

JOB = {"task": "classification", "metrics": {"accuracy": "higher", "f1_macro": "higher", "loss": "lower"},
       "metric_for_best": "accuracy"}


def test_t_interval_matches_scipy():
    values = [0.81, 0.84, 0.79, 0.83]
    out = stats.summarize(values)
    low, high = sp.t.interval(0.95, df=3, loc=np.mean(values), scale=sp.sem(values))
    assert out["mean"] == pytest.approx(np.mean(values)) and out["std"] == pytest.approx(np.std(values, ddof=1))
    assert out["ci95"] == pytest.approx([low, high])
    assert stats.summarize([0.8])["ci95"] is None  # one run: no interval over seeds


def test_paired_t_matches_scipy_and_handles_degenerate_pairs():
    a, b = [0.80, 0.82, 0.85], [0.78, 0.81, 0.80]
    assert stats.paired_t(a, b)["p_value"] == pytest.approx(sp.ttest_rel(a, b).pvalue)
    assert stats.paired_t(a, a)["p_value"] == 1.0 and not stats.paired_t(a, a)["significant"]
    shifted = stats.paired_t([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])  # the same difference every seed: t undefined
    assert shifted["p_value"] is None and not shifted["significant"] and shifted["mean_difference"] == pytest.approx(0.1)


def test_the_same_difference_on_every_seed_is_tested_over_the_test_examples():
    """b gets one more of 20 test examples wrong than a, on both seeds: the seeds cannot say whether that is
    chance (p = 0 would claim it is not); the examples can, and one example of 20 is a tie."""
    labels = [0, 1] * 10
    right = labels[:]
    one_wrong = [1 - labels[0]] + labels[1:]

    def run(method, seed, pred):
        accuracy = sum(p == y for p, y in zip(pred, labels)) / 20
        return {"method": method, "status": "success", "seed": seed, "lr": 1e-3,
                "test": {"accuracy": accuracy, "f1_macro": accuracy, "loss": 1 - accuracy},
                "test_per_example": {"pred": pred, "label": labels, "loss": [0.1] * 20}}
    records = [run("a", s, right) for s in (1, 2)] + [run("b", s, one_wrong) for s in (1, 2)]
    verdict = {e["method"]: e for e in summarize(records, JOB)}["b"]["verdict"]
    assert verdict["test"] == "paired bootstrap over test examples" and verdict["p_value"] > 0.05
    assert verdict["result"] == "tie"
    single = [run("a", 1, right[:1]), run("b", 1, one_wrong[:1])]  # one test example: no test at all
    single[0]["test_per_example"] = {"pred": right[:1], "label": labels[:1], "loss": [0.1]}
    single[1]["test_per_example"] = {"pred": one_wrong[:1], "label": labels[:1], "loss": [0.1]}
    assert {e["method"]: e for e in summarize(single, JOB)}["b"]["verdict"]["p_value"] is None


def test_a_small_gap_found_on_every_seed_is_a_tie_when_the_test_examples_could_undo_it():
    """b misses one or two answers of 40 that a gets right, on each of 5 seeds, always the same two: the seeds
    agree (the t-test alone said "worse, p = 0.005"), but a test set without those two examples, as likely as
    not, would show no gap. A verdict over seeds must also hold over the test examples."""
    labels = [0, 1] * 20
    rng = np.random.default_rng(3)

    def run(method, seed, wrong):
        pred = [1 - y if i in wrong else y for i, y in enumerate(labels)]
        accuracy = 1 - len(wrong) / 40
        return {"method": method, "status": "success", "seed": seed, "lr": 1e-3,
                "test": {"accuracy": accuracy, "f1_macro": accuracy, "loss": 1 - accuracy},
                "test_per_example": {"pred": pred, "label": labels, "loss": [0.1] * 40}}
    records = []
    for seed in range(5):
        shared = set(rng.choice(range(10, 40), 15, replace=False).tolist())  # both miss these 15
        extra = {7, 9} - shared if seed % 2 else {7} - shared
        records += [run("a", seed, shared), run("b", seed, shared | extra)]
    verdict = {e["method"]: e for e in summarize(records, JOB)}["b"]["verdict"]
    assert verdict["result"] == "tie" and verdict["p_value"] > 0.05, verdict
    assert verdict["test"] == "paired t-test over seeds, and paired bootstrap over test examples"
    far = [r if r["method"] == "a" else run("b", r["seed"], set(range(28 + r["seed"] % 2))) for r in records]
    assert {e["method"]: e for e in summarize(far, JOB)}["b"]["verdict"]["result"] == "worse"


def test_seeds_that_agree_still_show_how_much_the_test_examples_decide():
    """22 of 40 right on both seeds: a t-interval over seeds alone has zero width and would call 0.55 clearly
    above a 0.5 baseline; which 40 examples were drawn moves it by about +-0.15."""
    labels = [0, 1] * 20
    pred = labels[:22] + [1 - y for y in labels[22:]]

    def run(seed):
        return {"method": "m", "status": "success", "seed": seed, "lr": 1e-3,
                "test": {"accuracy": 0.55, "f1_macro": 0.55, "loss": 0.45},
                "test_per_example": {"pred": pred, "label": labels, "loss": [0.1] * 40}}
    accuracy = summarize([run(1), run(2)], JOB)[0]["metrics"]["accuracy"]
    one_run = stats.bootstrap_ci(np.mean, [np.asarray(pred) == np.asarray(labels)])
    low, high = accuracy["ci95"]
    assert low < 0.5 < high and (high - low) == pytest.approx(one_run[1] - one_run[0], rel=0.05)
    assert accuracy["ci_method"] == "t-interval over seeds and bootstrap over test examples, combined"
    spread = stats.with_test_sampling({"mean": 0.5, "ci95": [0.47, 0.53]}, [0.46, 0.54])  # 0.03 and 0.04 → 0.05
    assert spread["ci95"] == pytest.approx([0.45, 0.55])


def test_bootstrap_interval_covers_the_known_proportion():
    rng = np.random.default_rng(0)
    correct = (rng.random(2000) < 0.7).astype(float)
    low, high = stats.bootstrap_ci(np.mean, [correct])
    half = 1.96 * np.sqrt(0.7 * 0.3 / 2000)  # the normal approximation's half width
    assert low < correct.mean() < high and (high - low) / 2 == pytest.approx(half, rel=0.15)


def test_paired_bootstrap_separates_a_real_gap_from_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, labels, 1 - labels)
    twin = np.where(rng.random(400) < 0.9, labels, 1 - labels)  # another draw of the same quality
    bad = np.where(rng.random(400) < 0.6, labels, 1 - labels)
    accuracy = lambda pred, label, axis=-1: np.mean(pred == label, axis=axis)  # noqa: E731
    assert stats.paired_bootstrap(accuracy, [good, labels], [bad, labels])["significant"]
    assert not stats.paired_bootstrap(accuracy, [good, labels], [twin, labels])["significant"]


def record(method, seed, accuracy):
    return {"method": method, "status": "success", "seed": seed, "lr": 1e-3,
            "test": {"accuracy": accuracy, "f1_macro": accuracy, "loss": 1 - accuracy}}


def test_summary_ranks_by_direction_and_calls_small_differences_ties():
    records = [record("a", s, v) for s, v in zip((1, 2, 3), (0.80, 0.82, 0.81))]
    records += [record("b", s, v) for s, v in zip((1, 2, 3), (0.79, 0.83, 0.80))]  # within noise of a
    records += [record("c", s, v) for s, v in zip((1, 2, 3), (0.60, 0.61, 0.62))]  # clearly worse
    entries = {e["method"]: e for e in summarize(records, JOB)}
    assert [entries[m]["rank"] for m in "abc"] == [1, 2, 3]
    assert entries["a"]["verdict"]["result"] == "best"
    assert entries["b"]["verdict"]["result"] == "tie" and entries["c"]["verdict"]["result"] == "worse"
    assert entries["c"]["verdict"]["test"] == "paired t-test over seeds"
    assert entries["a"]["metrics"]["accuracy"]["n"] == 3 and entries["a"]["metrics"]["accuracy"]["ci95"]
    by_loss = summarize(records, {**JOB, "metric_for_best": "loss"})
    assert by_loss[0]["method"] == "a" and by_loss[-1]["method"] == "c"  # lower loss first


@pytest.mark.parametrize("task_name, per_example", [
    ("classification", {"pred": [0, 2, 1, 1, 0, 2, 2], "label": [0, 2, 2, 1, 1, 2, 0],
                        "loss": [.1, .2, .9, .3, 1.2, .4, 2.]}),
    ("causal-lm", {"loss_sum": [4.0, 9.5, 2.25, 7.0], "tokens": [3, 5, 2, 4], "exact_match": [1.0, 0.0, 0.0, 1.0],
                   "token_f1": [1.0, 0.5, 0.2, 1.0]}),
])
def test_every_task_statistic_gives_each_resample_what_one_run_gives(task_name, per_example):
    """The bootstrap hands a task's statistic 2,000 resamples at once: row by row it must be the metric."""
    from tunelab.tasks.base import registry

    task = registry()[task_name]
    n = len(next(iter(per_example.values())))
    resamples = np.random.default_rng(0).integers(0, n, (50, n))
    for metric in task.metrics:
        columns, statistic = task.statistic(metric, per_example)
        together = statistic(*(c[resamples] for c in columns), axis=-1)
        one_by_one = [statistic(*(c[rows] for c in columns)) for rows in resamples]
        assert together.shape == (50,) and together == pytest.approx(one_by_one), metric
    if task_name == "classification":  # by hand: F1 of classes 0, 1, 2 is 2/4, 2/4, 4/6; 4 of 7 right
        columns, f1 = task.statistic("f1_macro", per_example)
        assert f1(*columns) == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
        assert task.statistic("accuracy", per_example)[1](*columns) == pytest.approx(4 / 7)


def test_macro_f1_and_its_interval_ignore_classes_that_never_occur():
    """A 3-class head whose test split has only classes 0 and 1, never predicted 2: the reported score (from the
    model's class count) and the bootstrap's statistic (from the classes seen) must be one and the same number."""
    from tunelab.tasks.classification import Classification, classification_metrics

    pred, label = np.array([0, 1, 1, 1, 0, 1]), np.array([0, 0, 1, 1, 1, 1])
    reported = classification_metrics(pred, label, num_labels=3)["f1_macro"]
    columns, f1 = Classification().statistic("f1_macro", {"pred": pred.tolist(), "label": label.tolist(),
                                                            "loss": [0.0] * 6})
    f1_0, f1_1 = 2 * 1 / (2 + 1 + 1), 2 * 3 / (6 + 1 + 1)
    assert reported == pytest.approx((f1_0 + f1_1) / 2) == pytest.approx(float(f1(*columns)))
    # a class that is predicted but never the label counts, with F1 0
    assert classification_metrics(np.array([2, 1]), np.array([1, 1]), 3)["f1_macro"] == pytest.approx((0 + 2 / 3) / 2)


@pytest.mark.parametrize("seeds", [(1,), (1, 2)])
def test_a_class_only_the_better_method_predicts_does_not_break_the_paired_tests(seeds):
    """3 classes, a test split of classes 0 and 1: only the better method ever predicts class 2. The paired
    tests apply one statistic to both methods' predictions; it counted the classes of one run (reshape error)."""
    labels = [0] * 20 + [1] * 20
    better = [2] * 6 + labels[6:]  # 34 of 40 right
    worse = [1] * 10 + labels[10:]  # 30 of 40 right

    def run(method, seed, pred):
        accuracy = sum(p == y for p, y in zip(pred, labels)) / 40
        return {"method": method, "status": "success", "seed": seed, "lr": 1e-3,
                "test": {"accuracy": accuracy + seed * 1e-3, "f1_macro": accuracy, "loss": 1 - accuracy},
                "test_per_example": {"pred": pred, "label": labels, "loss": [0.1] * 40}}
    records = [run("better", s, better) for s in seeds] + [run("worse", s, worse) for s in seeds]
    entries = {e["method"]: e for e in summarize(records, JOB)}
    assert entries["better"]["rank"] == 1 and entries["worse"]["verdict"]["p_value"] is not None
    assert entries["worse"]["verdict"]["mean_difference"] == pytest.approx(-0.1)


def test_classification_scores_follow_the_per_class_definition_for_many_classes():
    from tunelab.tasks.classification import scores_along

    def by_definition(pred, label, classes):
        f1 = []
        for c in set(pred) | set(label):  # the classes that occur (scikit-learn's macro average)
            tp, fp = np.sum((pred == c) & (label == c)), np.sum((pred == c) & (label != c))
            fn = np.sum((pred != c) & (label == c))
            f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return np.mean(pred == label), np.mean(f1)

    rng = np.random.default_rng(0)
    label = rng.integers(0, 50, 300)
    pred = np.where(rng.random(300) < 0.6, label, rng.integers(0, 50, 300))
    rows = rng.integers(0, 300, (7, 300))
    along_rows = scores_along(pred[rows], label[rows], 50)
    along_columns = scores_along(pred[rows].T, label[rows].T, 50, axis=0)
    for i, r in enumerate(rows):
        accuracy, f1 = by_definition(pred[r], label[r], 50)
        assert along_rows["accuracy"][i] == pytest.approx(accuracy) == along_columns["accuracy"][i]
        assert along_rows["f1_macro"][i] == pytest.approx(f1) == along_columns["f1_macro"][i]


def test_holm_adjusts_step_down_within_the_whole_family():
    assert stats.holm([0.01, 0.04, 0.03], family=3) == pytest.approx([0.03, 0.06, 0.06])
    # 3 comparisons made of 6 pairs: the others count as p = 1, after these
    assert stats.holm([0.01, 0.04, 0.03], family=6) == pytest.approx([0.06, 0.16, 0.15])
    assert stats.holm([0.4, 0.3], family=10) == [1.0, 1.0]
    assert stats.resamples_for(66) * stats.ALPHA / 66 > 2  # the smallest threshold is reachable


def test_equal_methods_seldom_get_a_worse_verdict_however_many_are_compared():
    """Five methods of the same true accuracy (80 % of 200 examples, answers drawn independently): the best is
    whichever drew luckiest, and tested at 5 % each against it, about a quarter of such reports called some
    method worse (27 % of 1,000 simulated reports). Adjusted over all pairs: 3.3 % of 1,000, within the 5 % the
    report promises; here 60 reports, with room for chance."""
    rng = np.random.default_rng(1)
    reports_with_a_worse = reports_below_5_percent_unadjusted = 0
    for _ in range(60):
        labels = rng.integers(0, 2, 200)
        records = []
        for k in range(5):
            pred = np.where(rng.random(200) < 0.2, 1 - labels, labels)
            accuracy = float((pred == labels).mean())
            records.append({"method": f"m{k}", "seed": 1, "status": "success",
                            "test": {"accuracy": accuracy, "f1_macro": accuracy, "loss": 0.5},
                            "test_per_example": {"pred": pred.tolist(), "label": labels.tolist(), "loss": [0.5] * 200}})
        entries = summarize(records, JOB)
        reports_with_a_worse += any(e["verdict"]["result"] == "worse" for e in entries)
        reports_below_5_percent_unadjusted += any(e["verdict"].get("p_value_unadjusted", 1) < 0.05 for e in entries)
        assert all(e["verdict"].get("holm_pairs") == 10 for e in entries if e["rank"] > 1)
    assert reports_with_a_worse <= 6 and reports_below_5_percent_unadjusted >= 8


@pytest.mark.parametrize("p_value, shown", [(0.0123, "= 0.012"), (0.0495, "= 0.0495"), (0.05049, "= 0.0505"), (0.0506, "= 0.051"),
                                            (0.04999, "= 0.04999"), (0.0004, "< 0.001"), (0.5, "= 0.500")])
def test_a_p_value_is_printed_on_its_side_of_the_5_percent_line(p_value, shown):
    from tunelab.report.markdown import p_text

    assert p_text(p_value) == shown


def test_a_diverged_seed_or_a_null_metric_leaves_the_method_unranked():
    """lora's best seeds score highest, but its third seed diverged: ranked by the two that survived, an unstable
    method came first. full's null accuracy (results.json writes a NaN so) is a non-finite value, not a
    missing seed."""
    def run(method, seed, accuracy, status="success"):
        record = {"method": method, "seed": seed, "status": status, "lr": 1e-3}
        if status == "success":
            record["test"] = {"accuracy": accuracy, "f1_macro": accuracy, "loss": 0.5}
        return record
    records = [run("lora", 1, 0.9), run("lora", 2, 0.91), run("lora", 3, None, "diverged"),
               run("ia3", 1, 0.8), run("ia3", 2, 0.82), run("ia3", 3, 0.81),
               run("full", 1, 0.85), run("full", 2, None), run("full", 3, 0.86)]
    entries = {e["method"]: e for e in summarize(records, JOB)}
    assert entries["ia3"]["rank"] == 1
    for method in ("lora", "full"):
        assert entries[method]["verdict"]["result"] == "unranked"
        assert entries[method]["metrics"]["accuracy"]["non_finite"] == 1 and entries[method]["n"] == 3


def test_a_zero_width_interval_is_explained_not_shown_as_certainty():
    """48 of 48 right: every bootstrap resample scores 1.0, so the percentile interval is [1, 1]."""
    from tunelab.report.markdown import ranking

    labels = [i % 3 == 0 for i in range(48)]
    records = [{"method": m, "seed": 1, "status": "success",
                "test": {"accuracy": acc, "f1_macro": acc, "loss": 0.1},
                "test_per_example": {"pred": pred, "label": labels, "loss": [0.1 + i / 100 for i in range(48)]}}
               for m, pred, acc in (("a", labels, 1.0), ("b", [not x for x in labels[:2]] + labels[2:], 46 / 48))]
    entries = summarize(records, JOB)
    assert entries[0]["metrics"]["accuracy"]["ci95"] == [1.0, 1.0]
    text = "\n".join(ranking(entries, JOB))
    assert "An interval of zero width (a) means every resample gave the same value" in text


def test_an_interval_is_clearly_above_the_baseline_only_where_the_printed_digits_show_it():
    from tunelab.report.markdown import clearly_beats

    assert not clearly_beats({"mean": 0.679, "ci95": [0.66679, 0.69221]}, 2 / 3, higher=True)  # prints [0.667, ...]
    assert clearly_beats({"mean": 0.679, "ci95": [0.6680, 0.69]}, 2 / 3, higher=True)
    assert not clearly_beats({"mean": 1.2, "ci95": [1.1, 1.30004]}, 1.3, higher=False)
    assert clearly_beats({"mean": 1.2, "ci95": [1.1, 1.29]}, 1.3, higher=False)
