"""Each run in a fresh process, so its peak memory, time and failures are its own. The parent tokenizes once
and leaves the encoded data in the experiment folder; each child reads them, trains one run and writes its
record. A child that dies without writing one (killed, out of memory) is recorded as failed.

The processes are forked from a server that has imported the libraries (forkserver.py), saving each run
the interpreter's start and end; where that server is not used (see `forkserver.wanted`), fresh interpreters.

With `nproc` > 1 a run is N processes in one DDP group, started with the environment torchrun gives its
workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...); the main one writes the record. They stay in this process
group, so a Ctrl-C reaches each of them once and they checkpoint together. A SIGINT or SIGTERM sent to this
process alone is passed on to them (`stops_forwarded`). A run dies with this process: killed (SIGKILL) it
leaves no run training on that nobody waits for (`fork_serving.serve`, `worker.die_with_parent`)."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from ..machine import threads_per_process
from . import forkserver
from .job import Job
from .plan import Run

SHARED_DATA = Path("data") / "job.pkl"
SPECS, RECORDS = Path("runs"), Path("records")
WORKER = "tunelab.experiment.worker"


def share_job(out_dir: Path, job: Job) -> None:
    """The encoded splits for the children: tokenized once per experiment, not once per run."""
    path = out_dir / SHARED_DATA
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump({"model_path": job.model_path, "data": job.data}, fh, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)


def load_shared_job(out_dir: Path) -> dict[str, Any]:
    with open(out_dir / SHARED_DATA, "rb") as fh:
        return pickle.load(fh)


def file_name(run: Run) -> str:
    return run.run_id.replace("/", "--") + ".json"


def rank_failure_path(out_dir: Path, run_file: str, rank: int) -> Path:
    return out_dir / SPECS / f"{run_file.removesuffix('.json')}.rank{rank}.failed.json"


def first_rank_failure(out_dir: Path, run: Run, nproc: int) -> tuple[int, str] | None:
    """The rank whose error came first, and that error, from what each failed rank left (`worker.main`). Its
    exit code cannot tell: a rank that raised and the main rank that then lost it in a collective both exit
    with 1, and the main rank's record holds only gloo's "connection closed by peer"."""
    failures = []
    for rank in range(nproc):
        path = rank_failure_path(out_dir, file_name(run), rank)
        with contextlib.suppress(OSError, ValueError):
            failed = json.loads(path.read_text())
            failures.append((failed["failed_at"], rank, failed["error"]))
    if not failures:
        return None
    _, rank, error = min(failures)
    return rank, error


def run_in_child(out_dir: Path, run: Run, config: dict, show_progress: bool, resume: bool,
                 trial: dict | None = None, nproc: int = 1, stop: "StopRequest | None" = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train `run` in a fresh process; `trial` ({storage, study, trial_id, metric}) makes it report to optuna;
    `env`: variables its processes get besides this one's (what is not to be written in the folder).
    A stop asked for while it ran (Ctrl-C, SIGTERM) is left in `stop`, also when the run had already finished:
    the caller records the run, then stops."""
    spec = {"method": run.method, "seed": run.seed, "run_id": run.run_id, "config": config, "resume": resume,
            "show_progress": show_progress, "spawned_at": time.time(), "trial": trial}
    spec_path = out_dir / SPECS / file_name(run)
    record_path = out_dir / RECORDS / file_name(run)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    record_path.unlink(missing_ok=True)
    for rank in range(nproc):
        rank_failure_path(out_dir, file_name(run), rank).unlink(missing_ok=True)
    stop = stop or StopRequest()
    code, failed_rank = run_processes([str(out_dir), str(spec_path)], nproc, stop, env)
    cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    first = first_rank_failure(out_dir, run, nproc) if nproc > 1 and code else None
    if first and first[0] != 0 and code > 0:  # a rank raised: its error, not the one it caused on rank 0
        failed_rank, cause = first[0], f"failed ({first[1]})"
    process = f"rank {failed_rank} of {nproc}" if failed_rank is not None else "process"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if failed_rank and record.get("status") == "failed":  # rank 0 wrote it, about losing the rank that failed
            record["error"] = f"{process} {cause} first; rank 0 then: {record.get('error')}"
        return record
    # stopped before its loop could checkpoint (still loading), or aborted by a second Ctrl-C: an interrupted run,
    # which resumes from its last checkpoint if it has one, and the experiment stops
    if stop.signum or code == 130:  # the stop asked for (Ctrl-C, a scheduler), not the signal passed on
        when = "while starting" if code != 130 else "(a second Ctrl-C aborted it)"
        status, what = "interrupted", f"stopped by {signal.Signals(stop.signum or signal.SIGINT).name} {when}"
    else:
        status, what = "failed", f"the run's {process} {cause}"
    return {"method": run.method, "run_id": run.run_id, "seed": run.seed, "status": status, "config": config,
            "error": f"{what}, before writing its result; continue with --resume"}


class StopRequest:
    """The signal (SIGINT or SIGTERM) that asked this process to stop while a run trained, if one did."""

    signum: int | None = None


@contextlib.contextmanager
def stops_forwarded(procs: list, stop: StopRequest | None):
    """While `procs` start and train: SIGINT or SIGTERM sent to this process (a terminal's Ctrl-C, which reaches
    the runs directly as well, `kill`, a scheduler preempting the job) is kept in `stop` and goes on to them as
    SIGTERM, which a run takes as "checkpoint and stop after this step" however often it comes. A run starts
    ignoring Ctrl-C until its loop takes it over, so a stop that comes while it loads reaches it this way only;
    one that came before a process was started is passed on to it at once (`pass_on`)."""
    if stop is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        stop.signum = stop.signum or signum
        for p in procs:
            with contextlib.suppress(ProcessLookupError):  # os.kill: no waiting on a process inside a handler
                os.kill(p.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def pass_on(stop: StopRequest | None, procs: list) -> None:
    if stop is not None and stop.signum:
        for p in procs:
            p.terminate()


def start_rank(args: list[str], env: dict[str, str]):
    # Ctrl-C from the terminal reaches a run directly; until its loop can checkpoint on it, the run ignores it
    return forkserver.start_process(WORKER, args, env, ignore_sigint=True)


def run_processes(args: list[str], nproc: int, stop: StopRequest | None = None,
                  env: dict[str, str] | None = None) -> tuple[int, int | None]:
    """Run the worker as `nproc` ranks of one process group; the exit code of the first to fail (else 0), and
    that rank (None for one process).

    A rank that fails leaves the others waiting in a collective, so the rest are stopped then."""
    procs: list = []
    with stops_forwarded(procs, stop):
        if nproc == 1:
            procs.append(start_rank(args, {**os.environ, **(env or {})}))
            pass_on(stop, procs)
            return procs[0].wait(), None
        port = free_port()
        try:
            for rank in range(nproc):
                procs.append(start_rank(args, {**rank_environment(rank, nproc, port), **(env or {})}))
        except BaseException:  # the ranks started would wait for the missing one forever
            stop_all(procs)
            raise
        pass_on(stop, procs)
        return wait_for_ranks(procs)


def wait_for_ranks(procs: list) -> tuple[int, int | None]:
    """The exit code and rank of the process that failed first: the others are only stopped because of it.
    Where several are found failed at once, one killed by a signal is the cause (the others then lost their
    connection to it: gloo's "connection reset")."""
    while any(p.poll() is None for p in procs) and not any(p.poll() not in (None, 0) for p in procs):
        time.sleep(0.1)
    # a rank that lost its peer may exit before the peer's death is reported: a moment for the cause to show
    settle = time.monotonic() + 2.0
    while time.monotonic() < settle and any(p.poll() is None for p in procs) and \
            not any((p.poll() or 0) < 0 for p in procs):
        time.sleep(0.05)
    failure = first_failure(procs)
    stop_all(procs)
    return failure


def first_failure(procs: list) -> tuple[int, int | None]:
    """(code, rank) of the failed rank to blame, one killed by a signal first; (0, None) if none failed."""
    failed = [(rank, p.poll()) for rank, p in enumerate(procs) if p.poll() not in (None, 0)]
    if not failed:
        return 0, None
    rank, code = min(failed, key=lambda item: (item[1] >= 0, item[0]))
    return code, rank


def stop_all(procs: list[subprocess.Popen]) -> None:
    # SIGKILL: the others wait in a collective for the one that is gone, and SIGTERM would only ask them to
    # checkpoint after a step they cannot finish
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    """torchrun's worker environment for one machine; threads shared out unless the user set them."""
    threads = threads_per_process(nproc)
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
