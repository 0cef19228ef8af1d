"""The Python API of the commands that plan and read (estimate, recommend, report, ls), beside api.py's that
train: the same checks and messages as their CLI commands, raised as TunelabInputError.

    import tunelab
    tunelab.recommend("my.yaml", memory="24GB", time_budget="2h")["methods"][0]["method"]
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .api import resolve
from .api_checks import count_problems, process_problems
from .config import ExperimentConfig
from .errors import TunelabInputError
from .models.hub import offline_option

Config = str | Path | dict | ExperimentConfig | None


@offline_option
def estimate(config: Config = None, overrides: Sequence[str] = (), train_examples: int | None = None,
             peak_tflops: float | None = None, nproc: int = 1) -> dict[str, Any]:
    """Parameters, peak memory, FLOPs and time per method, from the model's config alone (`tunelab estimate`)."""
    from .estimate import estimate as estimate_config

    problems = flag_problems(train_examples, peak_tflops) + count_problems(nproc=(nproc, 1))
    cfg = resolve(config, overrides, problems)  # raises with the config's problems where there are any
    problems = process_problems(cfg, nproc)
    if problems:
        raise TunelabInputError(problems)
    return estimate_config(cfg, train_examples, peak_tflops=peak_tflops, nproc=nproc)


@offline_option
def recommend(config: Config = None, overrides: Sequence[str] = (), memory: str | float = "",
              time_budget: str | float | None = None, train_examples: int | None = None,
              peak_tflops: float | None = None) -> dict[str, Any]:
    """Methods ranked for a memory budget ("24GB", or MB as a number) and an optional time budget ("2h", or
    seconds), each with its reasons (`tunelab recommend`)."""
    from .estimate.recommend import parse_duration_s, parse_size_mb, recommend as recommend_config

    problems = flag_problems(train_examples, peak_tflops)
    memory_mb = budget(problems, "--memory", memory, parse_size_mb)
    budget_s = None if time_budget is None else budget(problems, "--time-budget", time_budget, parse_duration_s)
    cfg = resolve(config, overrides, problems)
    if cfg.train.fsdp:  # it plans one process: what one device of several holds is estimate's to say
        problems.append("train.fsdp: recommend plans for one process; `tunelab estimate --nproc N train.fsdp=true` "
                        "gives one device's share of a sharded run")
    else:
        problems += process_problems(cfg, 1)
    if problems:
        raise TunelabInputError(problems)
    return recommend_config(cfg, memory_mb, budget_s, train_examples, peak_tflops)


def report(folder: str | Path) -> Path:
    """report.md (and report.html) rebuilt from `folder`'s results.json, ranked from its records as they are
    now (`tunelab report`); the summary in results.json and results.csv is rewritten to match, so the files
    never disagree (records edited since, or summarized by an earlier version)."""
    from .experiment.results import content_problems, read_results, save_results
    from .report import write_report
    from .report.summary import summarize
    from .report.view import job_view

    if not isinstance(folder, (str, Path)):
        raise TunelabInputError([f"folder: {folder!r} is not allowed; give an experiment folder's path"])
    if not (Path(folder) / "results.json").is_file() and (Path(folder) / "sweep.json").is_file():
        return sweep_report(Path(folder))
    payload = read_results(Path(folder))
    job = job_view(payload)
    problems = content_problems(payload, job)
    if problems:
        raise TunelabInputError([f"{str(Path(folder) / 'results.json')!r}: {p}" for p in problems])
    payload["summary"] = summarize(payload["methods"], job)
    save_results(Path(folder), payload)
    return write_report(Path(folder), payload)


def ls(what: str) -> dict[str, dict[str, Any]]:
    """The registered methods or tasks (`tunelab ls methods|tasks`), by name: each one's description, and for
    a task the data.* keys it reads (columns, as users set them)."""
    from .methods.base import registry as methods
    from .tasks.base import registry as tasks

    listed = {"methods": methods, "tasks": tasks}
    if what not in listed:
        raise TunelabInputError([f"what: {what!r} is not allowed; allowed: {', '.join(listed)}"])
    return {name: {"description": item.description,
                   **({"data_keys": [f"data.{key}" for key in item.data_keys]} if what == "tasks" else {})}
            for name, item in sorted(listed[what]().items())}


def sweep_report(folder: Path) -> Path:
    """sweep.md (and sweep.html, the plots) rebuilt from a sweep folder's sweep.json."""
    import json

    from .sweep.report import write_sweep

    try:
        payload = json.loads((folder / "sweep.json").read_text())
        return write_sweep(folder, payload["job"], payload["studies"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # hand-edited, or of another version
        raise TunelabInputError([f"{str(folder / 'sweep.json')!r} is not a readable sweep summary "
                                 f"({type(exc).__name__}: {exc}); a sweep rewrites it on --resume"]) from None


def budget(problems: list[str], flag: str, value: str | float, parse) -> float | None:
    """A size or duration as text with a unit, or as a plain number of MB / seconds; None with a problem."""
    try:
        number = parse(value) if isinstance(value, str) else float(value)
    except (TypeError, ValueError) as exc:
        problems.append(f"{flag}: {exc}")
        return None
    if not (math.isfinite(number) and number > 0):
        problems.append(f"{flag}: {value!r} is not allowed; must be a finite amount more than 0")
        return None
    return number


def flag_problems(train_examples: int | None, peak_tflops: float | None) -> list[str]:
    problems = count_problems(**{"train-examples": (train_examples, 1)})
    if peak_tflops is not None and (isinstance(peak_tflops, bool) or not isinstance(peak_tflops, (int, float))
                                    or not math.isfinite(peak_tflops) or peak_tflops <= 0):
        problems.append(f"--peak-tflops: {peak_tflops!r} is not allowed; must be a number above 0")
    return problems
