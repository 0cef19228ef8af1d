"""Each run in its own process: its memory and failures are its own, and a run whose process dies is
recorded as failed while the others go on; --resume then finishes it from its checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import signal
import sys
import time

import pytest

from tunelab.experiment import forkserver

RUN = ["train.epochs=1", "train.checkpoint_every_steps=3", "train.eval_every_steps=4", "train.log_every_steps=2"]


def compare(args, out, fault="", resume=False):
    env = {**os.environ, "TUNELAB_FAULT": fault}
    extra = ["--resume"] if resume else []
    return subprocess.run([sys.executable, "-m", "tunelab.cli", "compare", *args, "--output", str(out), "--no-progress",
                           *extra], capture_output=True, text=True, timeout=600, env=env)


def records(out):
    return {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["methods"]}


def test_a_killed_run_is_recorded_the_others_continue_and_resume_finishes_it(tiny_overrides, tmp_path):
    args = [*tiny_overrides, *RUN, "methods=lora,full", "lora.lr=1e-2"]
    first = compare(args, tmp_path, fault="lora/kill@step=7")
    assert first.returncode == 1, first.stderr[-2000:]
    runs = records(tmp_path)
    assert runs["lora"]["status"] == "failed" and "killed by SIGKILL" in runs["lora"]["error"]
    assert runs["full"]["status"] == "success"
    pids = {runs["full"]["pid"], os.getpid()}
    resumed = compare([], tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    runs = records(tmp_path)
    assert runs["lora"]["status"] == "success" and runs["lora"]["pid"] not in pids
    assert runs["lora"]["steps"] == 20 and runs["lora"]["startup_s"] > 0
    assert runs["lora"]["process_start"] == forkserver.start_mode()  # this machine: Linux, no CUDA device


def test_seeds_give_one_run_each_and_a_summary_over_them(tiny_overrides, tmp_path):
    result = compare([*tiny_overrides, "methods=lora,prompt-tuning", "train.max_steps=4", "--seeds", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = records(tmp_path)
    assert set(runs) == {"lora/seed-42", "lora/seed-43", "prompt-tuning/seed-42", "prompt-tuning/seed-43"}
    assert len({r["pid"] for r in runs.values()}) == 4  # a fresh process per run
    # a run that succeeded leaves its artifact, not its resumable checkpoints
    assert (tmp_path / "artifacts" / "lora" / "seed-43").is_dir()
    assert not (tmp_path / "checkpoints" / "lora" / "seed-43").exists()
    assert runs["lora/seed-43"]["checkpoints_removed_mb"] >= 0
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert {e["method"] for e in summary} == {"lora", "prompt-tuning"}
    for entry in summary:
        assert entry["n"] == 2 and entry["seeds"] == [42, 43]
        ci_method = entry["metrics"]["accuracy"]["ci_method"]
        assert ci_method == "t-interval over seeds and bootstrap over test examples, combined"
        assert entry["verdict"]["result"] in ("best", "tie", "worse")
    assert "## Ranking" in (tmp_path / "report.md").read_text()


def test_a_runs_peak_memory_does_not_depend_on_what_ran_before(tiny_overrides, tmp_path):
    peaks = {}
    for order in ("full,lora", "lora,full"):
        out = tmp_path / order.replace(",", "-")
        assert compare([*tiny_overrides, f"methods={order}", "train.max_steps=3"], out).returncode == 0
        peaks[order] = records(out)["lora"]["peak_memory_mb"]
    assert abs(peaks["full,lora"] - peaks["lora,full"]) < 0.05 * peaks["lora,full"], peaks


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_alone_checkpoints_the_run_and_stops(signum, tiny_overrides, tmp_path):
    """`kill -TERM` from a scheduler preempting the job, or `kill -INT`, reaches only tunelab's own process:
    it passes the stop on, the run checkpoints after its step, and the experiment stops, resumable."""
    args = [*tiny_overrides, "methods=lora,full", "train.max_steps=5000", "train.eval_every_steps=0",
            "train.checkpoint_every_steps=20"]
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "compare", *args, "--output", str(tmp_path),
                                "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # a group of its own: nothing else gets the signal
    checkpoints = tmp_path / "checkpoints" / "lora"
    deadline = time.time() + 300
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())) and time.time() < deadline:
        time.sleep(0.05)  # training has begun once the first checkpoint is there
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    lora = records(tmp_path)["lora"]
    assert lora["status"] == "interrupted" and "full" not in records(tmp_path)
    stopped_at = int(lora["error"].split("stopped at step ")[1].split(";")[0])
    assert 20 <= stopped_at < 5000 and (checkpoints / f"step-{stopped_at:06d}").is_dir()  # the stop's own checkpoint
    assert "--resume" in err
