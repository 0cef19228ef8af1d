"""`tunelab compare` started by torchrun or accelerate launch: every process runs it, the runs train as one
DDP group in these processes, and the main process alone owns the output folder.

Every process prepares the same job from the same inputs (tokenizing is deterministic); decisions that must
agree (problems found, runs already finished) come from the main process. The output folder must be one
all processes share: a resumed run reads its checkpoint on every process. A run that fails on one process
leaves the others waiting in a collective, so it stops the launch (after the main process wrote what it has);
`--resume` continues. Diverged, pruned and interrupted runs are seen alike everywhere and do not stop it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import TunelabInputError
from ..train.distributed import Ranks, check_world, launcher_problems
from .folder import ExperimentLock, changed_data_problems, finished_records
from .job import prepare_job
from .plan import plan_runs


def process_group(cfg) -> Ranks:
    """Form the group now (accelerate: gloo on CPU, NCCL on GPU) and check it has every launched process."""
    from ..train.setup import make_accelerator

    ranks = Ranks.of(make_accelerator(cfg.train))
    check_world(ranks)
    return ranks


def launched_compare(config, overrides, output_dir, overwrite: bool, resume: bool, allow_change: bool,
                     seeds: int, nproc: int | None, show_progress: bool, flag_problems: list[str]):
    from ..api import CompareOutcome, resolve, resume_config, start_folder
    from ..api_checks import output_problems, process_problems
    from ..estimate.store import append_summary
    from ..report import write_report
    from .results import write_results
    from .runner import STOP_REQUESTED, run_method

    early = launcher_problems(nproc) + ([] if output_dir else [
        "--output: needed under torchrun/accelerate launch, a folder every process can reach"])
    if early:
        raise TunelabInputError(early)
    out_dir = Path(output_dir)
    cfg = resume_config(out_dir, config, overrides, allow_change) if resume else resolve(config, overrides)
    ranks = process_group(cfg)
    job, problems = None, flag_problems + ([] if resume or not ranks.is_main else output_problems(out_dir, overwrite))
    if seeds < 1:
        problems.append(f"--seeds: {seeds} is not allowed; must be >= 1")
    problems += process_problems(cfg, ranks.world)
    try:
        job = prepare_job(cfg)
        problems += changed_data_problems(out_dir, job.data.fingerprint, allow_change) if resume else []
    except TunelabInputError as exc:
        problems += exc.problems
    problems = sorted({p for found in ranks.gather(problems) for p in found})
    if problems:
        raise TunelabInputError(problems)
    main = ranks.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with ExperimentLock(out_dir) if main else contextlib.nullcontext():
        if main:
            # no "nproc": a later `tunelab compare --resume` runs one process unless told (the launch may
            # have spanned machines); the command, so a `sweep --resume` of it is refused
            start_folder(out_dir, cfg, resume, {"command": "compare", "seeds": seeds, "tune": 0,
                                                "launched_processes": ranks.world}, job)
        done = ranks.broadcast(finished_records(out_dir) if resume and main else {})
        summary = {**job.summary(), "baseline": job.baseline()} if main else job.summary()
        records: list[dict[str, Any]] = []
        for run in plan_runs(cfg, seeds):
            record = done.get(run.run_id) or run_method(dataclasses.replace(job, config=run.config(cfg)),
                                                        run.method, out_dir, show_progress and main, resume,
                                                        run.run_id)
            stopped_after = ranks.any(record.pop(STOP_REQUESTED, False))  # a stop after its last step: kept
            records.append(record)
            payload = write_results(out_dir, records, summary) if main else None
            stop_on_failure(record, ranks)
            if record["status"] == "interrupted" or stopped_after:
                from ..errors import CompareInterrupted

                if main:
                    write_report(out_dir, payload)
                when = "during" if record["status"] == "interrupted" else "after"
                raise CompareInterrupted(f"interrupted {when} {run.run_id}; continue with the same launch "
                                         f"command and --resume --output {out_dir}")
        if main:
            append_summary(out_dir, payload)
            write_report(out_dir, payload)
        ranks.barrier()  # the launch ends together: no process leaves the group while the main one still writes
        return CompareOutcome(out_dir, records if main else [], out_dir / "report.md", summary)


def stop_on_failure(record: dict[str, Any], ranks: Ranks) -> None:
    if record["status"] == "failed":
        raise RuntimeError(f"rank {ranks.rank}: {record['run_id']} failed, which stops every process of the "
                           f"launch: {record['error']}\n{record.get('traceback', '')}")
