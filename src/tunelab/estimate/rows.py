"""How many training rows an epoch has, for times per epoch: what the user says, else the rows a run would
train on, counted from local data (read, checked, carved and capped as `compare` does), else the config's cap."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import ExperimentConfig
from ..errors import TunelabInputError


def epoch_rows(cfg: ExperimentConfig, given: int | None = None) -> tuple[int | None, str]:
    """(rows, where the number comes from)."""
    if given:
        return given, "--train-examples"
    from ..data import with_packaged_defaults
    from ..data.packaged import PACKAGED_DATASETS
    from ..experiment.job import load_frames

    task, cap = cfg.task_spec, cfg.data.max_train_samples
    fallback = "data.max_train_samples" if cap else "unknown"
    data = with_packaged_defaults(cfg.data, task.default_dataset)
    local = data.train_file is not None or data.dataset in PACKAGED_DATASETS or Path(data.dataset).expanduser().is_dir()
    if not local:
        return cap, f"{fallback} (a hub dataset is not downloaded for an estimate; --train-examples gives its size)"
    try:
        frames, _, _ = load_frames(dataclasses.replace(cfg, data=data), task, local_tokenizer(cfg, task))
    except TunelabInputError as exc:
        return cap, f"{fallback} (the data could not be counted: {exc.problems[0]})"
    return len(frames["train"]), f"counted in {'data.train_file' if data.train_file else repr(data.dataset)}"


def local_tokenizer(cfg: ExperimentConfig, task):
    """The tokenizer a run would drop unusable rows with (a causal-lm prompt that fills max_length), where the
    model is local or cached with it; else None, and those rows are counted."""
    from ..models.loading import load_tokenizer, resolve_model_path
    from ..tasks.base import Task

    if type(task).unfit_rows is Task.unfit_rows:  # the task drops nothing by tokens
        return None
    try:
        return load_tokenizer(resolve_model_path(cfg.model_name, cfg.model.revision, config_only=True))
    except TunelabInputError:
        return None

