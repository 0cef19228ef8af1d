"""Which runs an experiment consists of: every method with every seed. The data (splits included) are the
same for all of them; a run's seed changes only what training draws (head initialisation, batch order,
dropout), so runs of different methods with the same seed can be compared in pairs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ExperimentConfig


@dataclass(frozen=True)
class Run:
    method: str
    seed: int
    run_id: str  # its folder name under checkpoints/, tensorboard/, artifacts/

    def config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=self.seed))


def plan_runs(cfg: ExperimentConfig, seeds: int = 1) -> list[Run]:
    """One run per method and seed (train.seed, train.seed + 1, ...); a single seed keeps the plain names."""
    base = cfg.train.seed
    return [Run(method, base + i, method if seeds == 1 else f"{method}/seed-{base + i}")
            for method in cfg.methods for i in range(seeds)]


def seed_problems(first: int, seeds: int) -> list[str]:
    """--seeds N trains with train.seed, train.seed + 1, ...: the last must be a seed too (numpy's range), or
    the first runs train and write their results before the experiment fails on it."""
    last, largest = first + seeds - 1, 2**32 - 1
    if last <= largest:
        return []
    return [f"--seeds: {seeds} seeds from train.seed {first} run to {last}, past the largest seed "
            f"{largest}; lower train.seed to at most {largest - seeds + 1}"]
