"""The Python API; the CLI is a thin layer over these functions.

    import tunelab
    outcome = tunelab.compare("my.yaml", ["methods=full,lora", "train.epochs=2"], output_dir="runs/x")
    outcome.records[0]["test"]["accuracy"]
"""
from __future__ import annotations

import copy
import datetime as dt
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .config import HOW_A_RUN_IS_CARRIED_OUT, ExperimentConfig, config_and_problems, overridden, with_overrides
from .errors import CompareInterrupted, TunelabInputError
from .experiment.folder import (RUN_FILE, ExperimentLock, changed_data_problems, command_problems,
                                finished_records, format_problems, resumed_flags, saved_config, saved_flags,
                                write_run_file)
from .experiment.isolation import StopRequest
from .experiment.job import Job, prepare_job
from .models.hub import offline_option
from .api_checks import count_problems, output_problems, process_problems, run_flag_problems, tuning_problems
from .train.distributed import launched_world_size, launcher_problems, leave_process_group


@dataclass
class CompareOutcome:
    output_dir: Path
    records: list[dict[str, Any]]
    report_path: Path
    job: dict[str, Any]  # the job summary written to results.json (task, metrics, baseline, ...)

    @property
    def exit_code(self) -> int:
        return 0 if all(r["status"] == "success" for r in self.records) else 1


def resolve(config: str | Path | dict | ExperimentConfig | None, overrides: Sequence[str] | None = (),
            flag_problems: Sequence[str] = ()) -> ExperimentConfig:
    """The validated config (see `resolve_with_problems`), or TunelabInputError with every problem: the
    config's and `flag_problems`, those of the command's own flags, together."""
    cfg, problems = resolve_with_problems(config, overrides)
    if problems or flag_problems:
        raise TunelabInputError([*flag_problems, *problems])
    return cfg


def keeps_torch_threads(function):
    """train.threads sets this process's torch thread count while a command works (preparing, training in
    process); the caller, a notebook say, gets its own back."""
    @functools.wraps(function)
    def kept(*args, **kwargs):
        import torch

        threads = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return kept


@offline_option
@keeps_torch_threads
def validate(config: str | Path | dict | ExperimentConfig | None = None, overrides: Sequence[str] = (),
             nproc: int = 1, seeds: int = 1, tune: int = 0) -> Job:
    """Check config, model and data without training, for a run of `nproc` processes, `seeds` seeds and
    `tune` trials per method (what compare checks besides); raises TunelabInputError listing every problem."""
    from .experiment.plan import seed_problems

    bad_numbers = count_problems(seeds=(seeds, 1), tune=(tune, 0), nproc=(nproc, 1))
    cfg, problems = resolve_with_problems(config, overrides)
    if bad_numbers:
        raise TunelabInputError([*bad_numbers, *problems])
    return prepared(cfg, problems + process_problems(cfg, nproc) + tuning_problems(cfg, tune)
                    + seed_problems(cfg.train.seed, seeds))


def resolve_with_problems(config: str | Path | dict | ExperimentConfig | None,
                          overrides: Sequence[str] | None = ()) -> tuple[ExperimentConfig, list[str]]:
    """The config and its problems, not raised (see `prepared`), with `overrides` applied: a YAML file's (or
    the packaged job's), a dict of the YAML's sections, or an ExperimentConfig, checked again, since its fields
    may have been set by hand."""
    overrides = [overrides] if isinstance(overrides, str) else list(overrides or [])  # not one per character
    if isinstance(config, ExperimentConfig):
        config = config.to_dict()
    if isinstance(config, dict):
        problems: list[str] = []
        return overridden(copy.deepcopy(config), overrides, problems), problems
    if config is not None and not isinstance(config, (str, Path)):
        return ExperimentConfig(), [f"config: {type(config).__name__} is not allowed; give a YAML file's path, a "
                                    "dict of its sections or an ExperimentConfig"]
    return config_and_problems(config, overrides)


def prepared(cfg: ExperimentConfig, problems: list[str]) -> Job:
    """The prepared job, or `problems` and the job's own problems together: all at once, the model's and the
    data's too, unless a problem is in what reading them depends on (task, model, data, the config file)."""
    if any(blocks_reading(p) for p in problems):
        raise TunelabInputError(problems)
    try:
        job = prepare_job(cfg)
    except TunelabInputError as exc:
        reported = {p.split(":", 1)[0] for p in problems}  # a refused value's default may be refused again
        raise TunelabInputError(problems + [p for p in exc.problems if p.split(":", 1)[0] not in reported]) from None
    if problems:
        raise TunelabInputError(problems)
    return job


def blocks_reading(problem: str) -> bool:
    """Whether a config problem leaves the model or data unreadable as the user meant them."""
    from .tasks.base import registry as task_registry

    section = problem.split(":", 1)[0].split(".")[0].split("[")[0].strip()
    return section in ("task", "model", "data", "config", *task_registry()) or section.startswith("override")


def default_output_dir() -> Path:
    return Path("runs") / dt.datetime.now().strftime("compare-%Y%m%d-%H%M%S")


def resume_config(out_dir: Path, config, overrides: Sequence[str], allow_change: bool | None) -> ExperimentConfig:
    """The saved config; with a config file, that file's; key=value overrides change whichever it is (without
    a file, the saved config: not the packaged job the same overrides would start from). `allow_change` None:
    no change can be allowed (a sweep: its studies are named after the config)."""
    problems = format_problems(out_dir)
    if problems:
        raise TunelabInputError(problems)
    saved, saved_hash = saved_config(out_dir)
    if config is None and not overrides:
        return saved
    cfg = resolve(config, overrides) if config is not None else with_overrides(saved.to_dict(), list(overrides))
    changed = changed_keys(saved.to_dict(), cfg.to_dict()) if cfg.fingerprint() != saved_hash else []
    if changed and not allow_change and not all(key.split(":")[0] in HOW_IT_RUNS for key in changed):
        remedy = "pass --allow-config-change to continue anyway" if allow_change is not None else \
            "a sweep resumes with the config it started with (its studies are named after it); start another " \
            "sweep for this one"
        raise TunelabInputError([f"--resume: the config differs from the one {str(out_dir)!r} was started with "
                                 f"({'; '.join(changed[:8])}); {remedy}"])
    return cfg


# a resume on another machine may change them without --allow-config-change (threads can change float
# summation order: the same run, not bit for bit)
HOW_IT_RUNS = {f"train.{key}" for key in HOW_A_RUN_IS_CARRIED_OUT}


def changed_keys(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """'train.epochs: 1.0 → 2.0' for every leaf that differs."""
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += changed_keys(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} → {new!r}")
    return out


def clear_outputs(out_dir: Path) -> None:
    for name in ("results.json", "results.csv", "report.md", "report.html", "sweep.json", "sweep.md", "sweep.html",
                 "sweep.db", RUN_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "artifacts", "tensorboard", "plots", "data", "runs", "records"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def checked_job(out_dir: Path, config, overrides, resume: bool, allow_change: bool | None, overwrite: bool,
                more_problems) -> tuple[ExperimentConfig, Job]:
    """The config (the saved one on resume) and the prepared job, or every problem with them at once."""
    if resume:
        cfg, problems = resume_config(out_dir, config, overrides, allow_change), []
    else:
        cfg, problems = resolve_with_problems(config, overrides)
        problems += output_problems(out_dir, overwrite)
    job = prepared(cfg, problems + more_problems(cfg))
    changed = changed_data_problems(out_dir, job.data.fingerprint, allow_change) if resume else []
    if changed:
        raise TunelabInputError(changed)
    out_dir.mkdir(parents=True, exist_ok=True)
    return cfg, job


def start_folder(out_dir: Path, cfg: ExperimentConfig, resume: bool, flags: dict[str, Any] | None = None,
                 job: Job | None = None) -> None:
    if not resume:
        clear_outputs(out_dir)
    write_run_file(out_dir, cfg, flags, job.data.fingerprint if job is not None else None)


RUN_DEFAULTS = {"seeds": 1, "tune": 0}


def run_flags(out_dir: Path, resume: bool, seeds: int | None, tune: int | None,
              nproc: int | None = None) -> tuple[dict[str, int], list[str]]:
    """--seeds and --tune: as given, else 1 and 0, and on --resume as the experiment was started. --nproc: as
    given, else on --resume as started (a resume that printed "continue with: ..." without it went on in one
    process), else 1 or the processes a launcher started. Unlike the others it may change on resume: the global
    batch stays the same, so a run continues on fewer or more processes, only not bit for bit."""
    given = {"seeds": seeds, "tune": tune}
    if resume:
        flags, problems = resumed_flags(out_dir, given, RUN_DEFAULTS)
        started = saved_flags(out_dir).get("nproc")  # (folders of earlier versions did not keep it)
        nproc = nproc if nproc is not None else started
        return {**flags, "command": "compare", "nproc": nproc}, problems + command_problems(out_dir, "compare")
    return {"command": "compare", "nproc": nproc,
            **{name: default if given[name] is None else given[name] for name, default in RUN_DEFAULTS.items()}}, []


@offline_option
@keeps_torch_threads
def compare(config: str | Path | dict | ExperimentConfig | None = None, overrides: Sequence[str] = (),
            output_dir: str | Path | None = None, overwrite: bool = False, show_progress: bool = True,
            resume: bool = False, allow_config_change: bool = False, seeds: int | None = None,
            isolate: bool = True, tune: int | None = None, nproc: int | None = None) -> CompareOutcome:
    """Train every configured method (with `seeds` seeds each) on the same data, evaluate, and write results
    and report. Each run trains in a fresh process unless `isolate` is False (then peak memory and failures
    of one run can leak into the next).

    With `resume`, runs finished in `output_dir` are kept and unfinished ones continue from their latest
    complete checkpoint, with the `seeds` and `tune` the experiment was started with (None: as saved; 1 and 0
    for a new one). With `tune` N, each method first gets N optuna trials on the validation split (the
    same budget for every method; the test split is never looked at), and its runs use the best of them.

    With `nproc` N, each run trains as N data-parallel processes (DDP) with the same global batch. Started
    by torchrun or accelerate launch instead, every process runs this function: runs train in it, and only
    the main process writes (see `launched_compare`).
    """
    from .sweep.tuning import tune_methods

    if resume and not output_dir:
        raise TunelabInputError(["--resume: needs --output DIR, the experiment to continue"])
    if resume and overwrite:  # --overwrite was ignored: which one was meant is the user's to say
        raise TunelabInputError(["--overwrite: with --resume, which continues what --output holds; drop one"])
    if allow_config_change and not resume:  # ignored: a new experiment has no earlier config to differ from
        raise TunelabInputError(["--allow-config-change: only with --resume (it lets a resumed experiment take "
                                 "another config); drop it"])
    bad_numbers = count_problems(seeds=(seeds, 1), tune=(tune, 0), nproc=(nproc, 1))
    if bad_numbers:  # with the config's problems, all at once
        resolve(None if resume else config, () if resume else overrides, bad_numbers)
    out_dir = Path(output_dir) if output_dir else default_output_dir()
    asked_nproc = nproc
    flags, flag_problems = run_flags(out_dir, resume, seeds, tune, nproc)
    seeds, tune, nproc = flags["seeds"], flags["tune"], flags["nproc"]
    if launched_world_size() > 1:
        from .experiment.launched import launched_compare

        if tune:
            raise TunelabInputError(["--tune: not under torchrun/accelerate launch (each trial is its own "
                                     "launch); use `tunelab compare --nproc N --tune K`"])
        try:
            # the launcher decides the processes; a resume's saved --nproc was not asked for of it
            return launched_compare(config, overrides, output_dir, overwrite, resume, allow_config_change, seeds,
                                    asked_nproc, show_progress, flag_problems)
        finally:
            leave_process_group()
    from .experiment.plan import plan_runs, seed_problems
    from .experiment.forkserver import warm_up
    from .experiment.results import write_results
    from .report import write_report

    if isolate:
        warm_up()  # the runs' process server imports the libraries while the job is prepared
    early = flag_problems + run_flag_problems(tune, isolate, nproc)
    cfg, job = checked_job(out_dir, config, overrides, resume, allow_config_change, overwrite,
                           lambda cfg: early + process_problems(cfg, 1 if nproc is None else nproc)
                           + tuning_problems(cfg, tune) + seed_problems(cfg.train.seed, seeds))
    with ExperimentLock(out_dir):
        start_folder(out_dir, cfg, resume, flags, job)
        done = finished_records(out_dir) if resume else {}
        summary = {**job.summary(), "baseline": job.baseline()}
        stop = StopRequest()
        execute = run_isolated(job, out_dir, nproc or 1, stop) if isolate else run_here(job, out_dir, stop)
        tuned = tune_methods(cfg, job, out_dir, tune, show_progress, resume, nproc or 1) if tune else {}
        records: list[dict[str, Any]] = []
        for run in plan_runs(job.config, seeds):
            values = tuned.get(run.method, {})
            record = done.get(run.run_id) or execute(run, show_progress, resume, values)
            records.append({**record, "hyperparameters": values} if values else record)
            payload = write_results(out_dir, records, summary)  # after each run: a crash keeps the rest
            if records[-1]["status"] == "interrupted" or stop.signum:
                write_report(out_dir, payload)
                when = "during" if records[-1]["status"] == "interrupted" else "after"
                raise CompareInterrupted(f"interrupted {when} {run.run_id}; partial results in {out_dir}; "
                                         f"continue with: tunelab compare --resume --output {out_dir}")
        from .estimate.store import append_summary

        append_summary(out_dir, payload)  # what `recommend` later knows was measured on this kind of model
        return CompareOutcome(out_dir, records, write_report(out_dir, payload), summary)


@dataclass
class SweepOutcome:
    output_dir: Path
    studies: dict[str, dict[str, Any]]  # method → {study, direction, trials, best, importances}
    report_path: Path


@offline_option
@keeps_torch_threads
def sweep(config: str | Path | dict | ExperimentConfig | None = None, overrides: Sequence[str] = (),
          output_dir: str | Path | None = None, trials: int | None = None, storage: str | None = None,
          study_name: str | None = None, resume: bool = False, overwrite: bool = False,
          show_progress: bool = True, nproc: int | None = None) -> SweepOutcome:
    """Tune each configured method: optuna trials until its study holds `trials` (the study's total, shared
    by every worker on the same storage; default 20, on `resume` as started), each trained in its own process
    (`nproc` DDP processes; default 1, on `resume` as started), bad ones pruned early."""
    from .experiment.forkserver import warm_up
    from .experiment.isolation import share_job
    from .sweep.report import write_sweep
    from .sweep.space import space_problems
    from .sweep.storage import default_storage, storage_problems, storage_record, sweep_flags
    from .sweep.study import SweepFailed, joined_studies, name_problems, open_study, run_study, study_summary

    if resume and not output_dir:
        raise TunelabInputError(["--resume: needs --output DIR, the sweep to continue"])
    if resume and overwrite:  # --overwrite was ignored: which one was meant is the user's to say
        raise TunelabInputError(["--overwrite: with --resume, which continues what --output holds; drop one"])
    bad_numbers = count_problems(trials=(trials, 1), nproc=(nproc, 1))
    if bad_numbers:  # with the config's problems, all at once
        resolve(None if resume else config, () if resume else overrides, bad_numbers)
    warm_up()  # the trials' process server imports the libraries while the job is prepared
    out_dir = Path(output_dir) if output_dir else default_output_dir().with_name(
        default_output_dir().name.replace("compare", "sweep"))
    flags, run_problems = sweep_flags(out_dir, resume, storage, study_name, nproc, trials)
    storage, study_name, nproc, trials = flags["storage"], flags["study_name"], flags["nproc"], flags["trials"]
    run_problems += storage_problems(storage)
    run_problems += launcher_problems(None)
    if launched_world_size() > 1:
        run_problems.append("sweep: not under torchrun/accelerate launch (each trial is its own launch); use --nproc N")
    cfg, job = checked_job(out_dir, config, overrides, resume, None, overwrite, lambda cfg: space_problems(cfg)
                           + run_problems + process_problems(cfg, nproc) + name_problems(cfg, study_name))
    joined_studies(cfg, storage, study_name)
    warm_up(job.model_path)
    with ExperimentLock(out_dir):
        start_folder(out_dir, cfg, resume, {**flags, "storage": storage_record(storage), "command": "sweep"}, job)
        share_job(out_dir, job)
        url, studies, failed = storage or default_storage(out_dir), {}, []
        try:
            for method in cfg.methods:
                try:
                    run_study(cfg, job, method, out_dir, trials, url, study_name, show_progress, resume,
                              seeded=storage is None, nproc=nproc)
                except SweepFailed as exc:  # one method's failing trials do not stop the others' studies
                    failed.append(str(exc))
                finally:  # a stopped method's trials so far count too
                    studies[method] = study_summary(open_study(cfg, method, url, study_name, storage is None))
        finally:  # written once, stopped or not: sweep.json and the report
            report = write_sweep(out_dir, job.summary(), studies)
        if failed:
            raise SweepFailed("; ".join(failed))
        return SweepOutcome(out_dir, studies, report)


def run_isolated(job: Job, out_dir: Path, nproc: int = 1, stop: StopRequest | None = None):
    from .experiment.forkserver import warm_up
    from .experiment.isolation import run_in_child, share_job
    from .sweep.space import with_values

    warm_up(job.model_path)
    share_job(out_dir, job)

    def execute(run, show_progress, resume, values):
        return run_in_child(out_dir, run, with_values(run.config(job.config), values).to_dict(), show_progress,
                            resume, nproc=nproc, stop=stop)
    return execute


def run_here(job: Job, out_dir: Path, stop: StopRequest):
    import dataclasses
    import signal

    from .experiment.runner import STOP_REQUESTED, run_method

    def execute(run, show_progress, resume, values):
        record = run_method(dataclasses.replace(job, config=run.config(job.config)), run.method, out_dir,
                            show_progress, resume, run.run_id)
        if record.pop(STOP_REQUESTED, False):  # a Ctrl-C after its last step: kept, and the experiment stops
            stop.signum = stop.signum or signal.SIGINT
        return record
    return execute
