"""Everything a comparison needs before training, checked up front: model, tokenizer, data, method options.

`prepare_job` is what `tunelab validate` runs; `tunelab compare` runs it too before anything is written,
so every input problem surfaces at once, with exit code 2, before a single step is trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ExperimentConfig
from .data import Encoded, Splits, encode, load_splits, majority_baseline, pad_token_id
from .errors import TunelabInputError
from .modeling import load_tokenizer, max_positions, read_model_config, resolve_model_path, skeleton
from .registry import get_method


@dataclass
class Job:
    config: ExperimentConfig
    model_path: str
    tokenizer: object
    splits: Splits
    train: Encoded
    validation: Encoded
    test: Encoded | None

    @property
    def label_names(self) -> list[str]:
        return self.splits.label_names

    @property
    def num_labels(self) -> int:
        return len(self.splits.label_names)

    def summary(self) -> dict:
        return {"model_path": self.model_path, "labels": self.label_names,
                "train_rows": len(self.train), "validation_rows": len(self.validation),
                "validation_source": self.splits.validation_source,
                "test_rows": len(self.test) if self.test is not None else 0,
                "majority_baseline_validation": majority_baseline(self.validation),
                "majority_baseline_test": majority_baseline(self.test) if self.test is not None else None,
                "mean_train_tokens": float(self.train.lengths.mean()) if len(self.train) else 0.0}


def prepare_job(cfg: ExperimentConfig) -> Job:
    problems: list[str] = []
    model_path, tokenizer, model_config = _attempt(problems, _load_model_side, cfg)
    splits = _attempt(problems, load_splits, cfg.data, cfg.train.seed)
    if model_config is not None:
        problems += length_problems(cfg, model_config)
        problems += method_problems(cfg, model_path, len(splits.label_names) if splits else 2)
    if splits is not None and cfg.train.batch_size > len(splits.train):
        problems.append(f"train.batch_size: {cfg.train.batch_size} is larger than the "
                        f"{len(splits.train)} training rows; use at most {len(splits.train)}")
    if problems:
        raise TunelabInputError(problems)
    max_length = cfg.data.max_length
    return Job(cfg, model_path, tokenizer, splits,
               train=encode(splits.train, splits, tokenizer, max_length),
               validation=encode(splits.validation, splits, tokenizer, max_length),
               test=encode(splits.test, splits, tokenizer, max_length) if splits.test is not None else None)


def _attempt(problems: list[str], fn, *args):
    """Run one independent check, keeping its problems so the others still run."""
    try:
        return fn(*args)
    except TunelabInputError as exc:
        problems += exc.problems
        return (None, None, None) if fn is _load_model_side else None


def _load_model_side(cfg: ExperimentConfig):
    model_path = resolve_model_path(cfg.model.name_or_path)
    model_config = read_model_config(model_path)
    if not has_weights(model_path):
        raise TunelabInputError([f"model.name_or_path: {model_path!r} has a config but no weight files "
                                 "(*.safetensors, *.bin); refusing to train random weights"])
    tokenizer = load_tokenizer(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = pad_token_id(tokenizer)
    return model_path, tokenizer, model_config


def has_weights(model_path: str) -> bool:
    folder = Path(model_path)
    return any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.gguf", "*.index.json"))


def length_problems(cfg: ExperimentConfig, model_config) -> list[str]:
    limit = max_positions(model_config)
    if limit is None:
        return []
    problems = []
    if cfg.data.max_length > limit:
        problems.append(f"data.max_length: {cfg.data.max_length} is more than the model supports; "
                        f"allowed: 1..{limit}")
    for name in cfg.methods:
        extra = get_method(name).extra_positions(cfg.options(name))
        if extra and cfg.data.max_length <= limit < cfg.data.max_length + extra:
            problems.append(f"{name}: data.max_length {cfg.data.max_length} + {extra} virtual tokens exceeds "
                            f"the model's {limit} positions; lower data.max_length to {limit - extra}")
    return problems


def method_problems(cfg: ExperimentConfig, model_path: str, num_labels: int) -> list[str]:
    try:
        structure = skeleton(model_path, max(num_labels, 2))
    except TunelabInputError as exc:
        return exc.problems
    except Exception as exc:
        return [f"model.name_or_path: {model_path!r} cannot be built for sequence classification ({exc})"]
    problems = []
    for name in cfg.methods:
        problems += get_method(name).check(structure, cfg.options(name))
    return problems
