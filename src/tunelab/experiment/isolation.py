"""Each run in a fresh process, so its peak memory, time and failures are its own. The parent tokenizes once
and leaves the encoded data in the experiment folder; each child reads them, trains one run and writes its
record. A child that dies without writing one (killed, out of memory) is recorded as failed."""
from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .job import Job
from .plan import Run

SHARED_DATA = Path("data") / "job.pkl"
SPECS, RECORDS = Path("runs"), Path("records")


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


def run_in_child(out_dir: Path, run: Run, config: dict, show_progress: bool, resume: bool,
                 trial: dict | None = None) -> dict[str, Any]:
    """Train `run` in a fresh process; `trial` ({storage, study, trial_id, metric}) makes it report to optuna."""
    spec = {"method": run.method, "seed": run.seed, "run_id": run.run_id, "config": config, "resume": resume,
            "show_progress": show_progress, "spawned_at": time.time(), "trial": trial}
    spec_path = out_dir / SPECS / file_name(run)
    record_path = out_dir / RECORDS / file_name(run)
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    record_path.unlink(missing_ok=True)
    # Ctrl-C reaches the child too (same process group): it checkpoints and writes an "interrupted" record;
    # the parent waits for that instead of dying first.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = subprocess.call([sys.executable, "-m", "tunelab.experiment.worker", str(out_dir), str(spec_path)])
    finally:
        signal.signal(signal.SIGINT, previous)
    if record_path.is_file():
        return json.loads(record_path.read_text())
    cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return {"method": run.method, "run_id": run.run_id, "seed": run.seed, "status": "failed", "config": config,
            "error": f"the run's process {cause} before writing its result; continue with --resume"}
