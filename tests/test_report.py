"""The report reads result files only, including those written before the task layer existed."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tunelab.cli import main

LEGACY = Path(__file__).parent / "data" / "results-v0.1-classification.json"


def test_results_written_before_tasks_still_rebuild_a_report(tmp_path):
    shutil.copy(LEGACY, tmp_path / "results.json")
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Task `classification`" in report and "| full | success |" in report
    assert "Every method: 12 steps (0.096 epochs), batch 16" in report  # train.max_steps=12 beat epochs=1.0
    majority = json.loads(LEGACY.read_text())["job"]["majority_baseline_test"]
    assert f"Baseline (majority class): validation: accuracy 0.650; test: accuracy {majority:.3f}." in report
    assert (tmp_path / "plots" / "tradeoffs.png").stat().st_size > 1000
    # one run each and no per-example results: no test could run, and the report says so (it called them ties)
    assert "| 2 | lora | 1 | 0.657 | 0.397 | 0.674 | untested (+0.000) |" in report and " tie" not in report
    assert "Not tested against the best (no per-example test results, and one run each): lora" in report
    # results.csv has the metric columns the report shows (it had none: the file names no metrics)
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"best_val.accuracy", "test.accuracy", "test.f1_macro"} <= set(header)


def test_the_report_is_written_in_utf8_whatever_the_locale(tmp_path):
    """report.md has arrows (↑/↓): under an ASCII locale (or Windows' cp1252) writing it crashed at the end of
    every comparison."""
    import subprocess
    import sys

    shutil.copy(LEGACY, tmp_path / "results.json")
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"}
    done = subprocess.run([sys.executable, "-m", "tunelab", "report", str(tmp_path)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "↑" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_an_artifact_size_counts_its_own_files_not_the_trials_saved_inside_it(tmp_path):
    from tunelab.experiment.runner import own_files

    (tmp_path / "trial-000").mkdir()
    for name, size in (("adapter_model.safetensors", 100), ("tunelab.json", 10), ("trial-000/tunelab.json", 10),
                       ("trial-000/adapter_model.safetensors", 1000)):
        (tmp_path / name).write_bytes(b"x" * size)
    assert sorted(f.name for f in own_files(tmp_path)) == ["adapter_model.safetensors", "tunelab.json"]


def test_report_on_a_folder_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere' does not exist: give the --output folder of a compare" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a readable results file" in capsys.readouterr().err


def test_a_hand_edited_results_file_is_refused_naming_each_field(tmp_path, capsys):
    """Edits the report cannot read were tracebacks (KeyError, TypeError); each is named, all at once."""
    payload = json.loads(LEGACY.read_text())
    payload["job"]["metric_for_best"] = "accuracy_typo"
    payload["methods"][0]["test"]["accuracy"] = "0.9"
    del payload["methods"][1]["history"][0]["step"]
    (tmp_path / "results.json").write_text(json.dumps(payload))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "job.metric_for_best: 'accuracy_typo' is not one of job.metrics" in err
    assert "methods[0] (full).test.accuracy: '0.9' is not a number" in err
    assert "methods[1] (lora).history: every entry must be an object with an integer \"step\"" in err


def test_plots_an_earlier_build_drew_are_removed_when_no_longer_drawn(tmp_path):
    shutil.copy(LEGACY, tmp_path / "results.json")
    assert main(["report", str(tmp_path)]) == 0 and (tmp_path / "plots" / "tradeoffs.png").is_file()
    payload = json.loads(LEGACY.read_text())
    for record in payload["methods"]:
        record["status"] = "failed"
    (tmp_path / "results.json").write_text(json.dumps(payload))
    assert main(["report", str(tmp_path)]) == 0
    assert "## Plots" not in (tmp_path / "report.md").read_text() and not list((tmp_path / "plots").glob("*.png"))


def test_the_report_ranks_the_records_as_they_are_now(tmp_path):
    """A results.json whose records were edited (a method's runs removed) still reports, ranked from the
    records, not from the summary stored when they were written (that crashed with a KeyError)."""
    payload = json.loads(LEGACY.read_text())
    kept = payload["methods"][:1]
    payload["methods"] = kept
    payload["summary"] = [{"method": "gone", "rank": 1}]  # stale: names a method that has no records any more
    (tmp_path / "results.json").write_text(json.dumps(payload))
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "gone" not in report and f"| {kept[0]['method']} | success |" in report
    # results.json's summary and results.csv are rewritten to agree with the report, the rest of the file kept
    rewritten = json.loads((tmp_path / "results.json").read_text())
    assert [e["method"] for e in rewritten["summary"]] == [kept[0]["method"]]
    assert rewritten["created"] == payload["created"] and rewritten["methods"] == kept
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and kept[0]["method"] in rows[1]


def test_an_untested_difference_over_seeds_says_why(tmp_path):
    """The same gap on both seeds and no per-example results: no test applies, and the report said "one run
    each" and advised --seeds 3 to a two-seed experiment."""
    payload = json.loads(LEGACY.read_text())
    full = next(r for r in payload["methods"] if r["method"] == "full")
    runs = []
    for method, accuracy in (("full", 0.70), ("lora", 0.65)):
        for seed in (42, 43):
            test = {**full["test"], "accuracy": accuracy + (seed - 42) * 0.01}
            runs.append({**full, "method": method, "run_id": f"{method}/seed-{seed}", "seed": seed, "test": test})
    (tmp_path / "results.json").write_text(json.dumps({**payload, "methods": runs, "summary": []}))
    assert main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| lora | 2 |" in report and "untested (-0.050)" in report
    assert ("Not tested against the best (no per-example test results, and the same difference on every seed): "
            "lora; whether the gap is noise is unknown: a test split (data.test_file) gives a test.") in report


def test_a_tuned_comparison_keeps_its_trial_plots_when_no_final_run_succeeded(tmp_path):
    """The stale-plot cleanup deleted sweep_lr.png, which sweep.md still shows, when every final run failed."""
    from tunelab.report.figures import write_figures

    trials = [{"params": {"lora.lr": lr}, "value": v, "state": "COMPLETE"} for lr, v in ((1e-4, 0.6), (1e-3, 0.7))]
    studies = {"lora": {"trials": trials, "metric": "accuracy", "importances": {}}}
    job = {"metrics": {"accuracy": "higher"}, "metric_for_best": "accuracy"}
    drawn = write_figures(tmp_path, [{"method": "lora", "status": "failed"}], job, [], studies)
    assert [p.name for p in drawn] == ["sweep_lr.png"] and (tmp_path / "plots" / "sweep_lr.png").is_file()
