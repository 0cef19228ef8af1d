"""The child process of one run: `python -m tunelab.experiment.worker EXPERIMENT_DIR SPEC.json`."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path


# a sweep trial's storage URL, password included: given in the environment, not in the spec file in the folder
TRIAL_STORAGE = "TUNELAB_TRIAL_STORAGE"


def main(argv: list[str]) -> int:
    die_with_parent()
    out_dir, spec_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..config import from_dict
    from ..models.loading import first_line, load_tokenizer
    from . import forkserver
    from .isolation import RECORDS, file_name, load_shared_job, rank_failure_path
    from .job import Job
    from .plan import Run
    from ..train.distributed import leave_process_group
    from .runner import STOP_REQUESTED, run_method

    problems: list[str] = []
    cfg = from_dict(spec["config"], problems)
    if problems:  # the parent validated this config: only a changed installation gets here
        print("\n".join(problems), file=sys.stderr)
        return 2
    shared = load_shared_job(out_dir)
    tokenizer = load_tokenizer(shared["model_path"])
    # a tuning trial is chosen on validation alone: it never scores the test split (nor pays for it)
    data = dataclasses.replace(shared["data"], test=None) if spec.get("trial") else shared["data"]
    job = Job(cfg, cfg.task_spec, shared["model_path"], tokenizer, data)
    run = Run(spec["method"], spec["seed"], spec["run_id"])
    startup_s = time.time() - spec["spawned_at"]  # process start, imports, shared data, tokenizer
    on_eval = trial_reporter(spec["trial"], cfg) if spec.get("trial") else None
    try:
        record = run_method(job, run.method, out_dir, spec["show_progress"], spec["resume"], run.run_id, on_eval)
    except KeyboardInterrupt:  # a second Ctrl-C aborts: said in a line, not a traceback of wherever it struck
        print(f"{run.run_id}: aborted by a second Ctrl-C; --resume continues from its last checkpoint",
              file=sys.stderr)
        return 130
    record.pop(STOP_REQUESTED, None)  # a stop that reached this process reached the parent too (process group)
    record["startup_s"] = round(startup_s, 2)
    # a forked run's resident peak leaves out library pages it never touched (~110 MB on the tiny job)
    record["process_start"] = "fork server" if forkserver.forked_run else "fresh interpreter"
    record["pid"] = os.getpid()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:  # under DDP the main process alone writes
        write_record(out_dir / RECORDS / file_name(run), record)
    if record["status"] == "failed" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # when: the parent blames the rank that failed first, not the one that then lost it in a collective
        write_record(rank_failure_path(out_dir, file_name(run), rank),
                     {"failed_at": time.time(), "error": first_line(record.get("error") or "")})
    leave_process_group()
    return exit_code(record)


def die_with_parent() -> None:
    """A run whose parent is gone (the experiment's process killed, or the fork server, which also stops its
    runs) is ended: nobody would read its result, and a --resume started meanwhile would write the same
    checkpoints. SIGKILL: the run resumes from its last checkpoint."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="tunelab-parent-watch", daemon=True).start()


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str))
    tmp.replace(path)


def exit_code(record: dict) -> int:
    if record["status"] == "interrupted":
        return 130
    if record["status"] == "failed" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a process that failed alone leaves the others waiting in a collective: the launcher stops them
        print(f"rank {os.environ.get('RANK')}: {record['error']}\n{record.get('traceback', '')}", file=sys.stderr)
        return 1
    return 0


def trial_reporter(info: dict, cfg):
    """Report each validation result to the sweep's optuna trial, and stop when its pruner says so."""
    import optuna

    from ..train.loop import Pruned

    # a trial finished after a resume evaluates again at steps after its checkpoint, as before the stop: the
    # same values, which optuna keeps from the first time and warns about
    warnings.filterwarnings("ignore", message="The reported value is ignored because")
    study = optuna.load_study(study_name=info["study"], storage=os.environ.get(TRIAL_STORAGE) or info["storage"])
    trial = optuna.trial.Trial(study, info["trial_id"])
    metric = info["metric"]

    def report(state, metrics, improved):
        trial.report(metrics[metric], state.step)
        if trial.should_prune():
            raise Pruned(f"pruned at step {state.step} ({metric} {metrics[metric]:.4f})")
    return report


if __name__ == "__main__":
    from ..train.distributed import exit_process

    exit_process(main(sys.argv[1:]))
