"""Running one method's study: ask optuna for a trial, train it in its own process, tell optuna the result.
Several workers (processes or machines) on one storage share the study; `trials` is the study's total."""
from __future__ import annotations

import hashlib
import json
import math
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from ..config import HOW_A_RUN_IS_CARRIED_OUT
from ..errors import CompareInterrupted, TunelabInputError
from ..experiment.folder import read_record
from ..experiment.isolation import RECORDS, StopRequest, file_name, run_in_child
from ..experiment.job import batch_problems, length_problems, method_checker
from ..models.loading import read_model_config
from ..experiment.plan import Run
from ..experiment.worker import TRIAL_STORAGE
from .space import method_space, suggest, with_values
from .storage import storage_record

COUNTED = ("COMPLETE", "PRUNED", "RUNNING")
CONFIG = "tunelab_config"  # a named study's user attribute: the study_config its trials were started with
TUNE_STUDY = "tune"  # compare --tune's studies, in the experiment's own storage
MIN_TRIALS_FOR_IMPORTANCES = 5
VAL_LOSS = "val_loss"  # a finished trial's user attribute: its best checkpoint's validation loss
METRIC = "metric"  # a study's user attribute: the validation metric its trials' values are (sweep.metric)
FAILED = "error"  # a failed trial's user attribute: the first line of its error


class SweepFailed(RuntimeError):
    """A method's trials fail over and over: more of them would fail the same way."""  # a failed trial (a killed worker's) is replaced, not counted


UNFIT = "not_trained"  # a trial's user attribute: why its drawn values were pruned without training
VALUES = "values"  # a trial's user attribute: the values it trains with, so a resumed sweep can finish it


# how a run is carried out, not what it learns: workers on other machines (threads, device) join one study
RUN_ONLY = (*HOW_A_RUN_IS_CARRIED_OUT, "device", "compile")


def study_config(cfg, method: str) -> dict[str, Any]:
    """What a method's trials depend on: task, model, data, training (less RUN_ONLY), the method's options and
    its part of the search; not the other methods selected beside it (`methods=lora` and `lora,full` share)."""
    from ..tasks.base import registry

    full = cfg.to_dict()
    space = {k: v for k, v in (full["sweep"].get("space") or {}).items() if str(k).split(".")[0] in (method, "train")}
    return {**{k: v for k, v in full.items() if k in ("task", "model", "data") or k in registry()},
            "train": {k: v for k, v in full["train"].items() if k not in RUN_ONLY},
            method: full.get(method), "sweep": {**full["sweep"], "space": space}}


def study_name(cfg, method: str, name: str | None) -> str:
    # derived from what the trials depend on, so workers started with the same job and storage join one study
    if name:
        return f"{name}-{method}"
    digest = hashlib.sha256(json.dumps(study_config(cfg, method), sort_keys=True, default=str).encode())
    return f"tunelab-{digest.hexdigest()[:16]}-{method}"


def existing_name(cfg, method: str, name: str | None, storage: str) -> str:
    """The study to open: as named or derived, or a sweep folder's of an earlier version (named after the whole
    config) where the storage holds that one and not the new name, so its --resume continues it."""
    import optuna

    wanted = study_name(cfg, method, name)
    if name:
        return wanted
    earlier = f"tunelab-{cfg.fingerprint()}-{method}"
    names = optuna.get_all_study_names(storage)  # (open_study's storage object: one connection pool)
    return earlier if earlier in names and wanted not in names else wanted


def same_config_problems(study, cfg, method: str) -> list[str]:
    """A study named with --study-name holds the trials of one job: another config joining it would count its
    trials towards the other's budget and best."""
    from ..api import changed_keys

    mine, theirs = json.loads(json.dumps(study_config(cfg, method), default=str)), study.user_attrs.get(CONFIG)
    if theirs is None:
        # two workers with other configs starting together may both find none and both write theirs: the
        # later write wins, and the one that finds the other's after a moment is refused
        study.set_user_attr(CONFIG, mine)
        time.sleep(CONFIG_SETTLE_S * (1 + random.random()))
        theirs = study.user_attrs.get(CONFIG)  # read from the storage each time
    changed = changed_keys(theirs, mine)
    return [f"--study-name: the study {study.study_name!r} holds trials of another config ({'; '.join(changed[:6])}); "
            "give another --study-name, or the same config"] if changed else []


RACE_SIGNS = ("IntegrityError", "already exists", "database is locked")
CONFIG_SETTLE_S = 0.5  # a database round trip is milliseconds: another first writer has written by then


def open_study(cfg, method: str, storage: str, name: str | None, seeded: bool, checks_config: bool = True):
    """The method's study, created by the first worker; with a --study-name (`name`), refused where it holds
    another config's trials unless `checks_config` is off (compare --tune's own studies, which a resume with
    another config continues)."""
    import optuna

    from .storage import optuna_storage

    storage = optuna_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric = cfg.sweep.metric or cfg.metric_for_best
    direction = "maximize" if cfg.task_spec.higher_is_better(metric) else "minimize"
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2),
              "halving": optuna.pruners.SuccessiveHalvingPruner(),
              "none": optuna.pruners.NopPruner()}[cfg.sweep.pruner]
    # one worker: a seeded sampler makes the sweep repeatable; several: each must draw its own points
    sampler = optuna.samplers.TPESampler(seed=cfg.train.seed if seeded else None)
    for attempt in range(5):
        try:
            study = optuna.create_study(study_name=existing_name(cfg, method, name, storage), storage=storage,
                                        direction=direction, sampler=sampler, pruner=pruner, load_if_exists=True)
            problems = same_config_problems(study, cfg, method) if name and checks_config else []
            if problems:
                raise TunelabInputError(problems)
            if METRIC not in study.user_attrs:  # what the trials' values are, for the report
                study.set_user_attr(METRIC, metric)
            return study
        except Exception as exc:  # workers starting together race to create the storage's tables
            text = type(exc).__name__ + str(exc)  # a duplicate row, a table the other created first, a lock
            if not any(sign in text for sign in RACE_SIGNS) or attempt == 4:
                raise
            time.sleep(0.5 + random.random())


MAX_NAME = 512  # characters of a study name optuna's storage holds


def name_problems(cfg, name: str | None) -> list[str]:
    """A --study-name the storage cannot hold once a method's name is added (its database refused it mid-run)."""
    longest = max(cfg.methods, key=len)
    if not name or len(study_name(cfg, longest, name)) <= MAX_NAME:
        return []
    return [f"--study-name: {len(name)} characters; with '-{longest}' added the study's name must stay within "
            f"{MAX_NAME}, so at most {MAX_NAME - len(longest) - 1}"]


def joined_studies(cfg, storage: str | None, name: str | None) -> None:
    """Every method's study on a shared storage opened before the sweep's folder is written: a named study
    holding another config's trials is refused with nothing left behind (a folder would refuse the rerun)."""
    for method in cfg.methods if storage else []:
        open_study(cfg, method, storage, name, seeded=False)


def counted_trials(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=tuple(getattr(optuna.trial.TrialState, s) for s in COUNTED))


def counted(study) -> int:
    return len(counted_trials(study))


def worker_name(out_dir: Path) -> str:
    """Who runs a trial: the experiment folder of the worker (one sweep at a time holds its lock)."""
    return f"{socket.gethostname()}:{out_dir.resolve()}"


def interrupted_trials(study, worker: str) -> list:
    """Trials this worker's folder left RUNNING when its sweep was stopped or killed (the caller holds its lock
    now). Other workers' running trials are theirs to finish."""
    return sorted((t for t in running(study) if t.user_attrs.get("worker") == worker), key=lambda t: t.number)


def seeded_sampler(seed: int, index: int):
    """The sampler for the study's `index`-th trial: seeded by the sweep's seed and that index, not drawn on from
    one generator, so a resumed sweep draws the points an uninterrupted one would have drawn."""
    import numpy as np
    import optuna

    return optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def trial_run_id(method: str, number: int) -> str:
    return f"{method}/trial-{number:03d}"  # its folders (checkpoints, records) are named after it


def run_study(cfg, job, method: str, out_dir: Path, trials: int, storage: str, name: str | None,
              show_progress: bool, resume: bool, seeded: bool, nproc: int = 1,
              checks_config: bool = True) -> list[dict[str, Any]]:
    """Trials of `method` until the study holds `trials` of them; returns this worker's trial records."""
    import optuna

    from ..api_checks import process_problems

    study = open_study(cfg, method, storage, name, seeded, checks_config)
    worker = worker_name(out_dir)
    metric = cfg.sweep.metric or cfg.metric_for_best
    space = method_space(cfg, method)
    # trials drawn from several ranges may still combine badly (adalora.target_r above a drawn init_r)
    check, model_config = method_checker(job.model_path, job.task), read_model_config(job.model_path)
    rows = len(job.data.train.lengths)
    records, stop = [], StopRequest()

    def train(trial, values: dict[str, Any], resume_trial: bool) -> None:
        """Train the trial in its own process (or take the record a killed sweep's run had written), tell
        optuna, and stop the sweep where a stop was asked for."""
        run = Run(method, cfg.train.seed, trial_run_id(method, trial.number))
        # the spec file names the storage without its password; the run's processes get it in their environment
        record = (read_record(out_dir / RECORDS / file_name(run)) if resume_trial else None) or run_in_child(
            out_dir, run, with_values(job.config, values).to_dict(), show_progress, resume=resume_trial,
            trial={"storage": storage_record(storage), "study": study.study_name, "trial_id": trial._trial_id,
                   "metric": metric}, nproc=nproc, stop=stop, env={TRIAL_STORAGE: storage})
        record.update(trial=trial.number, hyperparameters=values)
        records.append(record)
        if record["status"] == "interrupted":  # left RUNNING: --resume finishes it from its checkpoint
            raise CompareInterrupted(f"interrupted during {run.run_id}; continue with --resume --output {out_dir}")
        tell(study, trial, record, metric)
        if stop.signum:  # asked while the trial was finishing: it counts, and the sweep stops
            raise CompareInterrupted(f"interrupted after {run.run_id}; continue with --resume --output {out_dir}")

    for trial in interrupted_trials(study, worker) if resume else []:
        if VALUES in trial.user_attrs:  # stopped or killed while training: finished from its checkpoint
            train(trial, trial.user_attrs[VALUES], resume_trial=True)
        else:  # left by a tunelab that did not keep the values: failed, and another trial takes its place
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    while counted(study) < trials:
        failed = sum(r["status"] not in ("success", "pruned") for r in records)
        if failed >= trials:
            raise SweepFailed(f"{method}: {failed} trials failed, as many as asked for (the last: "
                              f"{records[-1].get('error')}); see {out_dir}/records")
        if seeded:  # failed trials count too: their replacement, seeded alike, would draw the same failing point
            study.sampler = seeded_sampler(cfg.train.seed, len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        trial.set_user_attr("worker", worker)
        if surplus(study, trial, trials):
            trial.set_user_attr(FAILED, f"not trained: other workers took the study's last of {trials} trials")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        values = suggest(trial, space)
        try:  # a drawn train.* value the method cannot train with (gradient checkpointing for prefix tuning)
            run_cfg = with_values(job.config, values)
        except TunelabInputError as exc:
            unfit = exc.problems
        else:
            unfit = (length_problems(run_cfg, model_config) + check(run_cfg, method)
                     + batch_problems(run_cfg.train.batch_size, rows) + process_problems(run_cfg, nproc))
        if unfit:  # e.g. more virtual tokens than the model has positions left: pruned, so TPE moves away
            reason = "; ".join(unfit)
            records.append({"method": method, "run_id": trial_run_id(method, trial.number), "status": "pruned",
                            "error": reason, "trial": trial.number, "hyperparameters": values})
            trial.set_user_attr(UNFIT, reason)  # kept with the trial: told apart from the pruner's stops
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        trial.set_user_attr(VALUES, values)
        train(trial, values, resume_trial=False)
    return records


def surplus(study, trial, trials: int) -> bool:
    """Whether `trial` is past the study's budget: `trials` counted trials come before it. Workers asking
    together each get a trial; the lowest numbers keep theirs, whenever each worker looks (a trial's number
    comes from the storage, and what is counted before it only shrinks, by failures, which their workers
    replace). Taking the last trials, or the highest running one, let three workers all train or all back out."""
    return sum(t.number < trial.number for t in counted_trials(study)) >= trials


def running(study):
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


def tell(study, trial, record: dict, metric: str) -> None:
    import optuna

    value = (record.get("best_val") or {}).get(metric)
    now = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    if now.state.is_finished():
        # someone else ended it (an older tunelab resuming on the same storage failed every running trial):
        # the result stays in this worker's records, the study keeps what it has
        warnings.warn(f"trial {trial.number} was already ended in the study; its result is not recorded there")
        return
    if record["status"] == "pruned":
        study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
    elif record["status"] == "success" and value is not None and math.isfinite(value):
        loss = (record.get("best_val") or {}).get("loss")
        if loss is not None:  # breaks ties between trials of one score, as between checkpoints
            optuna.trial.Trial(study, now._trial_id).set_user_attr(VAL_LOSS, loss)  # (a resumed trial is frozen)
        study.tell(trial.number, value)
    else:  # why, for sweep.md: the record in records/ has the whole error
        from ..models.loading import first_line

        optuna.trial.Trial(study, now._trial_id).set_user_attr(FAILED, first_line(record.get("error") or "")
                                                                or record["status"])
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def study_summary(study) -> dict[str, Any]:
    """Every trial and the best one, from the storage (so other workers' trials are included)."""
    import optuna

    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
               **({"not_trained": t.user_attrs[UNFIT]} if UNFIT in t.user_attrs else {}),
               **({"error": t.user_attrs[FAILED]} if FAILED in t.user_attrs else {})}
              for t in study.get_trials(deepcopy=False)]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    best = best_trial(study, complete)
    importances, note = parameter_importances(study, len(complete))
    return {"study": study.study_name, "direction": study.direction.name.lower(),
            "metric": study.user_attrs.get(METRIC), "trials": trials,
            "best": best, "importances": importances, **({"importances_note": note} if note else {})}


def best_trial(study, complete: list) -> dict[str, Any] | None:
    """The best score; among trials tied on it (a small validation set), the lower validation loss, as between
    checkpoints (optuna keeps the first)."""
    if not complete:
        return None
    top = [t for t in complete if t.value == study.best_value]
    chosen = min(top, key=lambda t: (t.user_attrs.get(VAL_LOSS, math.inf), t.number))
    return {"number": chosen.number, "value": chosen.value, "params": chosen.params}


def parameter_importances(study, complete: int) -> tuple[dict[str, float], str | None]:
    """optuna's parameter importances, or none and why. Where the trials scored alike (a tiny validation set
    gives every trial the same accuracy) optuna's evaluator cannot tell the parameters apart: it returns them
    all equal and warns (a warning with a file path, in the user's terminal); equal numbers would read as a
    finding, so none are kept and the report says why."""
    import optuna

    if complete < 2:
        return {}, None
    if complete < MIN_TRIALS_FOR_IMPORTANCES:  # two or three points: any split of them "explains" the score
        return {}, (f"none: {complete} completed trials are too few to attribute the score to parameters "
                    f"({MIN_TRIALS_FOR_IMPORTANCES} or more)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError):  # e.g. every trial drew the same values
            importances = {}
    equal = [w for w in caught if "importances will be equal" in str(w.message)]
    for other in (w for w in caught if w not in equal):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if equal:
        return {}, f"none: the {complete} completed trials scored too alike for optuna to tell them apart"
    return importances, None
