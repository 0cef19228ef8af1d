"""The Python API; the CLI is a thin layer over these functions.

    import tunelab
    outcome = tunelab.compare("my.yaml", ["methods=full,lora", "train.epochs=2"], output_dir="runs/x")
    outcome.records[0]["test"]["accuracy"]
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .config import ExperimentConfig, load_config
from .errors import TunelabInputError
from .job import Job, prepare_job


@dataclass
class CompareOutcome:
    output_dir: Path
    records: list[dict[str, Any]]
    report_path: Path

    @property
    def exit_code(self) -> int:
        return 0 if all(r["status"] == "success" for r in self.records) else 1


def resolve(config: str | Path | ExperimentConfig | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        if overrides:
            raise ValueError("overrides apply to a YAML config, not to an ExperimentConfig object")
        return config
    return load_config(config, list(overrides))


def validate(config: str | Path | ExperimentConfig | None = None, overrides: Sequence[str] = ()) -> Job:
    """Check config, model and data without training; raises TunelabInputError listing every problem."""
    return prepare_job(resolve(config, overrides))


def output_problems(out_dir: Path, overwrite: bool) -> list[str]:
    if out_dir.exists() and not out_dir.is_dir():
        return [f"--output: {str(out_dir)!r} is a file, not a folder"]
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        return [f"--output: {str(out_dir)!r} is not empty; pass --overwrite to replace its results"]
    return []


def default_output_dir() -> Path:
    return Path("runs") / dt.datetime.now().strftime("compare-%Y%m%d-%H%M%S")


def compare(config: str | Path | ExperimentConfig | None = None, overrides: Sequence[str] = (),
            output_dir: str | Path | None = None, overwrite: bool = False,
            show_progress: bool = True) -> CompareOutcome:
    """Train every configured method on the same data, evaluate, and write results and report."""
    from .report import write_report
    from .results import write_results
    from .runner import run_method

    cfg = resolve(config, overrides)
    out_dir = Path(output_dir) if output_dir else default_output_dir()
    problems = output_problems(out_dir, overwrite)
    try:
        job = prepare_job(cfg)
    except TunelabInputError as exc:
        raise TunelabInputError(problems + exc.problems) from None
    if problems:
        raise TunelabInputError(problems)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for name in cfg.methods:
        records.append(run_method(job, name, out_dir, show_progress))
        payload = write_results(out_dir, records, job.summary())  # after each method: a crash keeps the rest
    return CompareOutcome(out_dir, records, write_report(out_dir, payload))
