"""tunelab sweep: optuna trials in their own processes, pruning, resume after a kill, workers sharing a study."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import optuna
import pytest

from conftest import cli_forked, cli_forked_together, cli_here
from sqlalchemy.engine import make_url
from tunelab.sweep.space import method_space, suggest
from tunelab.sweep.storage import optuna_storage
from tunelab.config import load_config

SMALL = ["methods=lora", "train.max_steps=4", "train.eval_every_steps=2", "train.log_every_steps=2"]


def sweep(args, out, *flags, fault="", own_process=False):
    """`tunelab sweep` in this process, or in its own (forked) where the test stops it."""
    command = ["sweep", *args, "--output", str(out), "--no-progress", *flags]
    return cli_forked(command, fault) if own_process else cli_here(command, fault)


def study(out):
    return json.loads((out / "sweep.json").read_text())["studies"]["lora"]


def test_default_space_and_user_ranges(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "methods=lora,llrd",
                             "sweep.space={lora.lr: {low: 0.001, high: 0.01, log: true}, train.batch_size: {choices: [4, 8]}}"])
    assert set(method_space(cfg, "llrd")) == {"llrd.lr", "llrd.decay", "train.batch_size"}
    space = method_space(cfg, "lora")
    assert space["lora.lr"] == {"low": 0.001, "high": 0.01, "log": True}
    trial = optuna.create_study().ask()
    values = suggest(trial, space)
    assert 0.001 <= values["lora.lr"] <= 0.01 and values["train.batch_size"] in (4, 8)


def test_list_choices_are_drawn_whole_and_quietly(recwarn):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    choices = [["query", "value"], ["query", "key", "value"]]
    drawn = [suggest(study.ask(), {"lora.target_modules": {"choices": choices}})["lora.target_modules"]
             for _ in range(6)]
    assert all(value in choices for value in drawn) and len({tuple(v) for v in drawn}) == 2
    assert not [w for w in recwarn if "categorical distribution" in str(w.message)]  # optuna's, once per trial


def test_a_bad_space_is_refused(tiny_overrides, tmp_path):
    result = sweep([*tiny_overrides, *SMALL, "sweep.space={lora.lr: {low: 1, high: 0.1}}"], tmp_path)
    assert result.returncode == 2 and "sweep.space.lora.lr: low 1 must be below high 0.1" in result.stderr
    # a train.lr range is drawn and recorded, but LoRA trains at lora.lr (searched by default): refused as unused
    unused = sweep([*tiny_overrides, *SMALL, "sweep.space={train.lr: {low: 1e-5, high: 1e-3, log: true}}"],
                   tmp_path / "unused")
    assert unused.returncode == 2 and "sweep.space.train.lr: no selected method trains at it" in unused.stderr
    from tunelab.sweep.space import space_problems  # full without its own range does train at train.lr
    full = load_config(None, [*tiny_overrides, "methods=full",
                              "sweep.space={full.lr: null, train.lr: {low: 1e-5, high: 1e-3, log: true}}"])
    assert space_problems(full) == []


@pytest.mark.parametrize("space, problem", [
    ("{train.lr: {low: 0, high: 1, log: true}}", "sweep.space.train.lr: a log range needs low > 0, got 0"),
    ("{lora.r: {choices: []}}", "sweep.space.lora.r: choices must be a non-empty list"),
    ("{lora.r: {choices: [8, 0]}}", "sweep.space.lora.r: 0 is not allowed; must be > 0"),
    ("{train.precision: {choices: [fp16]}}", "sweep.space.train.precision: 'fp16' is not allowed"),
    ("{lora.r: {low: 2.5, high: 8}}", "lora.r takes whole numbers; low and high must be whole"),
    ("{lora.dropout: {low: 0, high: 2}}", "sweep.space.lora.dropout: 2.0 is not allowed; must be < 1"),
    ("{lora.r: {low: 4, high: 16, step: 4}}", "sweep.space.lora.r: unknown key(s) 'step'"),
    ("{lora.lr: {low: 1e-4, high: 1e-2, logscale: true}}", "unknown key(s) 'logscale'"),
    ("{lora.r: {low: 4, high: 16, choices: [4, 8]}}", "unknown key(s) 'high', 'low'; a range takes low, high"),
    ("{lora.lr: {low: 1e-4, high: 1e-2, log: 'false'}}", "sweep.space.lora.lr: log must be true or false, got 'false'"),
    ("{train.seed: {choices: [1, 2]}}", "sweep.space.train.seed: a seed is not a hyperparameter to tune"),
])
def test_a_space_no_trial_could_use_fails_validate_before_anything_is_written(space, problem, tiny_overrides):
    from tunelab import TunelabInputError

    with pytest.raises(TunelabInputError, match=re.escape(problem)):
        load_config(None, [*tiny_overrides, "methods=lora", f"sweep.space={space}"])


@pytest.mark.parametrize("method, space, problem", [
    ("freeze", "{freeze.k: {choices: [1, 5]}}", "sweep.space.freeze.k: 5: freeze.k: 5 is more than the 2 "),
    ("adalora", "{adalora.target_r: {low: 2, high: 16}}",
     "sweep.space.adalora.target_r: 16: adalora.target_r: 16 must be below adalora.init_r (12)"),
    ("adalora", "{adalora.init_r: {low: 9, high: 10}, adalora.target_r: {choices: [11]}}",  # every draw clashes
     "sweep.space.adalora.target_r: 11: adalora.target_r: 11 must be below adalora.init_r (9)"),
])
def test_a_space_value_the_model_refuses_fails_validate(method, space, problem, tiny_overrides):
    """Checked against the model as the option itself is: otherwise every trial drawing it failed mid-sweep."""
    from tunelab import TunelabInputError, api

    with pytest.raises(TunelabInputError, match=re.escape(problem)):
        api.validate(None, [*tiny_overrides, f"methods={method}", f"sweep.space={space}"])


def test_a_space_whose_ranges_clash_only_in_some_draws_passes_validate(tiny_overrides):
    """init_r 6 with the default target_r 8 clashes, but a trial draws target_r from 4..10 beside it."""
    from tunelab import api

    api.validate(None, [*tiny_overrides, "methods=adalora",
                        "sweep.space={adalora.init_r: {low: 6, high: 12}, adalora.target_r: {low: 4, high: 10}}"])


def test_a_trial_whose_drawn_values_combine_badly_is_refused_by_the_methods_own_check(tiny_overrides):
    """Each edge alone is valid (target_r 8 < init_r 10; target_r 4 < init_r 12), a draw of both may not be."""
    from tunelab.experiment.job import method_checker
    from tunelab.sweep.space import with_values

    cfg = load_config(None, [*tiny_overrides, "methods=adalora",
                             "sweep.space={adalora.init_r: {low: 10, high: 12}, adalora.target_r: {low: 4, high: 8}}"])
    check = method_checker(str(cfg.model.name_or_path), cfg.task_spec)
    assert check(with_values(cfg, {"adalora.init_r": 12, "adalora.target_r": 8}), "adalora") == []
    assert check(with_values(cfg, {"adalora.init_r": 8, "adalora.target_r": 8}), "adalora") == [
        "adalora.target_r: 8 must be below adalora.init_r (8)"]


@pytest.mark.parametrize("storage, problem", [
    ("sweep.db", "--storage: 'sweep.db' is not a database URL; e.g. sqlite:///sweep.db"),
    ("bogus://x", "--storage: 'bogus://x': Can't load plugin: sqlalchemy.dialects:bogus"),
    ("sqlite:////no/such/folder/x.db",
     "--storage: cannot open 'sqlite:////no/such/folder/x.db': the folder '/no/such/folder' does not exist"),
    ("sqlite://", "--storage: 'sqlite://' is an in-memory database, which the trials' own processes do not see"),
])
def test_a_storage_optuna_cannot_open_is_refused_before_anything_is_written(storage, problem, tiny_overrides,
                                                                              tmp_path):
    from tunelab import TunelabInputError, api

    with pytest.raises(TunelabInputError, match=re.escape(problem)):
        api.sweep(None, [*tiny_overrides, *SMALL], tmp_path / "out", trials=1, storage=storage, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_decimal_option_draws_decimals_even_between_whole_bounds(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "methods=lora",
                             "sweep.space={train.weight_decay: {low: 0, high: 1}, lora.r: {low: 2, high: 64, log: true}}"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [suggest(study.ask(), method_space(cfg, "lora")) for _ in range(5)]
    assert all(0 <= d["train.weight_decay"] <= 1 for d in drawn)
    assert any(0 < d["train.weight_decay"] < 1 for d in drawn)  # not only 0 and 1
    assert all(isinstance(d["lora.r"], int) and 2 <= d["lora.r"] <= 64 for d in drawn)


def trial_results(out):
    return [(t["number"], t["state"], t["value"], t["params"], t["intermediate"]) for t in study(out)["trials"]]


def test_a_killed_sweep_resumes_to_the_trials_of_one_that_never_stopped(tiny_overrides, tmp_path):
    """The trial killed mid-training is finished from its checkpoint (not failed and replaced), and the
    trial after it draws the point an uninterrupted sweep draws: the same trials, values and reports."""
    import signal
    import time

    # 12 steps, a checkpoint at each: the killed trial's checkpoints exist for most of its run (they are
    # removed once it succeeds), so the poll below sees one before the trial ends
    args = [*tiny_overrides, *SMALL, "train.max_steps=12", "train.checkpoint_every_steps=1"]
    reference = sweep(args, tmp_path / "ref", "--trials", "2")
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    worker = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "sweep", *args, "--output", str(out),
                               "--no-progress", "--trials", "2"], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    trial_0 = out / "checkpoints" / "lora" / "trial-000"
    while time.time() < deadline and worker.poll() is None and not list(trial_0.glob("step-*")):
        time.sleep(0.02)  # until trial 0 has checkpointed
    assert worker.poll() is None, "the sweep ended before its first trial was seen checkpointing"
    os.killpg(worker.pid, signal.SIGKILL)  # the sweep and its trial's process, mid-trial
    worker.wait()
    url = f"sqlite:///{out / 'sweep.db'}"
    killed = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    assert [t.state.name for t in killed.get_trials()] == ["RUNNING"]  # killed inside trial 0
    resumed = sweep([], out, "--trials", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "FAIL" not in [t["state"] for t in study(out)["trials"]]
    assert trial_results(out) == trial_results(tmp_path / "ref")


def test_a_method_whose_trials_all_fail_stops_without_stopping_the_others(tiny_overrides, tmp_path):
    """Each failed trial is replaced by another point (the replacement was seeded alike and drew the same one);
    after as many failures as trials the method stops, and the next method's study still runs."""
    result = sweep([*tiny_overrides, *SMALL, "methods=lora,bitfit"], tmp_path, "--trials", "2",
                   fault="lora/raise@step=1")
    assert result.returncode == 1 and "lora: 2 trials failed, as many as asked for" in result.stderr
    studies = json.loads((tmp_path / "sweep.json").read_text())["studies"]
    failed = [t["params"] for t in studies["lora"]["trials"]]
    assert len(failed) == 2 and failed[0] != failed[1]
    assert all("injected fault" in t["error"] for t in studies["lora"]["trials"])  # why, in sweep.md too
    assert "Failed (records/ has each whole error): trial 0 (" in (tmp_path / "sweep.md").read_text()
    assert [t["state"] for t in studies["bitfit"]["trials"]] == ["COMPLETE", "COMPLETE"]
    assert studies["bitfit"]["metric"] == "accuracy" and "(maximize of best validation accuracy)" in \
        (tmp_path / "sweep.md").read_text()  # what the trials' values are
    # a trial is chosen on validation alone: it does not score (or pay for) the test split
    record = json.loads((tmp_path / "records" / "bitfit--trial-000.json").read_text())
    assert record["best_val"] and record["test"] is None and not record["test_per_example"]
    # `tunelab report` rebuilds a sweep folder's sweep.md from its sweep.json alone (it refused the folder)
    written = (tmp_path / "sweep.md").read_text()
    (tmp_path / "sweep.md").unlink()
    assert cli_here(["report", str(tmp_path)]).returncode == 0
    assert (tmp_path / "sweep.md").read_text() == written
    summary = json.loads((tmp_path / "sweep.json").read_text())
    del summary["studies"]["bitfit"]["importances"]  # hand-edited: a traceback before
    (tmp_path / "sweep.json").write_text(json.dumps(summary))
    refused = cli_here(["report", str(tmp_path)])
    assert refused.returncode == 2 and "is not a readable sweep summary (KeyError: 'importances')" in refused.stderr


def test_a_drawn_training_setting_the_method_cannot_use_is_pruned_not_a_crash(tiny_overrides, tmp_path):
    """prefix tuning cannot train with gradient checkpointing: a trial drawing it stopped the sweep (exit 2,
    the trial left RUNNING), and every --resume drew it again."""
    result = sweep([*tiny_overrides, *SMALL, "methods=prefix-tuning", "train.max_steps=2",
                    "sweep.space={train.gradient_checkpointing: {choices: [true, false]}}"], tmp_path, "--trials", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    trials = json.loads((tmp_path / "sweep.json").read_text())["studies"]["prefix-tuning"]["trials"]
    refused = [t for t in trials if t["params"]["train.gradient_checkpointing"]]
    assert refused and all(t["state"] == "PRUNED" and "cannot train with it" in t["not_trained"] for t in refused)
    assert any(t["state"] == "COMPLETE" for t in trials)


def postgres_url() -> str:
    """A PostgreSQL server for the distributed-sweep test: TUNELAB_TEST_POSTGRES_URL (.ci/run starts one)."""
    url = os.environ.get("TUNELAB_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set TUNELAB_TEST_POSTGRES_URL (bash .ci/postgres.sh starts one and "
                    "prints it); the shared-study logic is still tested on SQLite")
    return url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(backend, tiny_overrides, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}" if backend == "sqlite" else postgres_url()
    args = [*tiny_overrides, *SMALL, "--study-name", f"test-{uuid.uuid4().hex[:12]}"]
    workers = cli_forked_together([["sweep", *args, "--output", str(tmp_path / f"w{i}"), "--no-progress",
                                    "--trials", "4", "--storage", storage] for i in range(2)])
    for worker in workers:
        assert worker.returncode == 0, worker.stderr[-2000:]
    name = study(tmp_path / "w0")["study"]
    assert study(tmp_path / "w1")["study"] == name  # same config, same storage: the same study
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()  # after both workers ended
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and len(trials) <= 5  # the study's total (a lost race may leave one failed)
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 4  # no trial ran twice
    ran = [json.loads(p.read_text()) for w in ("w0", "w1") for p in (tmp_path / w / "records").glob("*.json")]
    assert len(ran) >= 4 and {r["run_id"] for r in ran if r["status"] in ("success", "pruned")}  # both report
    specs = "".join(p.read_text() for w in ("w0", "w1") for p in (tmp_path / w / "runs").glob("*.json"))
    password = make_url(storage).password
    assert '"storage"' in specs and (not password or f":{password}@" not in specs)  # the runs got it otherwise
    if backend == "postgresql":  # one connection pool a worker process, not one per call
        assert optuna_storage(storage) is optuna_storage(storage)


def test_workers_asking_together_keep_the_lowest_numbered_trials(tmp_path):
    """Three workers asking for the last trial together: the lowest number keeps it, whenever each looks (the
    highest running trial backing out let two of three train, or none)."""
    from tunelab.sweep.study import surplus

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    done = study.ask()
    study.tell(done, 1.0)
    first, second, third = study.ask(), study.ask(), study.ask()
    assert [surplus(study, t, 2) for t in (first, second, third)] == [False, True, True]
    study.tell(third, state=optuna.trial.TrialState.FAIL)  # backed out: the others' view does not change
    assert [surplus(study, t, 2) for t in (first, second)] == [False, True]
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # failed in training: its worker asks again
    again = study.ask()
    assert not surplus(study, again, 2) and surplus(study, again, 1)


@pytest.mark.parametrize("pruner", ["median"])
def test_pruner_sees_intermediate_results(tiny_overrides, tmp_path, pruner):
    result = sweep([*tiny_overrides, *SMALL, "train.max_steps=6", f"sweep.pruner={pruner}"], tmp_path, "--trials", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    for trial in study(tmp_path)["trials"]:
        assert trial["intermediate"], trial  # every trial reported its evaluations to optuna


def test_compare_tune_then_seeds_uses_each_methods_best_trial(tiny_overrides, tmp_path):
    result = cli_here(["compare", *tiny_overrides, "methods=lora,prompt-tuning", "train.max_steps=4",
                       "train.eval_every_steps=2", "--tune", "2", "--seeds", "2", "--output", str(tmp_path),
                       "--no-progress"])
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    studies = json.loads((tmp_path / "sweep.json").read_text())["studies"]
    for entry in payload["summary"]:
        best = studies[entry["method"]]["best"]["params"]
        assert entry["n"] == 2 and entry["hyperparameters"] == {"lr": best[f"{entry['method']}.lr"], **best}
    for record in payload["methods"]:
        assert record["lr"] == studies[record["method"]]["best"]["params"][f"{record['method']}.lr"]


def test_compare_tune_says_when_no_trial_finished_and_trains_the_configured_values(tiny_overrides, tmp_path,
                                                                                   monkeypatch, capsys):
    """Every trial pruned (a pruner, or drawn values refused): the method trains as configured, and says so."""
    import tunelab.sweep.study as studies
    import tunelab.sweep.tuning as tuning
    from tunelab.sweep.tuning import tune_methods
    from tunelab.experiment.job import prepare_job
    from tunelab.report.markdown import read_studies, tuning_lines

    def every_trial_pruned(cfg, job, method, out_dir, trials, storage, name, *args, **kwargs):
        pruned = studies.open_study(cfg, method, storage, name, True)
        for _ in range(trials):
            pruned.tell(pruned.ask(), state=optuna.trial.TrialState.PRUNED)
    monkeypatch.setattr(tuning, "run_study", every_trial_pruned)
    cfg = load_config(None, [*tiny_overrides, "methods=lora"])
    assert tune_methods(cfg, prepare_job(cfg), tmp_path, 2, False, False) == {"lora": {}}
    assert "no tuning trial of lora finished (all pruned or failed" in capsys.readouterr().err
    assert ("- **lora**: 0 trials completed, 2 pruned; chosen: none, no trial finished: it trained with the "
            "configured values.") in tuning_lines(read_studies(tmp_path))


def test_every_methods_default_space_gives_valid_configs(tiny_overrides):
    from tunelab.methods.base import registry
    from tunelab.sweep.space import with_values

    for method in registry():
        cfg = load_config(None, [*tiny_overrides, f"methods={method}"])
        values = suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(),
                         method_space(cfg, method))
        assert f"{method}.lr" in values
        tuned = with_values(cfg, values)
        assert tuned.options(method).lr == values[f"{method}.lr"]


def test_ctrl_c_stops_the_whole_sweep_and_resume_finishes_it(tiny_overrides, tmp_path):
    import tunelab

    out, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'elsewhere.db'}"
    stopped = sweep([*tiny_overrides, *SMALL], out, "--trials", "2", "--study-name", "mine", "--storage", storage,
                    fault="interrupt@step=2", own_process=True)
    assert stopped.returncode == 130 and "--resume" in stopped.stderr, stopped.stderr[-2000:]
    assert [t["state"] for t in study(out)["trials"]] == ["RUNNING"]  # the first trial stopped; no other began
    resumed = sweep([], out, "--trials", "2", "--resume")  # the study it was started with, not a new one
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert study(out)["study"] == "mine-lora" and not (out / "sweep.db").exists()
    assert [t["state"] in ("COMPLETE", "PRUNED") for t in study(out)["trials"]] == [True] * 2  # trial 0 finished
    with pytest.raises(tunelab.TunelabInputError, match="holds a `tunelab sweep` experiment, not a compare"):
        tunelab.compare(output_dir=out, resume=True, isolate=False, show_progress=False)
    renamed = sweep([], out, "--trials", "4", "--resume", "--study-name", "other")
    assert renamed.returncode == 2 and "--study-name: other, but" in renamed.stderr
    changed = sweep(["train.max_steps=5"], out, "--resume")  # sweep has no --allow-config-change to suggest
    assert changed.returncode == 2 and "a sweep resumes with the config it started with" in changed.stderr


def test_a_resumed_sweep_needs_the_storage_password_it_did_not_save(tmp_path):
    from tunelab.experiment.folder import RUN_FILE
    from tunelab.sweep.storage import storage_record, sweep_flags

    url = "postgresql://tuner:s3cret@db:5432/optuna"
    assert storage_record(url) == "postgresql://tuner:***@db:5432/optuna"
    (tmp_path / RUN_FILE).write_text(json.dumps({"flags": {"command": "sweep", "storage": storage_record(url),
                                                           "study_name": None}}))
    _, problems = sweep_flags(tmp_path, True, None, None)
    assert problems and "its password is not saved, so give --storage with it" in problems[0]
    # (a folder of an earlier version, which kept no --nproc nor --trials: one process, 20 trials)
    assert sweep_flags(tmp_path, True, url, None) == ({"storage": url, "study_name": None, "nproc": 1,
                                                       "trials": 20}, [])
    _, problems = sweep_flags(tmp_path, True, "postgresql://tuner:s3cret@otherhost/optuna", None)
    assert "was started with postgresql://tuner:***@db:5432/optuna" in problems[0]


def test_a_resumed_sweep_keeps_its_number_of_trials(tmp_path):
    """`sweep --resume --output DIR`, as the interruption message says, ran a 3-trial sweep on to 20 trials."""
    from tunelab.experiment.folder import RUN_FILE
    from tunelab.sweep.storage import sweep_flags

    assert sweep_flags(tmp_path, False, None, None, trials=3)[0]["trials"] == 3
    (tmp_path / RUN_FILE).write_text(json.dumps({"flags": {"command": "sweep", "storage": None, "study_name": None,
                                                           "nproc": 1, "trials": 3}}))
    assert sweep_flags(tmp_path, True, None, None)[0]["trials"] == 3
    assert sweep_flags(tmp_path, True, None, None, trials=5)[0]["trials"] == 5  # more, asked for


def test_a_resumed_worker_finishes_only_its_own_interrupted_trials(tiny_overrides, tmp_path):
    """Another worker's running trial on the same storage is left to it."""
    from tunelab.config import load_config
    from tunelab.sweep.study import interrupted_trials, open_study, worker_name

    cfg = load_config(None, [*tiny_overrides, "methods=lora"])
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = open_study(cfg, "lora", storage, None, seeded=True)
    study.tell(study.ask(), 0.5)
    ours, theirs, ours_too = study.ask(), study.ask(), study.ask()
    for trial, folder in ((ours, "a"), (theirs, "b"), (ours_too, "a")):
        trial.set_user_attr("worker", worker_name(tmp_path / folder))
    resumed = open_study(cfg, "lora", storage, None, seeded=True)
    assert [t.number for t in interrupted_trials(resumed, worker_name(tmp_path / "a"))] == [1, 3]


def test_a_seeded_sweeps_draws_depend_on_the_trials_index_and_seed_only():
    """What lets a resumed sweep draw the points of an uninterrupted one: the sampler of the n-th trial is
    seeded by (seed, n), not drawn on from one generator that a new process would start afresh."""
    from tunelab.sweep.study import seeded_sampler

    def draw(seed, index):
        return optuna.create_study(sampler=seeded_sampler(seed, index)).ask().suggest_float("x", 0, 1)
    assert draw(7, 2) == draw(7, 2)
    assert len({draw(7, index) for index in range(3)}) == 3 and draw(7, 0) != draw(8, 0)


def test_a_relative_sqlite_storage_is_kept_as_the_file_it_named(tmp_path, monkeypatch):
    """run.json keeps the storage: a relative path resumed from another folder opened a new, empty study there
    and retrained (and overwrote) the earlier trials."""
    from tunelab.sweep.storage import absolute_storage, sweep_flags

    monkeypatch.chdir(tmp_path)
    assert absolute_storage("sqlite:///runs/s.db") == f"sqlite:///{tmp_path}/runs/s.db"
    assert absolute_storage("sqlite:////abs/s.db") == "sqlite:////abs/s.db"
    assert absolute_storage("postgresql://u:p@h/db") == "postgresql://u:p@h/db"
    assert sweep_flags(tmp_path, False, "sqlite:///s.db", None)[0]["storage"] == f"sqlite:///{tmp_path}/s.db"


def test_the_reason_a_trial_was_pruned_without_training_is_kept_with_it(tmp_path):
    from tunelab.sweep.report import write_sweep
    from tunelab.sweep.study import UNFIT, study_summary

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    trial = study.ask()
    trial.set_user_attr(UNFIT, "adalora.target_r: 11 must be below adalora.init_r (9)")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    summary = study_summary(study)
    assert summary["trials"][0]["not_trained"] == "adalora.target_r: 11 must be below adalora.init_r (9)"
    write_sweep(tmp_path, {"metrics": {"accuracy": "higher"}, "metric_for_best": "accuracy"}, {"adalora": summary})
    assert ("Pruned without training, their drawn values refused: trial 0 (adalora.target_r: 11 must be below "
            "adalora.init_r (9)).") in (tmp_path / "sweep.md").read_text()


def test_trials_that_scored_alike_give_no_importances_and_say_why(tmp_path):
    """optuna returns equal importances and warns (a file path in the user's terminal) when every trial scored
    the same: the summary keeps none, with the reason, and the warning stays inside."""
    import warnings

    from tunelab.sweep.report import write_sweep
    from tunelab.sweep.study import study_summary

    alike, apart = optuna.create_study(direction="maximize"), optuna.create_study(direction="maximize")
    few = optuna.create_study(direction="maximize")
    for study, scores in ((alike, [0.5] * 5), (apart, [0.2, 0.5, 0.9, 0.3, 0.7]), (few, [0.2, 0.9])):
        for score in scores:
            trial = study.ask()
            trial.suggest_float("lora.lr", 1e-4, 1e-2, log=True)
            trial.suggest_int("lora.r", 2, 16)
            study.tell(trial, score)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = study_summary(alike)
    assert not [w for w in caught if "importances" in str(w.message)]
    assert summary["importances"] == {} and "scored too alike" in summary["importances_note"]
    assert set(study_summary(apart)["importances"]) == {"lora.lr", "lora.r"}
    assert study_summary(few)["importances"] == {} and "2 completed trials are too few" in \
        study_summary(few)["importances_note"]
    write_sweep(tmp_path, {"metrics": {"accuracy": "higher"}, "metric_for_best": "accuracy"}, {"lora": summary})
    assert ("Parameter importances: none: the 5 completed trials scored too alike for optuna to tell them "
            "apart.") in (tmp_path / "sweep.md").read_text()


def test_a_sweep_resumed_without_nproc_trains_on_as_many_processes_as_it_started_with(tiny_overrides, tmp_path):
    started = sweep([*tiny_overrides, *SMALL, "train.max_steps=2"], tmp_path, "--trials", "1", "--nproc", "2")
    assert started.returncode == 0, started.stderr[-2000:]
    resumed = sweep([], tmp_path, "--trials", "2", "--resume")  # "continue with" commands leave --nproc out
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "records").rglob("*.json"))]
    assert [r["processes"] for r in records] == [2, 2], [r["run_id"] for r in records]


def test_a_swept_batch_size_is_checked_against_the_rows_as_the_configured_one_is(tiny_overrides, tmp_path):
    """A trial drawing a batch larger than the 160 rows trained on every row while its record named 500."""
    from tunelab import TunelabInputError, api

    refused = "sweep.space.train.batch_size: 500: train.batch_size: 500 is larger than the 160 training rows"
    with pytest.raises(TunelabInputError, match=re.escape(refused)):
        api.validate(None, [*tiny_overrides, "methods=lora", "sweep.space={train.batch_size: {choices: [8, 500]}}"])
    # drawn where the rows are fewer than at validate time cannot happen; a process layout a draw cannot fill
    # (a batch of 2 over 4 accumulation steps) is pruned without training, with the reason
    result = sweep([*tiny_overrides, *SMALL, "train.gradient_accumulation_steps=4",
                    "sweep.space={train.batch_size: {choices: [2]}, lora.lr: null}"], tmp_path, "--trials", "1")
    assert result.returncode == 0, result.stderr[-2000:]  # a pruned trial is a result, not a failure
    trial = study(tmp_path)["trials"][0]
    assert trial["state"] == "PRUNED" and "train.batch_size: 2 rows cannot fill 1 processes × 4" in trial["not_trained"]


def test_workers_join_one_study_by_what_their_trials_depend_on(tiny_overrides, tmp_path):
    """The study name hashed the whole config: a worker with other threads, or with another method selected
    beside, silently ran a study of its own with the whole budget. A named study refuses another config (it
    counted a different job's trials towards its budget and best); an earlier version's study is resumed."""
    from tunelab import TunelabInputError
    from tunelab.sweep.study import open_study, study_name

    def name(*extra):
        return study_name(load_config(None, [*tiny_overrides, "methods=lora", *extra]), "lora", None)
    assert name() == name("methods=lora,full") == name("train.threads=1") == name("full.lr=3e-5")
    assert name() != name("lora.r=4") and name() != name("train.max_steps=3")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = load_config(None, [*tiny_overrides, "methods=lora"])
    open_study(cfg, "lora", storage, "exp", seeded=True)
    assert open_study(load_config(None, [*tiny_overrides, "methods=lora,full"]), "lora", storage, "exp", True)
    with pytest.raises(TunelabInputError, match=r"the study 'exp-lora' holds trials of another config \(lora.dropout"):
        open_study(load_config(None, [*tiny_overrides, "methods=lora", "lora.dropout=0"]), "lora", storage, "exp", True)
    earlier = optuna.create_study(study_name=f"tunelab-{cfg.fingerprint()}-lora", storage=storage)
    assert open_study(cfg, "lora", storage, None, seeded=True).study_name == earlier.study_name
    # compare --tune's own studies are continued whatever the config; a user's study called "tune" is checked
    open_study(cfg, "lora", storage, "tune", seeded=True)
    other = load_config(None, [*tiny_overrides, "methods=lora", "sweep.metric=loss"])
    assert open_study(other, "lora", storage, "tune", True, checks_config=False)
    with pytest.raises(TunelabInputError, match=r"the study 'tune-lora' holds trials of another config \(sweep.metric"):
        open_study(other, "lora", storage, "tune", seeded=True)


def test_two_configs_starting_a_named_study_together_do_not_both_join(tiny_overrides, tmp_path, monkeypatch):
    """Both found the study without a config and both wrote theirs; the one whose config was overwritten in the
    moment after is refused."""
    from tunelab import TunelabInputError
    from tunelab.sweep import study as studies

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg, other = (load_config(None, [*tiny_overrides, "methods=lora", *extra]) for extra in ([], ["lora.r=4"]))
    race = optuna.create_study(study_name="race-lora", storage=storage)
    monkeypatch.setattr(studies.time, "sleep", lambda s: race.set_user_attr(
        studies.CONFIG, json.loads(json.dumps(studies.study_config(other, "lora"), default=str))))
    with pytest.raises(TunelabInputError, match="holds trials of another config"):
        studies.open_study(cfg, "lora", storage, "race", seeded=True)


def test_a_refused_study_leaves_no_folder_behind(tiny_overrides, tmp_path):
    """A named study of another config, or a name the storage cannot hold, is refused before anything is written
    in the sweep's folder (what was left there refused the corrected rerun: not empty)."""
    from tunelab import TunelabInputError, api

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    api.sweep(None, [*tiny_overrides, *SMALL], tmp_path / "first", trials=1, storage=storage, study_name="exp",
              show_progress=False)
    with pytest.raises(TunelabInputError, match="holds trials of another config"):
        api.sweep(None, [*tiny_overrides, *SMALL, "lora.r=4"], tmp_path / "second", trials=1, storage=storage,
                  study_name="exp", show_progress=False)
    with pytest.raises(TunelabInputError, match=r"--study-name: 520 characters; .* at most 507"):
        api.sweep(None, [*tiny_overrides, *SMALL], tmp_path / "third", trials=1, storage=storage,
                  study_name="x" * 520, show_progress=False)
    assert not [*(tmp_path / "second").glob("*"), *(tmp_path / "third").glob("*")]  # (empty: a rerun may use them)


def test_trials_tied_on_the_score_are_told_apart_by_validation_loss():
    """A small validation set ties trials on accuracy; optuna's best was the first of them, the rest of tunelab
    breaks such ties by the lower validation loss (checkpoints, seeds)."""
    from tunelab.sweep.study import study_summary, tell

    study = optuna.create_study(direction="maximize")
    for accuracy, loss in ((0.5, 0.9), (0.6, 0.7), (0.6, 0.4), (0.6, None)):
        trial = study.ask()
        trial.suggest_float("lora.lr", 1e-4, 1e-2, log=True)
        tell(study, trial, {"status": "success", "best_val": {"accuracy": accuracy, "loss": loss}}, "accuracy")
    assert study.best_trial.number == 1 and study_summary(study)["best"]["number"] == 2
