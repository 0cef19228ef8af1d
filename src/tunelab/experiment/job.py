"""Everything a comparison needs before training, checked up front: model, tokenizer, data, method options.

`prepare_job` is what `tunelab validate` runs; `tunelab compare` runs it too before anything is written,
so every input problem surfaces at once, with exit code 2, before a single step is trained.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from ..config import ExperimentConfig
from ..data import read_frames, where, with_packaged_defaults
from ..data.splits import first_reasons
from ..errors import TunelabInputError
from ..methods.base import PrepareContext, get_method
from ..models.loading import (load_pretrained, load_tokenizer, missing_weights_message, read_model_config,
                              resolve_model_path, skeleton)
from ..models.structure import max_positions, positions_are_a_table
from ..tasks.base import EvalSetup, Task, TaskData
from ..train.setup import device_problems, thread_problems


@dataclass
class Job:
    config: ExperimentConfig
    task: Task
    model_path: str
    tokenizer: Any
    data: TaskData

    @property
    def train(self):
        return self.data.train

    @property
    def validation(self):
        return self.data.validation

    @property
    def test(self):
        return self.data.test

    @property
    def label_names(self) -> list[str] | None:
        return self.data.info.get("labels")

    def context(self, model: nn.Module, total_steps: int = 0) -> PrepareContext:
        return PrepareContext(self.model_path, self.model_path, self.task, self.task.head_modules(model),
                              total_steps, self.data.info)

    def load_base_model(self, on_meta: bool = False) -> nn.Module:
        """A fresh copy of the pretrained model in the task's class; `on_meta`: its structure alone, no weights
        read (a sharded run's other processes, which receive the main process's weights)."""
        if on_meta:
            return self.task.prepare_model(skeleton(self.model_path, self.task, self.data.info)[0], self.tokenizer)
        return self.task.prepare_model(load_pretrained(self.model_path, self.task, self.data.info), self.tokenizer)

    def eval_setup(self, device, autocast) -> EvalSetup:
        return EvalSetup(self.config.train.eval_batch_size, device, autocast, self.tokenizer,
                         self.config.task_options)

    def baseline(self) -> dict[str, Any]:
        """The task's reference row (majority class, untrained model), evaluated as the methods will be."""
        from ..train.setup import make_accelerator

        accelerator = make_accelerator(self.config.train)
        return self.task.baseline(self.data, self.load_base_model,
                                  self.eval_setup(accelerator.device, accelerator.autocast))

    def summary(self) -> dict[str, Any]:
        train = self.data.train
        return {"task": self.task.name, "model_path": self.model_path,
                "metrics": dict(self.task.metrics), "metric_for_best": self.config.metric_for_best,
                "train_rows": len(train), "validation_rows": len(self.validation),
                "validation_source": self.data.validation_source,
                "test_rows": len(self.test) if self.test is not None else 0,
                "mean_train_tokens": float(train.lengths.mean()) if len(train) else 0.0,
                # rows cut to data.max_length (or exactly that long): a share worth knowing before a long run
                "train_rows_at_max_length": int((train.lengths >= self.config.data.max_length).sum()),
                "dropped_rows": self.data.dropped,
                **self.task.summary(self.data)}


def prepare_job(cfg: ExperimentConfig) -> Job:
    problems: list[str] = []
    task = cfg.task_spec
    # the job records what it actually uses: the packaged model and dataset, and that dataset's columns
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=cfg.model_name),
                              data=with_packaged_defaults(cfg.data, task.default_dataset))
    model_path, tokenizer, model_config = _attempt(problems, _load_model_side, cfg) or (None, None, None)
    frames, source, dropped = _attempt(problems, load_frames, cfg, task, tokenizer) or (None, None, {})
    if tokenizer is not None:
        problems += task.tokenizer_problems(tokenizer, cfg)
    if model_config is not None:
        problems += length_problems(cfg, model_config)
        problems += method_problems(cfg, model_path, task, model_config)
    problems += device_problems(cfg.train.device, "train.device") + thread_problems(cfg.train.threads)
    if frames is not None and len(frames["validation"]) == 0:
        problems.append(
            f"data.validation_fraction: {cfg.data.validation_fraction} of train carved no validation rows (a class "
            "with one row stays in train); give data.validation_file, or more rows" if source == "carved from train"
            else f"{where(cfg.data, 'validation')}: has no rows")
    if frames is not None:
        problems += batch_problems(cfg.train.batch_size, len(frames["train"]))
        problems += swept_batch_problems(cfg, len(frames["train"]))
    if problems:
        raise TunelabInputError(problems)
    data = task.encode(frames, tokenizer, cfg)
    empty = {split: int((encoded.lengths == 0).sum()) for split, encoded in
             (("train", data.train), ("validation", data.validation), ("test", data.test)) if encoded is not None}
    if any(empty.values()):  # e.g. a tokenizer that knows none of the words and adds no special tokens
        raise TunelabInputError([f"{where(cfg.data, split)}: {count} rows become no tokens at all with the "
                                 f"tokenizer of {model_path!r}; check that it is the model's own tokenizer"
                                 for split, count in empty.items() if count])
    problems = vocabulary_problems(data, model_config, model_path)
    if problems:
        raise TunelabInputError(problems)
    data.validation_source, data.frames = source, frames
    data.dropped = {**dropped, **data.dropped}
    return Job(cfg, task, model_path, tokenizer, data)


def vocabulary_problems(data, model_config, model_path: str) -> list[str]:
    """Token ids the model's embedding table has no row for (a tokenizer of another model, or one with tokens
    added since the model was saved): every method failed on its first batch with an IndexError."""
    size = getattr(model_config, "vocab_size", None) or getattr(getattr(model_config, "text_config", None),
                                                               "vocab_size", None)
    splits = [split for split in (data.train, data.validation, data.test) if split is not None and len(split)]
    highest = max((int(split.ids.max()) for split in splits), default=-1)
    if not size or highest < size:
        return []
    return [f"model.name_or_path: the tokenizer of {model_path!r} gives token ids up to {highest}, but the model's "
            f"embeddings have {size} rows (config vocab_size); the tokenizer is another model's, or has tokens "
            "added since the model was saved: save both from the same model"]


def batch_problems(batch_size: int, rows: int) -> list[str]:
    if batch_size <= rows:
        return []
    return [f"train.batch_size: {batch_size} is larger than the {rows} training rows; use at most {rows}"]


def swept_batch_problems(cfg: ExperimentConfig, rows: int) -> list[str]:
    """Each batch size `sweep.space` lets a trial take (every choice, both ends of a range) against the rows,
    as the configured one: a trial drawing more trained on every row while its record named the drawn size."""
    from ..sweep.space import edge_values, readable

    spec = (cfg.sweep.space or {}).get("train.batch_size")
    if not readable(spec):
        return []
    return [f"sweep.space.train.batch_size: {value!r}: {problem}"
            for value in edge_values(spec) for problem in batch_problems(value, rows)]


def load_frames(cfg: ExperimentConfig, task: Task,
                tokenizer=None) -> tuple[dict[str, pd.DataFrame], str, dict[str, int]]:
    """Read the data, drop invalid rows if asked, let the task check the rest, then carve and cap the splits,
    dropping the rows the tokenizer leaves unusable (when there is one) as each split's rows are drawn."""
    frames = read_frames(cfg.data, task.default_dataset)
    dropped: dict[str, int] = {}
    dropping = "data.drop_invalid_rows" if cfg.data.drop_invalid_rows else f"the {task.name} task"
    if cfg.data.drop_invalid_rows or task.always_drops_invalid_rows:
        frames, dropped = drop_rows(frames, lambda frame: task.invalid_rows(frame, cfg), dropping, cfg)
    problems = task.check_frames(frames, cfg)
    if problems:
        raise TunelabInputError(problems)
    by_tokens = tokenizer is not None and type(task).unfit_rows is not Task.unfit_rows
    unfit = (lambda frame: task.unfit_rows(frame, tokenizer, cfg)) if by_tokens else None
    frames, source, unfit_dropped = task.split(frames, cfg, unfit)
    problems = emptied_split_problems(frames, unfit_dropped, f"the {task.name} task", cfg)
    if problems:
        raise TunelabInputError(problems)
    return frames, source, {**dropped, **unfit_dropped}


def drop_rows(frames: dict[str, pd.DataFrame], masks_of, by: str, cfg: ExperimentConfig):
    """Frames without the rows `masks_of(frame)` marks (a mask per reason), and how many went per split and
    reason; every split left without rows is a problem, all named at once."""
    kept, dropped = {}, {}
    for split, frame in frames.items():
        try:
            masks = masks_of(frame)
        except KeyError:  # a column is missing: check_frames says which
            masks = {}
        reasons = first_reasons(masks, len(frame))
        counts = Counter(reasons)
        dropped.update({f"{split}: {reason}": counts[reason] for reason in masks if counts[reason]})
        # a boolean array: a list of none (a split without rows) would select no columns
        kept[split] = frame[np.array([reason is None for reason in reasons], dtype=bool)].reset_index(drop=True)
    problems = emptied_split_problems(kept, dropped, by, cfg)
    if problems:
        raise TunelabInputError(problems)
    return kept, dropped


def emptied_split_problems(frames: dict[str, pd.DataFrame], dropped: dict[str, int], by: str,
                           cfg: ExperimentConfig) -> list[str]:
    """Each split that dropping left without rows, with how many went and why."""
    problems = []
    for split, frame in frames.items():
        gone = {key.split(": ", 1)[1]: count for key, count in dropped.items() if key.startswith(f"{split}: ")}
        if gone and not len(frame):
            problems.append(f"{where(cfg.data, split)}: no rows left after {by} dropped all {sum(gone.values())} "
                            f"({', '.join(gone)})")
    return problems


def _attempt(problems: list[str], fn, *args):
    """Run one independent check, keeping its problems so the others still run."""
    try:
        return fn(*args)
    except TunelabInputError as exc:
        problems += exc.problems
        return None


def _load_model_side(cfg: ExperimentConfig):
    model_path = resolve_model_path(cfg.model_name, cfg.model.revision)
    model_config = read_model_config(model_path)
    if not has_weights(model_path):
        raise TunelabInputError([f"model.name_or_path: {model_path!r} has a config but no weight files "
                                 "(*.safetensors, *.bin); refusing to train random weights"])
    tokenizer = load_tokenizer(model_path)
    return model_path, tokenizer, model_config


def has_weights(model_path: str) -> bool:
    folder = Path(model_path)
    return any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.gguf", "*.index.json"))


USEFUL_MAX_LENGTH = 16  # below this a chat template alone fills the prompt: not worth suggesting


def max_length_problems(cfg: ExperimentConfig, model_config) -> list[str]:
    limit = max_positions(model_config)
    if limit is None or cfg.data.max_length <= limit:
        return []
    return [f"data.max_length: {cfg.data.max_length} is more than the model supports; allowed: 1..{limit}"]


def length_problems(cfg: ExperimentConfig, model_config) -> list[str]:
    limit = max_positions(model_config)
    if limit is None:
        return []
    problems = max_length_problems(cfg, model_config)
    # answers past a learned position table fail; rotary models only run past their nominal length
    new = cfg.task_spec.generated_positions(cfg.task_options) if positions_are_a_table(model_config) else 0
    for name in cfg.methods:
        extra = get_method(name).extra_positions(cfg.options(name))
        if extra and cfg.data.max_length <= limit < cfg.data.max_length + extra:
            # each remedy where it leaves something: a text of a few tokens, or no virtual token, is none
            remedies = [f"lower data.max_length to {limit - extra}"] * (limit - extra >= USEFUL_MAX_LENGTH) + \
                [f"use at most {limit - cfg.data.max_length} virtual tokens"] * (limit > cfg.data.max_length)
            remedy = ", or ".join(remedies) or f"use a model with more than {limit} positions"
            problems.append(f"{name}: data.max_length {cfg.data.max_length} + {extra} virtual tokens exceeds "
                            f"the model's {limit} positions; {remedy}")
        # a prompt keeps at least one token free of max_length (for its answer); generation then adds up to `new`
        elif new and cfg.data.max_length + extra <= limit < cfg.data.max_length - 1 + extra + new:
            shorter = limit - new + 1 - extra
            # rows whose prompt does not fit are dropped: a length of a few tokens would drop nearly all of them
            or_shorter = f" or data.max_length to {shorter} (rows whose prompt no longer fits are dropped)" \
                if shorter >= USEFUL_MAX_LENGTH else ""
            problems.append(f"{cfg.task}.max_new_tokens: a prompt of up to {cfg.data.max_length - 1} tokens"
                            f"{f' + {extra} virtual tokens ({name})' if extra else ''} + {new} generated tokens "
                            f"exceeds the model's {limit} positions; lower {cfg.task}.max_new_tokens to "
                            f"{limit - cfg.data.max_length + 1 - extra}{or_shorter}")
    return sorted(set(problems), key=problems.index)


def method_problems(cfg: ExperimentConfig, model_path: str, task: Task, model_config=None) -> list[str]:
    """Each selected method's checks against the model, then the same checks (and the position limits) for
    each value `sweep.space` lets a trial take (every choice, both ends of a range): a sweep whose trials
    would all fail (`freeze.k: [5]` on a 2-block model) is refused here, not after its output is written."""
    try:
        check = method_checker(model_path, task)
    except TunelabInputError as exc:
        return exc.problems
    problems = [p for name in cfg.methods for p in check(cfg, name)]
    for key, value, draws in sweep_edges(cfg):
        found = [check(draw, key.split(".")[0]) + (length_problems(draw, model_config) if model_config else [])
                 for draw in draws]
        if all(found):  # refused whatever the method's other ranges draw beside it
            problems += [f"sweep.space.{key}: {value!r}: {p}" for p in found[0] if p not in problems]
    return problems


def method_checker(model_path: str, task: Task):
    """`check(cfg, method)`: that method's problems with the model under `cfg`'s options (the model is built
    once, on the meta device)."""
    structure, missing = skeleton(model_path, task, {})
    if missing:
        raise TunelabInputError([missing_weights_message(model_path, missing)])
    ctx = PrepareContext(model_path, model_path, task, task.head_modules(structure))
    return lambda cfg, name: get_method(name).check(structure, cfg.options(name), ctx)


def sweep_edges(cfg: ExperimentConfig):
    """(key, value, configs) for each value `sweep.space` gives a selected method's option at its edges: the
    config with that value beside each combination of the edges of the method's other swept options (a
    trial draws them together: `adalora.init_r` 6 is fine where `target_r` may be 4). Values the option itself
    refuses are reported by the config check already."""
    import itertools

    from ..sweep.space import edge_values, readable, with_values

    def valid(values: dict):
        try:
            return with_values(cfg, values)
        except TunelabInputError:
            return None

    space = {str(key): spec for key, spec in (cfg.sweep.space or {}).items()
             if readable(spec) and str(key).split(".")[0] in cfg.methods}
    for key, spec in space.items():
        others = [k for k in space if k != key and k.split(".")[0] == key.split(".")[0]]
        besides = [dict(zip(others, ends)) for ends in itertools.product(*(edge_values(space[k]) for k in others))]
        for value in edge_values(spec):
            draws = [draw for beside in besides if (draw := valid({key: value, **beside})) is not None]
            if draws:
                yield key, value, draws
