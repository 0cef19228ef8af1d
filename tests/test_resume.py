"""Crash recovery: a run killed mid-epoch and resumed ends bit-identical to one that never stopped."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.train.checkpoint import Checkpointer, is_complete

from conftest import PINNED, cli_forked, cli_here
from test_methods_matrix import MATRIX, NOT_APPLICABLE

# every method that runs on the tiny classification job (the others are refused there by validate)
RESUMABLE = sorted(m for m in MATRIX if (m, "classification") not in NOT_APPLICABLE)

RUN = ["train.epochs=2", "train.checkpoint_every_steps=3", "train.eval_every_steps=4",
       "train.keep_checkpoints_after_success=true",  # the final checkpoint is compared below
       "train.early_stopping_patience=0", "train.log_every_steps=2"]
STEPS = 40  # 160 toy rows / batch 8 × 2 epochs


# Crash tests run every method inside the `tunelab compare` process (--in-process), so a kill takes the whole
# experiment down, as a crashed machine would; test_isolation.py covers a run's own process dying.
IN_PROCESS = ["--in-process"]


def tunelab(args, out: Path, fault: str | None = None, timeout: int = 300,
            fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """The real command in a child process: needed where the process is killed. The child is forked from
    tunelab's preloaded server, as runs are (seconds faster than importing torch anew), or is a fresh
    interpreter as a user's `tunelab compare` is."""
    command = ["compare", *args, "--output", str(out), "--no-progress", *IN_PROCESS]
    if fresh_interpreter:
        return subprocess.run([sys.executable, "-m", "tunelab.cli", *command], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "TUNELAB_FAULT": fault or ""})
    return cli_forked(command, fault or "", timeout)


def inproc(args, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """The same command in this process (much faster: no imports), where nothing kills the process."""
    return cli_here(["compare", *args, "--output", str(out), "--no-progress", *IN_PROCESS], fault or "")


def args_for(method, tiny_overrides):
    return [*tiny_overrides, *RUN, f"methods={method}", *MATRIX[method][0]]


def record(out: Path, method: str) -> dict:
    return next(r for r in json.loads((out / "results.json").read_text())["methods"] if r["method"] == method)


def final_weights(out: Path, method: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    latest = Checkpointer(out / "checkpoints" / method, "").latest()
    assert latest is not None and latest.name == f"step-{steps:06d}"
    return torch.load(latest / "trainable.pt", weights_only=True)


def artifact_tensors(out: Path, method: str) -> dict[str, torch.Tensor]:
    folder = out / "artifacts" / method
    files = sorted(folder.glob("*.safetensors"))
    assert files
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def assert_same_run(a: Path, b: Path, method: str, steps: int = STEPS) -> None:
    ra, rb = record(a, method), record(b, method)
    assert ra["status"] == rb["status"] == "success"
    assert ra["losses"] == rb["losses"] and len(ra["losses"]) == steps
    assert ra["history"] == rb["history"] and ra["best_val"] == rb["best_val"] and ra["test"] == rb["test"]
    wa, wb = final_weights(a, method, steps), final_weights(b, method, steps)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    xa, xb = artifact_tensors(a, method), artifact_tensors(b, method)
    assert xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert, toy_data):
    """One uninterrupted run per method, shared by the tests below."""
    overrides = [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
                 f"data.validation_file={toy_data['validation']}", f"data.test_file={toy_data['test']}",
                 "data.max_length=32", "train.batch_size=8", *PINNED]  # clean and killed runs: one precision
    runs = {}
    for method in RESUMABLE:
        out = tmp_path_factory.mktemp(f"clean-{method}")
        result = inproc(args_for(method, overrides), out)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[method] = out
    return overrides, runs


@pytest.mark.parametrize("method", RESUMABLE)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(method, uninterrupted, tmp_path):
    overrides, clean = uninterrupted
    killed = tunelab(args_for(method, overrides), tmp_path, fault="kill@step=7")
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    latest = Checkpointer(tmp_path / "checkpoints" / method, "").latest()
    assert latest is not None and latest.name == "step-000006"
    resumed = inproc(["--resume"], tmp_path)  # no config given: the saved one is used
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(clean[method], tmp_path, method)
    assert record(tmp_path, method)["resumed_from_step"] == 6
    assert "resumed_from_step" not in record(clean[method], method)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_causal_lm_task_resumes_bit_identical_too(method, tiny_causal_overrides, tmp_path):
    """Response-only labels, token-weighted losses, generated answers in the evaluation: the same exactness."""
    args = [*tiny_causal_overrides, *RUN, f"methods={method}", *MATRIX[method][0]]
    steps = 30  # 120 toy Q/A rows / batch 8 × 2 epochs
    clean = inproc(args, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = tunelab(args, tmp_path / "killed", fault="kill@step=7")
    assert killed.returncode == -9
    resumed = inproc(["--resume"], tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "clean", tmp_path / "killed", method, steps)
    assert "exact_match" in record(tmp_path / "killed", method)["test"]


def test_ctrl_c_on_the_last_step_of_an_epoch_resumes(uninterrupted, tmp_path):
    """Stopped right after an epoch's last step, the run resumes into the epoch rollover: its checkpoint for that
    step exists already and must not be written twice (that failed: the folder was not empty)."""
    overrides, clean = uninterrupted
    stopped = inproc(args_for("lora", overrides), tmp_path, fault="interrupt@step=20")  # 160 rows / 8 = 20 steps
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    resumed = inproc(["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(clean["lora"], tmp_path, "lora")


def test_ctrl_c_on_the_runs_last_step_keeps_the_run_with_its_last_evaluation(uninterrupted, tmp_path):
    """Its checkpoint was written before the run's closing evaluation, so a resume found the last step done and
    never evaluated it (history and best weights of another run). A stop there now keeps the finished run and
    stops the experiment after it; the resume has nothing left to train."""
    overrides, _ = uninterrupted
    args = [*args_for("lora", overrides), "train.eval_every_steps=0"]  # evaluated at epoch ends only
    clean = inproc(args, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    stopped = inproc(args, tmp_path / "stopped", fault=f"interrupt@step={STEPS}")
    assert stopped.returncode == 130 and "interrupted after lora" in stopped.stderr, stopped.stderr[-2000:]
    assert [h["step"] for h in record(tmp_path / "stopped", "lora")["history"]] == [20, 40]
    resumed = inproc(["--resume"], tmp_path / "stopped")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "clean", tmp_path / "stopped", "lora")


def test_a_damaged_or_unfitting_checkpoint_stops_the_run_and_says_what_to_do(uninterrupted, tmp_path):
    """A truncated file made the resume start again from step 0, deleting every checkpoint; a checkpoint of a
    differently shaped model failed with a bare size mismatch on every resume."""
    overrides, clean = uninterrupted
    args = args_for("lora", overrides)
    assert tunelab(args, tmp_path, fault="kill@step=7").returncode == -9
    latest = tmp_path / "checkpoints" / "lora" / "step-000006"
    os.truncate(latest / "optimizer.pt", 100)
    damaged = inproc(["--resume"], tmp_path)
    assert damaged.returncode == 1
    assert f"checkpoint {latest} is damaged" in record(tmp_path, "lora")["error"]
    assert "to resume from the start" in record(tmp_path, "lora")["error"] and latest.is_dir()
    import shutil

    shutil.rmtree(latest)
    assert inproc(["--resume"], tmp_path).returncode == 0  # from the start, as the message said
    assert_same_run(clean["lora"], tmp_path, "lora")

    other = tmp_path / "other"
    assert tunelab(args, other, fault="kill@step=7").returncode == -9
    reshaped = inproc([*args, "lora.r=2", "--resume", "--allow-config-change"], other)
    assert reshaped.returncode == 1
    error = record(other, "lora")["error"]
    assert "step-000006 cannot be restored" in error and "written under another config" in error, error


def test_the_best_checkpoint_gone_is_an_error_not_the_last_weights_under_its_name(tmp_path):
    from tunelab.train.checkpoint import CheckpointUnreadable
    from tunelab.train.loop import TrainState

    checkpointer = Checkpointer(tmp_path, "hash")
    checkpointer.save_best({"w": torch.ones(2)}, TrainState(step=10, best={"accuracy": 0.9, "step": 10}))
    assert torch.equal(checkpointer.best_weights(10)["w"], torch.ones(2))
    with pytest.raises(CheckpointUnreadable, match="best-000012, its best evaluation"):
        checkpointer.best_weights(12)  # the state's best is later than what is on disk
    os.truncate(tmp_path / "best-000010" / "trainable.pt", 10)
    with pytest.raises(CheckpointUnreadable, match="is missing or damaged"):
        checkpointer.best_weights(10)


def test_a_kill_after_an_epoch_end_evaluation_resumes(uninterrupted, tmp_path):
    """An epoch that ends on a checkpoint_every_steps multiple, evaluated only there: its checkpoint was written
    before that evaluation, so a resume evaluated again and could not write the best checkpoint a second time
    ("Directory not empty"): the run failed on every --resume. The checkpoint now follows the evaluation."""
    overrides, _ = uninterrupted
    args = [*args_for("lora", overrides), "train.checkpoint_every_steps=5", "train.eval_every_steps=0"]
    clean = inproc(args, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = tunelab(args, tmp_path / "killed", fault="kill@step=21")  # epoch 1 ends at step 20
    assert killed.returncode == -9
    step_20 = json.loads((tmp_path / "killed" / "checkpoints" / "lora" / "step-000020" / "MANIFEST.json").read_text())
    assert [entry["step"] for entry in step_20["state"]["history"]] == [20], step_20["state"]["history"]
    resumed = inproc(["--resume"], tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "clean", tmp_path / "killed", "lora")


def test_a_checkpoint_written_again_replaces_the_first(tmp_path):
    from tunelab.train.checkpoint import write_atomic

    write_atomic(tmp_path, "best-000020", {"a.pt": torch.zeros(2)}, {"step": 20})
    write_atomic(tmp_path, "best-000020", {"a.pt": torch.ones(2)}, {"step": 20})
    assert torch.equal(torch.load(tmp_path / "best-000020" / "a.pt"), torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["best-000020"] and is_complete(tmp_path / "best-000020")


def test_kill_while_writing_a_checkpoint_leaves_nothing_resume_would_use(uninterrupted, tmp_path):
    overrides, clean = uninterrupted
    killed = tunelab(args_for("lora", overrides), tmp_path, fault="kill@checkpoint", fresh_interpreter=True)
    assert killed.returncode == -9
    folder = tmp_path / "checkpoints" / "lora"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]  # the half-written one
    assert not [p for p in folder.iterdir() if is_complete(p)]
    assert Checkpointer(folder, "").latest() is None
    resumed = inproc(["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(clean["lora"], tmp_path, "lora")


def test_ctrl_c_checkpoints_writes_partial_results_and_resumes(uninterrupted, tmp_path):
    overrides, clean = uninterrupted
    stopped = tunelab([*overrides, *RUN, "methods=full,lora", *MATRIX["lora"][0]], tmp_path,
                      fault="lora/interrupt@step=5")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "--resume" in stopped.stderr
    statuses = {r["method"]: r["status"] for r in json.loads((tmp_path / "results.json").read_text())["methods"]}
    assert statuses == {"full": "success", "lora": "interrupted"}
    assert (tmp_path / "checkpoints" / "lora" / "step-000005").is_dir()
    full_before = record(tmp_path, "full")
    resumed = inproc(["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert record(tmp_path, "full") == full_before  # finished methods are kept, not retrained
    assert_same_run(clean["lora"], tmp_path, "lora")
    # TensorBoard: the curves are the uninterrupted run's, none lost at the checkpoint step, none doubled, and no
    # extra point where it stopped (step 5 is not a log point: the mean over steps 5-6 is logged at 6, as without the stop)
    def logged(folder, tag):
        return [(e.step, round(e.value, 5)) for e in logged_scalars(folder / "tensorboard" / "lora", tag)]
    for tag in ("eval/accuracy", "train/loss", "train/grad_norm", "train/lr"):
        assert logged(tmp_path, tag) == logged(clean["lora"], tag), tag
    assert 5 not in [step for step, _ in logged(tmp_path, "train/loss")]


def test_resume_refuses_a_changed_config_unless_allowed(uninterrupted, tmp_path):
    overrides, _ = uninterrupted
    args = args_for("lora", overrides)
    assert inproc(args, tmp_path, fault="raise@step=5").returncode == 1  # failed: unfinished, resumable
    refused = inproc([*args, "train.lr=0.5", "--resume"], tmp_path)
    assert refused.returncode == 2 and "--allow-config-change" in refused.stderr
    allowed = inproc([*args, "lora.lr=0.02", "--resume", "--allow-config-change"], tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    # the new rate trains from the resumed step on, on the same schedule (not the checkpoint's old rate)
    assert record(tmp_path, "lora")["lr"] == 0.02
    warmup = math.ceil(0.06 * STEPS)
    logged = {e.step: e.value for e in logged_scalars(tmp_path / "tensorboard" / "lora", "train/lr")}
    # step s trains at the schedule's value for s - 1 (step 1 at 0): before the failure lora.lr=1e-2, warming up
    assert logged[2] == pytest.approx(1e-2 * 1 / warmup)
    resumed = {step: lr for step, lr in logged.items() if step > 3}  # from the step-3 checkpoint on
    assert len(resumed) >= (STEPS - 3) // 2
    for step, lr in resumed.items():
        assert lr == pytest.approx(0.02 * (STEPS - (step - 1)) / (STEPS - warmup), rel=1e-6)


def test_resume_may_change_how_the_run_is_carried_out_without_the_flag(uninterrupted, tmp_path):
    """Threads, log and checkpoint spacing change nothing the run learns; another machine resumes with its own
    (they needed --allow-config-change, which then let every other change through as well)."""
    overrides, _ = uninterrupted
    args = [*args_for("lora", overrides), "train.max_steps=6"]
    assert inproc(args, tmp_path, fault="raise@step=3").returncode == 1
    resumed = inproc(["train.threads=1", "train.log_every_steps=3", "train.checkpoint_every_steps=2", "--resume"],
                     tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert record(tmp_path, "lora")["status"] == "success"
    refused = inproc(["train.threads=2", "train.lr=0.5", "--resume"], tmp_path)  # with a change that counts
    assert refused.returncode == 2 and "train.lr: 5e-05 → 0.5" in refused.stderr


def test_resume_continues_the_seeds_and_config_the_experiment_was_started_with(uninterrupted, tmp_path):
    """`--resume` alone (as the interruption message says) resumes every seed; a key=value override changes the
    saved config (not the packaged job) and is named; another --seeds is refused, not silently applied."""
    overrides, _ = uninterrupted
    args = [*args_for("lora", overrides), "train.max_steps=4", "train.epochs=1"]
    assert inproc([*args, "--seeds", "2"], tmp_path, fault="lora/raise@step=2").returncode == 1
    assert [r["status"] for r in json.loads((tmp_path / "results.json").read_text())["methods"]] == ["failed"] * 2
    refused = inproc(["train.lr=0.5", "--resume"], tmp_path)
    assert refused.returncode == 2 and "train.lr: 5e-05 → 0.5" in refused.stderr
    assert "model" not in refused.stderr.split("started with")[1]  # only what the override changed
    refused = inproc(["--resume", "--seeds", "3"], tmp_path)
    assert refused.returncode == 2 and "was started with --seeds 2" in refused.stderr
    resumed = inproc(["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert [(r["seed"], r["status"]) for r in records] == [(42, "success"), (43, "success")]


def test_resume_refuses_data_that_changed_since_the_start(uninterrupted, toy_data, tmp_path):
    """The config names the files, not their rows: an edited train file resumed silently, the first steps on
    the old rows and the rest on the new."""
    import shutil

    overrides, _ = uninterrupted
    train = tmp_path / "train.csv"
    shutil.copy(toy_data["train"], train)
    args = [*args_for("lora", overrides), f"data.train_file={train}", "train.max_steps=6"]
    assert inproc(args, tmp_path / "out", fault="raise@step=3").returncode == 1
    assert json.loads((tmp_path / "out" / "run.json").read_text())["data_fingerprint"]
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:-40]) + "\n")  # 40 rows fewer
    refused = inproc(["--resume"], tmp_path / "out")
    assert refused.returncode == 2 and "the data differ from those" in refused.stderr, refused.stderr
    allowed = inproc(["--resume", "--allow-config-change"], tmp_path / "out")
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_resume_refuses_a_folder_of_another_format(uninterrupted, tmp_path):
    """A folder another tunelab wrote (other checkpoint contents or resume rules) is not continued under this
    one's rules: refused before anything is read, naming the version to finish it with."""
    overrides, _ = uninterrupted
    assert inproc([*args_for("lora", overrides), "train.max_steps=4"], tmp_path, fault="raise@step=2").returncode == 1
    run_file = tmp_path / "run.json"
    saved = json.loads(run_file.read_text())
    assert saved["format"] == 1 and saved["tunelab"]
    for started, says in ((2, "upgrade tunelab to 9.0.0 or later"), (0, "finish it with tunelab 9.0.0")):
        run_file.write_text(json.dumps({**saved, "format": started, "tunelab": "9.0.0"}))
        refused = inproc(["--resume"], tmp_path)
        assert refused.returncode == 2 and f"(folder format {started})" in refused.stderr and says in refused.stderr
    run_file.write_text('{"config": {"train"')  # half a file (it is now written atomically)
    refused = inproc(["--resume"], tmp_path)
    assert refused.returncode == 2 and "run.json' does not read" in refused.stderr and "Traceback" not in refused.stderr
    run_file.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("format", "tunelab")}))
    resumed = inproc(["--resume"], tmp_path)  # folders that recorded no format are this one's
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "artifacts" / "lora" / "tunelab.json").read_text())["tunelab"]


def logged_scalars(folder: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events.Scalars(tag)


def test_diverged_and_failed_methods_are_recorded_and_others_continue(uninterrupted, tmp_path):
    overrides, _ = uninterrupted
    result = inproc([*overrides, "methods=full,lora,llrd", "full.lr=1e30", "train.eval_every_steps=0"], tmp_path,
                    fault="lora/raise@step=2")
    assert result.returncode == 1
    full, lora, llrd = (record(tmp_path, m) for m in ("full", "lora", "llrd"))
    assert full["status"] == "diverged" and full["diverged_at_step"] >= 1 and "non-finite" in full["error"]
    assert lora["status"] == "failed" and "InjectedFault" in lora["error"]
    assert llrd["status"] == "success"
    assert "| full | diverged |" in (tmp_path / "report.md").read_text()


def test_weights_that_blow_up_in_the_last_update_are_a_divergence_not_the_best_result(uninterrupted, tmp_path):
    """The last update's NaN shows in no training loss, only in the evaluation after it: that evaluation must
    not become the best state of a "successful" run, ranked first, with NaN written into results.json."""
    overrides, _ = uninterrupted
    result = inproc([*overrides, "methods=full,lora", "full.lr=1e30", "train.max_steps=2",
                     "train.eval_every_steps=1", "train.warmup_ratio=0"], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]  # as for any run that did not finish
    text = (tmp_path / "results.json").read_text()
    payload = json.loads(text, parse_constant=lambda name: pytest.fail(f"results.json holds {name}"))
    full = next(r for r in payload["methods"] if r["method"] == "full")
    assert full["status"] == "diverged" and "validation loss became non-finite" in full["error"], full["error"]
    assert [e["method"] for e in payload["summary"]] == ["lora"]


def test_a_second_run_on_a_locked_folder_is_refused_and_a_stale_lock_is_taken(uninterrupted, tmp_path):
    overrides, _ = uninterrupted
    args = [*overrides, "methods=lora", "train.max_steps=2"]
    assert inproc(args, tmp_path, fault="raise@step=1").returncode == 1
    lock = tmp_path / ".tunelab.lock"
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive: this process
    refused = inproc(["--resume"], tmp_path)
    assert refused.returncode == 2 and "in use by another tunelab run" in refused.stderr
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    resumed = inproc(["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not lock.exists()
