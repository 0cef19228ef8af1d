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

from conftest import cli_here
from tunelab.experiment import forkserver

RUN = ["train.epochs=1", "train.checkpoint_every_steps=3", "train.eval_every_steps=4", "train.log_every_steps=2"]


def compare(args, out, fault="", resume=False):
    """`tunelab compare` in this process: its runs are in processes of their own all the same."""
    return cli_here(["compare", *args, "--output", str(out), "--no-progress", *(["--resume"] if resume else [])],
                    fault)


def records(out):
    return {r["run_id"]: r for r in json.loads((out / "results.json").read_text())["methods"]}


def test_a_killed_run_is_recorded_the_others_continue_and_resume_finishes_it(tiny_overrides, tmp_path):
    args = [*tiny_overrides, *RUN, "methods=lora,full", "lora.lr=1e-2"]
    first = compare(args, tmp_path, fault="lora/kill@step=7")
    assert first.returncode == 1, first.stderr[-2000:]
    runs = records(tmp_path)
    assert runs["lora"]["status"] == "failed" and "killed by SIGKILL" in runs["lora"]["error"]
    assert "lora failed: " in first.stderr and "SIGKILL" in first.stderr  # why, beside the table's "failed"
    assert runs["full"]["status"] == "success"
    pids = {runs["full"]["pid"], os.getpid()}  # (this process ran the experiment)
    resumed = compare([], tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    runs = records(tmp_path)
    assert runs["lora"]["status"] == "success" and runs["lora"]["pid"] not in pids
    assert runs["lora"]["steps"] == 20 and runs["lora"]["startup_s"] > 0
    assert runs["lora"]["process_start"] == forkserver.start_mode()  # this machine: Linux, no CUDA device


def test_a_second_ctrl_c_aborts_the_run_in_a_line_and_resume_finishes_it(tiny_overrides, tmp_path, capfd):
    """It printed a traceback of wherever it struck (pruning an old checkpoint, say), and the record said the
    run was stopped "while starting" at step 7."""
    args = [*tiny_overrides, *RUN, "methods=lora", "lora.lr=1e-2"]
    aborted = compare(args, tmp_path, fault="abort@step=7")
    assert aborted.returncode == 130, aborted.stderr[-2000:]
    run_err = capfd.readouterr().err  # the run's process writes to this process's stderr
    assert "lora: aborted by a second Ctrl-C" in run_err and "Traceback" not in run_err
    lora = records(tmp_path)["lora"]
    assert lora["status"] == "interrupted" and "(a second Ctrl-C aborted it)" in lora["error"]
    assert compare([], tmp_path, resume=True).returncode == 0
    assert records(tmp_path)["lora"]["resumed_from_step"] == 6


def test_seeds_give_one_run_each_and_a_summary_over_them(tiny_overrides, tmp_path):
    result = compare([*tiny_overrides, "methods=lora,prompt-tuning", "train.max_steps=4", "--seeds", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = records(tmp_path)
    assert set(runs) == {"lora/seed-42", "lora/seed-43", "prompt-tuning/seed-42", "prompt-tuning/seed-43"}
    assert len({r["pid"] for r in runs.values()}) == 4  # a fresh process per run
    # a run that succeeded leaves its artifact, not its resumable checkpoints
    assert (tmp_path / "artifacts" / "lora" / "seed-43").is_dir()
    assert runs["lora/seed-43"]["artifact_dir"] == "artifacts/lora/seed-43"
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


@pytest.mark.parametrize("fork_server", ["1", "0"])
def test_a_killed_experiment_leaves_no_run_training(fork_server, tiny_overrides, tmp_path):
    """`kill -9` of tunelab's own process: its run (forked from the server, or a fresh interpreter) dies too,
    instead of training on beside a --resume that would write the same checkpoints."""
    args = [*tiny_overrides, "methods=lora", "train.max_steps=5000", "train.eval_every_steps=0",
            "train.checkpoint_every_steps=20"]
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "compare", *args, "--output", str(tmp_path),
                                "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "TUNELAB_FORK_SERVER": fork_server})
    checkpoints = tmp_path / "checkpoints" / "lora"
    deadline = time.time() + 300
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())) and time.time() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    deadline = time.time() + 20
    while time.time() < deadline and group_alive(process.pid):
        time.sleep(0.1)
    alive = group_alive(process.pid)
    if alive:
        os.killpg(process.pid, signal.SIGKILL)
    assert not alive, "a process of the killed experiment was still running 20 s later"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_stop_that_comes_while_a_run_starts_stops_the_experiment(tiny_overrides, tmp_path, monkeypatch):
    """Ctrl-C in the moment a run's process is being started (the run ignores Ctrl-C until its loop can
    checkpoint) was lost: the experiment trained on and exited 0."""
    import tunelab
    from tunelab.errors import CompareInterrupted
    from tunelab.experiment import isolation

    start = isolation.start_rank

    def ctrl_c_while_starting(args, env):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs now, before the process exists
        return start(args, env)
    monkeypatch.setattr(isolation, "start_rank", ctrl_c_while_starting)
    with pytest.raises(CompareInterrupted, match="interrupted during lora"):
        tunelab.compare(None, [*tiny_overrides, "methods=lora,full", "train.max_steps=2"], output_dir=tmp_path,
                        show_progress=False)
    lora = records(tmp_path)["lora"]
    assert lora["status"] == "interrupted" and "stopped by SIGINT while starting" in lora["error"]
    assert "full" not in records(tmp_path)


def test_a_stop_that_comes_as_a_run_finishes_keeps_the_run_and_stops_after_it(tiny_overrides, tmp_path,
                                                                               monkeypatch):
    """SIGTERM while the run writes its record: the run counts, and the experiment stops there (it went on
    to the next method and exited 0)."""
    import tunelab
    from tunelab.errors import CompareInterrupted
    from tunelab.experiment import isolation

    run_processes = isolation.run_processes

    def stopped_as_it_ends(args, nproc, stop, env=None):
        result = run_processes(args, nproc, stop, env)
        stop.signum = signal.SIGTERM
        return result
    monkeypatch.setattr(isolation, "run_processes", stopped_as_it_ends)
    with pytest.raises(CompareInterrupted, match="interrupted after lora"):
        tunelab.compare(None, [*tiny_overrides, "methods=lora,full", "train.max_steps=2"], output_dir=tmp_path,
                        show_progress=False)
    assert list(records(tmp_path)) == ["lora"] and records(tmp_path)["lora"]["status"] == "success"
    monkeypatch.setattr(isolation, "run_processes", run_processes)
    tunelab.compare(output_dir=tmp_path, resume=True, show_progress=False)
    assert [r["status"] for r in records(tmp_path).values()] == ["success", "success"]


def test_resume_takes_a_finished_record_the_killed_experiment_had_not_added_to_its_results(tmp_path):
    """The run wrote records/<run>.json, then tunelab's own process was killed before results.json had it:
    --resume must not train that run again."""
    from tunelab.experiment.folder import finished_records

    (tmp_path / "records").mkdir()
    for run_id, status in (("full", "success"), ("lora", "interrupted"), ("ia3", "diverged")):
        (tmp_path / "records" / f"{run_id}.json").write_text(json.dumps({"method": run_id, "run_id": run_id,
                                                                             "status": status}))
    (tmp_path / "records" / "half.json").write_text('{"run_id": "half", "sta')
    (tmp_path / "results.json").write_text(json.dumps({"methods": [{"method": "bitfit", "run_id": "bitfit",
                                                                       "status": "success"}]}))
    assert sorted(finished_records(tmp_path)) == ["bitfit", "full", "ia3"]


def test_sigterm_outside_a_run_stops_the_command_as_ctrl_c_does(monkeypatch, capsys):
    """Between runs (preparing data, writing the report) SIGTERM killed tunelab with Python's default: exit
    -15 and no word; now it stops as Ctrl-C does (exit 130, "interrupted")."""
    from tunelab import cli

    def terminated_while_preparing(args):
        os.kill(os.getpid(), signal.SIGTERM)
        return 0
    monkeypatch.setattr(cli, "dispatch", terminated_while_preparing)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["validate"]) == 130 and "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
