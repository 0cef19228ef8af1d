"""The experiment config: YAML file + `key=value` overrides → typed, validated dataclasses.

Every problem is collected and reported at once; nothing is trained or written before the config is clean.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TunelabInputError, did_you_mean, one_of
from .registry import MethodOptions, registry
from .schema import build, check_rule, coerce, to_dict

DEFAULT_CONFIG = Path(__file__).parent / "default.yaml"


@dataclass
class ModelConfig:
    name_or_path: str = "all-MiniLM-L6-v2"


@dataclass
class DataConfig:
    dataset: str = field(default="amazon-fine-food", metadata={
        "help": "packaged dataset, used when data.train_file is not set"})
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str | None = field(default=None, metadata={"help": "default: 'text' (or the packaged set's)"})
    label_column: str | None = field(default=None, metadata={"help": "default: 'label' (or the packaged set's)"})
    max_length: int = field(default=128, metadata={"gt": 0})
    validation_fraction: float = field(default=0.1, metadata={"gt": 0, "le": 0.5})
    max_train_samples: int | None = field(default=None, metadata={"gt": 0})
    max_eval_samples: int | None = field(default=None, metadata={"gt": 0})


@dataclass
class TrainConfig:
    epochs: float = field(default=1.0, metadata={"gt": 0})
    max_steps: int | None = field(default=None, metadata={"gt": 0, "help": "stop after this many steps"})
    lr: float = field(default=5e-5, metadata={"gt": 0})
    batch_size: int = field(default=16, metadata={"gt": 0})
    eval_batch_size: int = field(default=64, metadata={"gt": 0})
    weight_decay: float = field(default=0.01, metadata={"ge": 0})
    warmup_ratio: float = field(default=0.06, metadata={"ge": 0, "le": 1})
    max_grad_norm: float = field(default=1.0, metadata={"gt": 0})
    seed: int = 42
    eval_every_steps: int = field(default=50, metadata={"ge": 0, "help": "0: only at epoch end"})
    log_every_steps: int = field(default=10, metadata={"gt": 0})
    early_stopping_patience: int = field(default=3, metadata={"ge": 0, "help": "evaluations; 0 disables"})
    metric_for_best: str = field(default="accuracy", metadata={"choices": ["accuracy", "f1_macro", "loss"]})
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16"]})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    checkpoint_every_steps: int = field(default=50, metadata={"ge": 0, "help": "0: only at epoch end"})
    keep_checkpoints: int = field(default=1, metadata={"ge": 1, "help": "step checkpoints kept (plus the best)"})
    bucket_size: int = field(default=64, metadata={"ge": 1, "help": "batches per length bucket; 1 = no bucketing"})
    threads: int | None = field(default=None, metadata={"gt": 0})


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: list[str] = field(default_factory=lambda: ["full", "llrd", "lora", "prompt-tuning"])
    method_options: dict[str, MethodOptions] = field(default_factory=dict)

    def options(self, method: str) -> MethodOptions:
        """The method's options: from the config, else the method's defaults."""
        if method not in self.method_options:
            from .registry import get_method

            return get_method(method).Options()
        return self.method_options[method]

    def to_dict(self) -> dict[str, Any]:
        out = {name: to_dict(getattr(self, name)) for name in SECTIONS}
        out["methods"] = list(self.methods)
        out.update({name: to_dict(opts) for name, opts in self.method_options.items()})
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML (the packaged default when `path` is None), apply overrides, validate everything."""
    problems: list[str] = []
    raw = read_yaml(Path(path) if path else DEFAULT_CONFIG, problems)
    for item in overrides or []:
        apply_override(raw, item, problems)
    config = from_dict(raw, problems)
    if problems:
        raise TunelabInputError(problems)
    return config


def read_yaml(path: Path, problems: list[str]) -> dict:
    if not path.is_file():
        problems.append(f"config: file {str(path)!r} does not exist")
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"config: {str(path)!r} is not valid YAML{where}: {getattr(exc, 'problem', exc)}")
        return {}
    except UnicodeDecodeError:
        problems.append(f"config: {str(path)!r} is not UTF-8 text")
        return {}
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"config: {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
        return {}
    return raw


def apply_override(raw: dict, item: str, problems: list[str]) -> None:
    """Apply one `dotted.key=value`; the value is read as YAML (so 3, 1.5, true, [a, b] work)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        problems.append(f"override {item!r}: expected key=value, e.g. train.lr=3e-5")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"override {item!r}: {part!r} is a value, not a section")
            return
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict, problems: list[str]) -> ExperimentConfig:
    methods_by_name = registry()
    raw = copy.deepcopy(raw)
    allowed_keys = [*SECTIONS, "methods", *methods_by_name]
    for key in raw:
        if key not in allowed_keys:
            problems.append(f"{key}: unknown key{did_you_mean(str(key), allowed_keys)}; allowed: {one_of(allowed_keys)}")
    sections = {name: build(cls, raw.get(name), name, problems) for name, cls in SECTIONS.items()}
    methods = parse_methods(raw.get("methods", ExperimentConfig().methods), methods_by_name, problems)
    options = {name: build(method.Options, raw.get(name), name, problems)
               for name, method in methods_by_name.items() if name in methods or name in raw}
    for name, opts in options.items():
        check_rule(opts.lr, {"gt": 0}, f"{name}.lr", problems)
    return ExperimentConfig(**sections, methods=methods, method_options=options)


def parse_methods(value: Any, known: dict, problems: list[str]) -> list[str]:
    names = coerce(value, list[str], "methods", problems) or []
    if not names:
        problems.append(f"methods: at least one method is needed; allowed: {one_of(known)}")
    seen: set[str] = set()
    for name in names:
        if name not in known:
            problems.append(f"methods: unknown method {name!r}{did_you_mean(name, known)}; allowed: {one_of(known)}")
        elif name in seen:
            problems.append(f"methods: {name!r} is listed twice")
        seen.add(name)
    return [n for n in dict.fromkeys(names) if n in known]
