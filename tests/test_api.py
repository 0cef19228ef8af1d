"""The Python API as a notebook or a service uses it: every command a function, with the CLI's checks and
messages, nothing left changed in the caller's process, and callable from any thread."""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
import torch

import tunelab
from tunelab.config import load_config
from tunelab.errors import TunelabInputError

QUICK = ["train.max_steps=2", "train.eval_every_steps=0", "methods=lora", "train.precision=fp32"]


def problems_of(call, *args, **kwargs) -> str:
    with pytest.raises(TunelabInputError) as info:
        call(*args, **kwargs)
    return "\n".join(info.value.problems)


def test_every_command_is_a_function_even_after_its_subpackage_is_imported():
    import tunelab.estimate as estimate_package  # the commands import these lazily; users may too
    import tunelab.report.markdown  # noqa: F401
    import tunelab.sweep.space as space

    for name in ("compare", "validate", "sweep", "predict", "export", "estimate", "recommend", "report"):
        assert callable(getattr(tunelab, name)), name
    assert hasattr(estimate_package, "fake_step_of") and space.__name__ == "tunelab.sweep.space"


def test_plan_commands_check_their_arguments_as_the_cli_does(tiny_overrides):
    assert "--nproc: 0 is not allowed" in problems_of(tunelab.estimate, None, tiny_overrides, nproc=0)
    assert "--peak-tflops: 0 is not allowed" in problems_of(tunelab.estimate, None, tiny_overrides, peak_tflops=0)
    assert "--memory: '0GB' must be more than 0" in problems_of(tunelab.recommend, None, tiny_overrides, memory="0GB")
    assert "--memory: -1 is not allowed" in problems_of(tunelab.recommend, None, tiny_overrides, memory=-1)
    assert "--memory: 'infGB' is not allowed; must be a finite amount" in \
        problems_of(tunelab.recommend, None, tiny_overrides, memory="infGB")
    result = tunelab.recommend(None, [*tiny_overrides, "methods=lora"], memory="4GB", time_budget=3600)
    assert result["memory_mb"] == 4096 and result["time_budget_s"] == 3600 and result["methods"]


@pytest.mark.parametrize("command, arguments, problem", [
    ("validate", {"nproc": "2"}, "--nproc: '2' is not allowed; must be a whole number >= 1"),
    ("validate", {"nproc": 2.5}, "--nproc: 2.5 is not allowed"),
    ("compare", {"seeds": 1.5}, "--seeds: 1.5 is not allowed; must be a whole number >= 1"),
    ("compare", {"tune": True}, "--tune: True is not allowed"),
    ("sweep", {"trials": "3"}, "--trials: '3' is not allowed"),
    ("estimate", {"train_examples": True}, "--train-examples: True is not allowed"),
])
def test_numbers_given_from_python_are_checked_before_anything_is_written(command, arguments, problem,
                                                                          tiny_overrides, tmp_path):
    """The command line parses these; from Python a string, a fraction or a bool raised TypeError, one after
    writing the output folder."""
    output = {"output_dir": tmp_path / "out"} if command in ("compare", "sweep") else {}
    assert problem in problems_of(getattr(tunelab, command), None, tiny_overrides, **output, **arguments)
    assert not (tmp_path / "out").exists()
    assert "override 1: expected key=value text" in problems_of(tunelab.validate, None, [1])


def test_predict_checks_its_arguments_and_takes_one_text(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    assert tunelab.compare(None, [*tiny_overrides, *QUICK], output_dir=out, show_progress=False,
                           isolate=False).exit_code == 0
    problems = problems_of(tunelab.predict, out, ["good"], batch_size=-1, device="gpu", precision="fp16")
    assert "--batch-size: -1 is not allowed; must be > 0" in problems
    assert "--device: 'gpu' is not allowed; allowed: auto, cpu, cuda" in problems
    assert "--precision: 'fp16' is not allowed; allowed: fp32, bf16" in problems
    _, outputs = tunelab.predict(out, "good food")
    assert [o["text"] for o in outputs] == ["good food"]  # one input, not one per character
    assert tunelab.report(out).name == "report.md"


def test_a_config_object_is_checked_again_and_settings_of_sweeps_fail_validate(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    cfg.data.train_file = Path(cfg.data.train_file)  # a path object is a path
    assert tunelab.validate(cfg).config.data.train_file == str(cfg.data.train_file)
    cfg.train.lr = -1.0
    assert "train.lr: -1.0 is not allowed; must be > 0" in problems_of(tunelab.validate, cfg)
    problems = problems_of(load_config, None, [*tiny_overrides, "sweep.metric=bogus", "train.seed=-5",
                                               "sweep.space={lora.rnk: {low: 1, high: 4}, lora.r: {low: 4}}"])
    assert "sweep.metric: 'bogus' is not a metric of task 'classification'" in problems
    assert "train.seed: -5 is not allowed; must be >= 0" in problems
    assert "sweep.space.lora.rnk: lora has no option 'rnk'" in problems
    assert "sweep.space.lora.r: expected {low, high[, log]} or {choices: [...]}" in problems
    assert "sweep.space: expected a mapping, got 5" in problems_of(load_config, None, ["sweep.space=5"])
    # a shared file's ranges for methods a run leaves out are fine until a sweep would search them
    narrowed = load_config(None, ["methods=lora", "sweep.space={full.lr: {low: 1e-5, high: 1e-4}}"])
    assert "names neither train.* nor a selected method (lora)" in problems_of(
        tunelab.compare, narrowed, output_dir=Path(tempfile.mkdtemp()) / "x", tune=1)
    assert "data.train_split: expected a string, got None" in problems_of(load_config, None, ["data.train_split=null"])
    # PyYAML reads 1e-5 as text: the range is still a range of numbers, compared as numbers
    space = load_config(None, ["sweep.space={train.lr: {low: 1e-5, high: 1e-3, log: true}}"]).sweep.space
    assert space["train.lr"]["low"] == "1e-5"
    assert "needs --output DIR" in problems_of(tunelab.compare, None, tiny_overrides, resume=True)


def test_a_config_file_keeps_the_text_of_its_values_as_overrides_do(tmp_path):
    (tmp_path / "job.yaml").write_text("model:\n  revision: 1.10\ntrain:\n  seed: 0123\n  fsdp: no\n")
    cfg = load_config(tmp_path / "job.yaml")
    assert cfg.model.revision == "1.10" and cfg.train.seed == 123 and cfg.train.fsdp is False
    assert load_config(None, ["task=classification", "task=causal-lm"]).data.dataset == "chatterbot-english"


def test_compare_leaves_the_callers_threads_alone_and_runs_from_another_thread(tiny_overrides, tmp_path):
    before = torch.get_num_threads()
    tunelab.compare(None, [*tiny_overrides, *QUICK, "train.threads=1"], output_dir=tmp_path / "here",
                    show_progress=False, isolate=False)
    assert torch.get_num_threads() == before
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=tunelab.compare(
        None, [*tiny_overrides, *QUICK], output_dir=tmp_path / "thread", show_progress=False)))
    worker.start()
    worker.join()
    assert outcome["result"].exit_code == 0


def test_config_problems_come_with_the_data_and_model_problems_they_do_not_hide(tiny_overrides, tmp_path):
    missing = f"data.test_file={tmp_path / 'nope.csv'}"
    problems = problems_of(tunelab.validate, None, [*tiny_overrides, missing, "lora.r=0", "train.batch_size=abc"])
    assert "lora.r: 0 is not allowed; must be > 0" in problems and "nope.csv' does not exist" in problems
    assert problems.count("train.batch_size") == 1  # its default is not checked again against the data
    # a refused data setting would check the data against a value the user did not mean: only the config's
    problems = problems_of(tunelab.validate, None, [*tiny_overrides, missing, "data.max_length=abc"])
    assert "data.max_length: expected an integer" in problems and "nope.csv" not in problems


def test_resume_keeps_the_process_count_the_experiment_was_started_with(tmp_path):
    """The stop message says `continue with: tunelab compare --resume --output DIR`; followed as printed, a
    `--nproc 2` experiment went on in one process. Given again, another count is taken (the global batch is
    kept, so the run continues, not bit for bit)."""
    import json

    from tunelab.api import run_flags
    from tunelab.experiment.folder import RUN_FILE

    started, _ = run_flags(tmp_path, False, None, None, 2)
    (tmp_path / RUN_FILE).write_text(json.dumps({"flags": started}))
    assert run_flags(tmp_path, True, None, None)[0]["nproc"] == 2
    assert run_flags(tmp_path, True, None, None, 1)[0]["nproc"] == 1
    assert run_flags(tmp_path, False, None, None)[0]["nproc"] is None  # a new one: 1, or what a launcher started


def test_a_config_may_be_a_dict_and_overrides_apply_to_any_config(tiny_overrides):
    """A dict raised a bare TypeError and overrides on an ExperimentConfig a ValueError; the API takes both, and
    anything else is a TunelabInputError naming what is allowed."""
    cfg = tunelab.api.resolve(None, tiny_overrides)
    from_dict = tunelab.api.resolve(cfg.to_dict(), ["train.lr=0.002"])
    assert from_dict.train.lr == 0.002 and tunelab.api.resolve(cfg, ["lora.r=4"]).options("lora").r == 4
    assert cfg.train.lr != 0.002  # the caller's config is left as it was
    with pytest.raises(TunelabInputError, match="train.lr: -1.0 is not allowed"):
        tunelab.validate({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "lr": -1.0}})
    with pytest.raises(TunelabInputError, match="config: int is not allowed; give a YAML file's path, a dict"):
        tunelab.validate(3)


@pytest.mark.parametrize("command", [["estimate", "--nproc", "0"], ["recommend", "--memory", "abc"],
                                     ["sweep", "--trials", "0"], ["compare", "--seeds", "0"]])
def test_a_bad_flag_and_a_bad_config_are_reported_together(command, tmp_path, capsys):
    """The flag's problem raised before the config was read: fixing it only showed the next one."""
    from tunelab.cli import main

    writes = ["--output", str(tmp_path / "out")] if command[0] in ("sweep", "compare") else []
    assert main([*command, "train.lr=abc", *writes]) == 2
    err = capsys.readouterr().err
    assert f"error: {command[1]}: " in err and "error: train.lr: expected a number, got 'abc'" in err, err


def test_validate_checks_for_the_seeds_and_tuning_it_is_told_of(tiny_bert, toy_data, capsys):
    """A space a sweep refuses, or seeds past the largest, passed validate and then failed compare/sweep."""
    from tunelab.cli import main

    base = [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}", "data.max_length=32",
            "train.batch_size=8", "methods=lora", "sweep.space={freeze.k: {choices: [1, 2]}}"]
    assert main(["validate", *base]) == 0
    assert "note: `tunelab sweep` and `compare --tune` would refuse: sweep.space.freeze.k" in capsys.readouterr().err
    assert main(["validate", *base, "--tune", "2"]) == 2
    assert "error: sweep.space.freeze.k: names neither train.* nor a selected method" in capsys.readouterr().err
    assert main(["validate", *base[:-1], "train.seed=4294967295", "--seeds", "2"]) == 2
    assert "error: --seeds: 2 seeds from train.seed 4294967295" in capsys.readouterr().err
    with pytest.raises(TunelabInputError, match="--seeds: 0 is not allowed"):
        tunelab.validate(None, base[:-1], seeds=0)


def test_api_arguments_of_the_wrong_kind_are_input_errors(tmp_path):
    """export(merge="no") merged (any text is true); report(None) and predict(path, None) were TypeErrors."""
    with pytest.raises(TunelabInputError, match="merge: 'no' is not allowed; must be True or False"):
        tunelab.export(tmp_path, tmp_path / "out", merge="no")
    with pytest.raises(TunelabInputError, match="folder: None is not allowed"):
        tunelab.report(None)
    with pytest.raises(TunelabInputError, match="is neither an experiment folder"):
        tunelab.predict(tmp_path, None)
    assert isinstance(tunelab.validate(tunelab.ExperimentConfig(), ["methods=lora"]).config, tunelab.ExperimentConfig)


def test_allow_config_change_without_resume_is_refused(tmp_path, capsys):
    from tunelab.cli import main

    assert main(["compare", "--allow-config-change", "--output", str(tmp_path / "out")]) == 2
    assert "--allow-config-change: only with --resume" in capsys.readouterr().err


def test_output_cut_short_by_a_pipe_ends_quietly(tiny_bert, toy_data):
    """`tunelab validate | head -1` ended in a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    command = (f"{sys.executable} -m tunelab validate model.name_or_path={tiny_bert} "
               f"data.train_file={toy_data['train']} data.max_length=32 train.batch_size=8 | head -c 0")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # the reader leaves before anything is written (`head -1` raced: output that fit the pipe ended in 0)
    assert done.stdout == "" and "Traceback" not in done.stderr and "Exception" not in done.stderr, done.stderr
    assert done.returncode == 141
