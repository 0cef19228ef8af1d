"""The report on records as they may be: edited by hand, from diverged runs, with data that looks like markup.
It must show such text as text, rank what has no value last, and claim nothing that run-to-run noise explains."""
from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tunelab.cli import main

LEGACY = Path(__file__).parent / "data" / "results-v0.1-classification.json"


def seeded(payload: dict, seeds=(42, 43, 44)) -> dict:
    """Each record of the one-seed file as three seeds, the test accuracy nudged per seed."""
    records = []
    for r in payload["methods"]:
        for i, seed in enumerate(seeds):
            run = {**copy.deepcopy(r), "seed": seed, "run_id": f"{r['method']}/seed-{seed}"}
            run["test"]["accuracy"] += 0.01 * i
            records.append(run)
    return {**payload, "methods": records}


def report_of(tmp_path: Path, payload: dict) -> str:
    (tmp_path / "results.json").write_text(json.dumps(payload))
    assert main(["report", str(tmp_path)]) == 0
    return (tmp_path / "report.md").read_text()


def test_markup_in_data_and_records_is_shown_as_text_and_only_own_plots_are_embedded(tmp_path):
    (tmp_path.parent / "secret.txt").write_text("SECRET-TOKEN")
    payload = json.loads(LEGACY.read_text())
    payload["job"]["labels"] = ["<script>alert('label')</script>", "a|b", "&lt;b&gt;"]
    failed = {**payload["methods"][1], "status": "failed", "method": "bit|fit",
              "error": "<img alt=\"x\" src=\"../secret.txt\"> ![y](../secret.txt) [link](javascript:alert(1))"}
    payload["methods"].append(failed)
    report = report_of(tmp_path, payload)
    page = (tmp_path / "report.html").read_text()
    assert "<script" not in page and "javascript:" not in page.replace("javascript:alert(1))", "")
    assert "&lt;script&gt;alert('label')&lt;/script&gt;" in page  # shown, as written
    assert "&amp;lt;b&amp;gt;" in page  # an entity in the data is shown as the entity, not the character
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert embedded and all(b"SECRET-TOKEN" not in data for data in embedded)
    # and should an image reference reach the Markdown, only the report's own plots are read
    from tunelab.report.html import write_html

    other = write_html(tmp_path, "![y](../secret.txt) ![z](plots/../../secret.txt)", name="other.html").read_text()
    assert "SECRET" not in other and other.count("is not one of the report's plots") == 2
    row = next(line for line in report.splitlines() if line.startswith("| bit"))
    assert row.count(" | ") == next(line for line in report.splitlines() if line.startswith("| full")).count(" | ")


def test_a_method_with_a_diverged_seed_ranks_last_and_never_as_a_tie(tmp_path):
    payload = seeded(json.loads(LEGACY.read_text()))
    for r in payload["methods"]:
        if r["method"] == "lora" and r["seed"] != 44:
            r["test"]["accuracy"] = float("nan")
        if r["method"] == "llrd":
            r["test"]["accuracy"] = float("nan")  # every seed
    report = report_of(tmp_path, payload)
    ranking = [line for line in report.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [line.split(" | ")[1] for line in ranking][-2:] in (["lora", "llrd"], ["llrd", "lora"])
    lora = next(line for line in ranking if " lora " in line)
    assert "non-finite (2 of 3 runs)" in lora and "unranked" in lora and "tie" not in lora
    assert "No finite accuracy (a run diverged, or gave none): " in report
    assert ", seeds 42, 43, 44." in report  # the header names every seed the runs used
    for r in payload["methods"]:
        r["test"]["accuracy"] = float("nan")
    (tmp_path / "all").mkdir()
    report = report_of(tmp_path / "all", payload)
    assert "| best |" not in report and "- No method has a finite accuracy" in report
    assert "Verdicts:" not in report and "No method was tested against the best" in report


def test_records_missing_optional_fields_still_report(tmp_path):
    payload = json.loads(LEGACY.read_text())
    for r in payload["methods"]:
        for key in ("artifact_size_mb", "trainable_params", "train_samples_per_s", "peak_memory_mb",
                    "trainable_percent"):
            r.pop(key)
    payload["methods"][0]["losses"] = []
    report = report_of(tmp_path, payload)
    assert "| full | success | – |" in report


@pytest.mark.parametrize("content", ['{"methods": 5}', "[1, 2]", '{"methods": [{"status": "success"}]}'])
def test_a_file_that_is_not_a_results_file_is_refused(tmp_path, capsys, content):
    (tmp_path / "results.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a results file" in capsys.readouterr().err


def test_speed_and_memory_are_claimed_only_beyond_run_to_run_variation(tmp_path):
    payload = seeded(json.loads(LEGACY.read_text()), seeds=(42, 43))
    for r in payload["methods"]:
        r["train_samples_per_s"] = {"full": 19.2, "lora": 16.5}.get(r["method"], 15.1) + (r["seed"] - 42) * 10
        r["peak_memory_mb"] = 382.0 + (r["seed"] - 42)
    (tmp_path / "overlap").mkdir()
    report = report_of(tmp_path / "overlap", payload)
    assert "no method is faster than the others beyond run-to-run variation" in report
    assert "Peak memory: no method needs clearly less than the others" in report
    for r in payload["methods"]:
        r["train_samples_per_s"] = 100.0 + r["seed"] % 2 if r["method"] == "lora" else 40.0 + r["seed"] % 2
    (tmp_path / "clear").mkdir()
    clear = report_of(tmp_path / "clear", payload)
    assert "Fastest to train: **lora** (100.5 samples/s, 2.48× full).\n" in clear  # two runs each: no caveat
    mixed = {**payload, "methods": [r for r in payload["methods"] if r["seed"] == 42 or r["method"] == "lora"]}
    (tmp_path / "mixed").mkdir()  # two runs of lora, one of the others: "one run each" would be untrue
    assert ("Fastest to train: **lora** (100.5 samples/s, 2.51× full). One run of full, llrd, prompt-tuning: how much "
            "their timings vary between runs was not measured.") in report_of(tmp_path / "mixed", mixed)
    payload["methods"] = [r for r in payload["methods"] if r["seed"] == 42]
    (tmp_path / "single").mkdir()
    assert ("Fastest to train: **lora** (100.0 samples/s, 2.50× full). One run each: how much these timings vary "
            "between runs was not measured.") in report_of(tmp_path / "single", payload)


def test_an_interrupted_comparison_names_the_methods_it_did_not_reach(tmp_path):
    payload = json.loads(LEGACY.read_text())
    payload["methods"] = [r for r in payload["methods"] if r["method"] in ("full", "lora")]
    for r in payload["methods"]:
        r["config"]["methods"] = ["full", "lora", "bitfit"]
    assert "- Not run (the comparison stopped before them): bitfit." in report_of(tmp_path, payload)


def test_runs_trained_with_different_settings_are_named_not_ranked_as_one_comparison(tmp_path):
    """A results.json put together from two experiments (600 steps and 20): the header stated the first run's
    settings for every method and ranked them against each other without a word."""
    payload = seeded(json.loads(LEGACY.read_text()), seeds=(42, 43))
    assert "Runs trained with different settings" not in report_of(tmp_path, payload)  # seeds differ by design
    for r in payload["methods"]:
        if r["method"] == "lora":
            r["config"]["train"]["max_steps"] = 20
            r["hyperparameters"] = {"train.batch_size": 4}  # a tuned value differs by design too
            r["config"]["train"]["batch_size"] = 4
    text = report_of(tmp_path, payload)
    assert "- **Runs trained with different settings**, so this is not one comparison: `train.max_steps`" in text
    assert "20 (lora/seed-42, lora/seed-43)" in text and "train.batch_size" not in text.split("different settings")[1]


def test_small_and_huge_numbers_keep_their_digits():
    from tunelab.report.markdown import human_count, verdict_text
    from tunelab.report.summary import interval_text

    assert interval_text({"mean": 4.2e-4, "ci95": [3.1e-4, 5.3e-4]}) == "0.00042 [0.00031, 0.00053]"
    assert interval_text({"mean": 1e300}) == "1e+300" and interval_text({"mean": 0.8375}) == "0.838"
    worse = {"result": "worse", "mean_difference": 2.5e-4, "p_value": 0.0004}
    assert verdict_text(worse) == "worse (+0.00025, p < 0.001)"
    assert human_count(6_738_415_616) == "6.74 B"


def test_the_terminal_table_shows_names_as_written_and_report_md_escapes_them():
    from tunelab.report import table
    from tunelab.report.view import job_view, plain_text

    payload = json.loads(LEGACY.read_text())
    payload["methods"][0]["run_id"] = "lora_r8*"
    view = job_view(payload)
    assert "| lora\\_r8\\* |" in "\n".join(table(payload["methods"], view))
    assert "| lora_r8* |" in "\n".join(table(payload["methods"], view, text=plain_text))


def scored_run(method: str, seed: int, correct: int, examples: int = 200) -> dict:
    """A finished run whose test predictions get the first `correct` of `examples` right."""
    labels = [i % 2 for i in range(examples)]
    preds = [label if i < correct else 1 - label for i, label in enumerate(labels)]
    losses = [0.1 if i < correct else 2.0 for i in range(examples)]
    return {"method": method, "seed": seed, "run_id": f"{method}/seed-{seed}", "status": "success",
            "test": {"accuracy": correct / examples, "f1_macro": correct / examples, "loss": float(np.mean(losses))},
            "test_per_example": {"pred": preds, "label": labels, "loss": losses}}


CLASSIFICATION_JOB = {"task": "classification", "metric_for_best": "accuracy",
                      "metrics": {"accuracy": "higher", "f1_macro": "higher", "loss": "lower"}}


def test_intervals_stay_within_what_the_metric_can_take():
    from tunelab.report.summary import summarize

    # two seeds far apart: the t-interval (t = 12.7 for one degree of freedom) reaches far past [0, 1]
    entry, = summarize([scored_run("full", 42, 30), scored_run("full", 43, 190)], CLASSIFICATION_JOB)
    for metric in ("accuracy", "f1_macro"):
        low, high = entry["metrics"][metric]["ci95"]
        assert low == 0.0 and high == 1.0, (metric, low, high)
    assert entry["metrics"]["loss"]["ci95"][0] == 0.0  # a loss is never negative


def test_a_verdict_on_fewer_seeds_than_the_ranking_says_so_and_is_not_called_a_tie_when_it_disagrees(tmp_path):
    from tunelab.report.markdown import ranking, verdict_text
    from tunelab.report.summary import summarize

    # full: seeds 42 and 43 (mean 0.8); lora: seed 43 failed, seed 42 clearly better than full's seed 42
    records = [scored_run("full", 42, 120), scored_run("full", 43, 200), scored_run("lora", 42, 150)]
    best, lora = summarize(records, CLASSIFICATION_JOB)
    assert (best["method"], lora["method"]) == ("full", "lora")
    assert lora["verdict"]["on_seeds"] == [42] and lora["verdict"]["result"] == "mixed"
    assert lora["verdict"]["mean_difference"] == pytest.approx(0.15)
    assert verdict_text(lora["verdict"]).startswith("mixed (+0.150 on seed 42 only, p ")
    # the same seeds on both sides: no such note
    even, = [e for e in summarize(records[:2] + [scored_run("lora", 42, 118), scored_run("lora", 43, 196)],
                                  CLASSIFICATION_JOB) if e["method"] == "lora"]
    assert "on_seeds" not in even["verdict"] and even["verdict"]["result"] == "tie"
    assert "| mixed (+0.150 on seed 42 only, p < 0.001) |" in "\n".join(ranking([best, lora], CLASSIFICATION_JOB))


def test_results_files_are_strict_json(tmp_path):
    from tunelab.experiment.results import strict_json

    text = strict_json({"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "NaN"})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard {name}")) == \
        {"a": None, "b": [1.0, None, {"c": None}], "d": "NaN"}
