"""Checks of a command's arguments against each other and against the config (process counts, whole
numbers, the output folder): shared by compare, sweep, validate, estimate and launched runs, so each refuses a
bad combination with the same message before any work starts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ExperimentConfig
from .train.distributed import launcher_problems


def output_problems(out_dir: Path, overwrite: bool) -> list[str]:
    if out_dir.exists() and not out_dir.is_dir():
        return [f"--output: {str(out_dir)!r} is a file, not a folder"]
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        return [f"--output: {str(out_dir)!r} is not empty; pass --overwrite to replace its results, or --resume "
                "to continue the experiment there"]
    return []


def count_problems(**counts: tuple[Any, int]) -> list[str]:
    """Whole-number arguments (None: not given) at or above their minimum. The command line parses them; from
    Python a 2.5, "2" or True would fail deep inside with a TypeError, or after the output folder is written."""
    return [f"--{name}: {value!r} is not allowed; must be a whole number >= {low}"
            for name, (value, low) in counts.items()
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low)]


def run_flag_problems(tune: int, isolate: bool, nproc: int | None) -> list[str]:
    problems = []
    if tune and not isolate:
        problems.append(f"--tune: {tune} is not allowed with --in-process; every trial runs in its own process")
    if nproc and nproc > 1 and not isolate:
        problems.append("--nproc: needs every run in its own processes; drop --in-process")
    return problems + launcher_problems(nproc)


def tuning_problems(cfg: ExperimentConfig, tune: int | None) -> list[str]:
    """`compare --tune` searches sweep.space as a sweep does: its entries must name selected methods."""
    if not tune:
        return []
    from .sweep.space import space_problems

    return space_problems(cfg)


def process_problems(cfg: ExperimentConfig, nproc: int) -> list[str]:
    """Every process needs at least one row of each micro-batch of a full global batch; sharding needs processes."""
    problems = count_problems(nproc=(nproc, 1))
    if problems:
        return problems
    problems = ["train.fsdp: needs several processes to shard over (--nproc N, torchrun or accelerate launch); "
                "with one process set it to false"] if cfg.train.fsdp and nproc == 1 else []
    parts = nproc * cfg.train.gradient_accumulation_steps
    if cfg.train.batch_size < parts:
        problems.append(f"train.batch_size: {cfg.train.batch_size} rows cannot fill {nproc} processes × "
                        f"{cfg.train.gradient_accumulation_steps} accumulation steps; use a global batch of at "
                        f"least {parts}")
    return problems
