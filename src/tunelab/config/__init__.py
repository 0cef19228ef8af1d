"""The experiment config: YAML file + `key=value` overrides → typed, validated dataclasses.

Every problem is collected and reported at once; nothing is trained or written before the config is clean.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TunelabInputError, did_you_mean, one_of
from ..methods.base import MethodOptions, registry
from ..tasks.base import TaskOptions, registry as task_registry
from .schema import build, check_rule, coerce, to_dict
from .text import apply_override, read_yaml  # noqa: F401 - apply_override: for callers

DEFAULT_TASK = "classification"


@dataclass
class ModelConfig:
    name_or_path: str | None = field(default=None, metadata={
        "help": "local folder, packaged model or hub id; default: the task's packaged model"})
    revision: str | None = field(default=None, metadata={"help": "hub branch, tag or commit (hub ids only)"})


@dataclass
class DataConfig:
    """The `data` keys every task shares. Each task's column keys (`data.text_column`, ...) are added to it by
    `data_config_class`, from the task's own `Columns`."""

    dataset: str | None = field(default=None, metadata={
        "help": "packaged dataset, local dataset folder or hub dataset id, used when data.train_file is not set; "
                "default: the task's packaged dataset"})
    dataset_config: str | None = field(default=None, metadata={"help": "the hub dataset's configuration name"})
    dataset_revision: str | None = field(default=None, metadata={"help": "hub dataset branch, tag or commit"})
    train_split: str = field(default="train", metadata={"help": "data.dataset's split used for training"})
    validation_split: str | None = field(default=None, metadata={
        "help": "data.dataset's validation split; default: validation/valid/dev/val if present, else carved"})
    test_split: str | None = field(default=None, metadata={"help": "data.dataset's test split; default: test"})
    drop_invalid_rows: bool = field(default=False, metadata={
        "help": "classification: drop rows with an empty text or a missing label (counted in the report) instead "
                "of refusing them; causal-lm always drops and counts the rows it cannot use"})
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    max_length: int = field(default=128, metadata={"gt": 0})
    validation_fraction: float = field(default=0.1, metadata={"gt": 0, "le": 0.5})
    max_train_samples: int | None = field(default=None, metadata={"gt": 0})
    max_eval_samples: int | None = field(default=None, metadata={"gt": 0})


@dataclass
class TrainConfig:
    epochs: float = field(default=1.0, metadata={"gt": 0})
    max_steps: int | None = field(default=None, metadata={"gt": 0, "help": "stop after this many steps"})
    lr: float = field(default=5e-5, metadata={"gt": 0})
    batch_size: int = field(default=16, metadata={
        "gt": 0, "help": "rows per optimizer step in all: split over processes and gradient_accumulation_steps"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "ge": 1, "help": "micro-batches per optimizer step on each process (less memory, same global batch)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block's activations in the backward pass instead of keeping them (less memory, "
                "~1/3 more compute; `tunelab estimate` shows both peaks)"})
    fsdp: bool = field(default=False, metadata={
        "help": "shard weights, gradients and optimizer state over the processes (FSDP2, one group per transformer "
                "block), for a model whose training state does not fit one device; needs --nproc N or a launcher"})
    eval_batch_size: int = field(default=64, metadata={"gt": 0})
    weight_decay: float = field(default=0.01, metadata={"ge": 0})
    warmup_ratio: float = field(default=0.06, metadata={"ge": 0, "le": 1})
    max_grad_norm: float = field(default=1.0, metadata={"gt": 0})
    seed: int = field(default=42, metadata={"ge": 0, "le": 2**32 - 1, "help": "numpy's seed range"})
    eval_every_steps: int | None = field(default=None, metadata={
        "ge": 0, "help": "0: only at epoch end; default: train.evals_per_run evenly spaced evaluations"})
    evals_per_run: int = field(default=10, metadata={"gt": 0, "help": "used when eval_every_steps is not set"})
    log_every_steps: int = field(default=10, metadata={"gt": 0})
    # off by default: the best validation checkpoint is restored anyway, and a method that starts slowly (prompt
    # tuning sits at the majority class for a while) must not be stopped before it moves
    early_stopping_patience: int = field(default=0, metadata={"ge": 0, "help": "evaluations; 0 disables"})
    metric_for_best: str | None = field(default=None, metadata={"help": "one of the task's metrics; default: the task's"})
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16"]})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    checkpoint_every_steps: int = field(default=50, metadata={"ge": 0, "help": "0: only at epoch end"})
    keep_checkpoints: int = field(default=1, metadata={"ge": 1, "help": "step checkpoints kept (plus the best)"})
    keep_checkpoints_after_success: bool = field(default=False, metadata={
        "help": "keep a run's resumable checkpoints after it succeeded (its artifact is what stays by default)"})
    bucket_size: int = field(default=64, metadata={"ge": 1, "help": "batches per length bucket; 1 = no bucketing"})
    threads: int | None = field(default=None, metadata={"gt": 0})
    compile: str = field(default="none", metadata={
        "choices": ["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        "help": "torch.compile mode for training steps (none: eager); for launch-bound models on a GPU, where "
                "reduce-overhead replays CUDA graphs; measured no faster on 2-core CPUs"})


@dataclass
class SweepConfig:
    metric: str | None = field(default=None, metadata={"help": "what trials optimise; default: train.metric_for_best"})
    pruner: str = field(default="median", metadata={"choices": ["median", "halving", "none"]})
    space: dict | None = field(default=None, metadata={
        "help": "dotted key → {low, high, log} or {choices}; adds to or replaces the methods' default ranges "
                "(null removes one); train.* keys apply to every method"})


# train keys of how a run is carried out, not what it learns: a resume may change them (api.resume_config), and
# sweep workers that differ in them join one study (with device and compile, sweep.study.RUN_ONLY)
HOW_A_RUN_IS_CARRIED_OUT = ("threads", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                            "keep_checkpoints_after_success")
SECTION_NAMES = ("model", "data", "train", "sweep")  # the fixed ones; methods and tasks add their own


def sections() -> dict[str, type]:
    """The fixed sections' classes, `data` with every registered task's columns."""
    return dict(zip(SECTION_NAMES, (ModelConfig, data_config_class(), TrainConfig, SweepConfig)))


def data_config_class() -> type[DataConfig]:
    """DataConfig plus the column keys of every registered task."""
    return _with_columns(tuple((name, task.Columns) for name, task in task_registry().items()))


@functools.cache
def _with_columns(columns_by_task: tuple[tuple[str, type], ...]) -> type[DataConfig]:
    fields: dict[str, tuple[str, Any, dataclasses.Field]] = {}  # key → (the task declaring it first, type, field)
    shared = {fld.name for fld in dataclasses.fields(DataConfig)}
    for task, columns in columns_by_task:
        hints = typing.get_type_hints(columns)
        for fld in dataclasses.fields(columns):
            if fld.name in shared:
                raise TypeError(f"task {task!r}: data.{fld.name} is a key of every task; name its column key otherwise")
            if fld.default is dataclasses.MISSING:
                raise TypeError(f"task {task!r}: data.{fld.name} needs a default (a config may leave it out)")
            if fld.name in fields:
                first_task, hint, first = fields[fld.name]
                if (hint, first.default) != (hints[fld.name], fld.default):
                    raise TypeError(f"tasks {first_task!r} and {task!r} declare data.{fld.name} with "
                                    "different types or defaults")
                continue
            fields[fld.name] = task, hints[fld.name], field(default=fld.default, metadata=fld.metadata)
    made = dataclasses.make_dataclass("DataConfig", [(name, hint, fld) for name, (_, hint, fld) in fields.items()],
                                      bases=(DataConfig,), namespace={"__reduce__": _reduce_data_config})
    made.__module__ = __name__
    return made


def _reduce_data_config(data: DataConfig):
    # the class is made at run time, so pickle rebuilds it rather than look it up by name
    return _rebuild_data_config, (dataclasses.asdict(data),)


def _rebuild_data_config(values: dict) -> DataConfig:
    return data_config_class()(**values)


@dataclass
class ExperimentConfig:
    task: str = DEFAULT_TASK
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: data_config_class()())
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    methods: list[str] = field(default_factory=lambda: ["full", "llrd", "lora", "prompt-tuning"])
    method_options: dict[str, MethodOptions] = field(default_factory=dict)
    task_options: TaskOptions = field(default_factory=TaskOptions)

    def options(self, method: str) -> MethodOptions:
        """The method's options: from the config, else the method's defaults."""
        if method not in self.method_options:
            from ..methods.base import get_method

            return get_method(method).Options()
        return self.method_options[method]

    @property
    def task_spec(self):
        """The registered Task this experiment runs."""
        return task_registry()[self.task]

    @property
    def model_name(self) -> str:
        return self.model.name_or_path or self.task_spec.default_model

    @property
    def metric_for_best(self) -> str:
        return self.train.metric_for_best or self.task_spec.default_metric

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task}
        out.update({name: to_dict(getattr(self, name)) for name in SECTION_NAMES})
        out["methods"] = list(self.methods)
        out.update({name: to_dict(opts) for name, opts in self.method_options.items()})
        if dataclasses.fields(self.task_options):
            out[self.task] = to_dict(self.task_options)
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML (the task's packaged job when `path` is None), apply overrides, validate everything."""
    config, problems = config_and_problems(path, overrides)
    if problems:
        raise TunelabInputError(problems)
    return config


def config_and_problems(path: str | Path | None = None,
                        overrides: list[str] | None = None) -> tuple[ExperimentConfig, list[str]]:
    """load_config without raising: the config (a refused value left at its default) and every problem, so a
    caller can go on to check the model and data and report those problems with the config's."""
    problems: list[str] = []
    raw = read_yaml(Path(path), problems) if path else packaged_job(overrides or [], problems)
    return overridden(raw, overrides or [], problems), problems


def with_overrides(raw: dict, overrides: list[str]) -> ExperimentConfig:
    """`raw` (a config file's sections, or a saved config's to_dict()) with overrides applied, validated."""
    problems: list[str] = []
    config = overridden(raw, overrides, problems)
    if problems:
        raise TunelabInputError(problems)
    return config


def overridden(raw: dict, overrides: list[str], problems: list[str]) -> ExperimentConfig:
    for item in overrides:
        apply_override(raw, item, problems)
    return from_dict(raw, problems)


def packaged_job(overrides: list[str], problems: list[str]) -> dict:
    """The packaged offline job of the task named by a `task=` override (classification by default). A task
    may have none (then the config's own defaults apply); one that is there but broken is a problem. Where the
    overrides name other data (data.train_file, data.dataset), the job's caps on its rows do not apply to it."""
    scratch: dict = {}
    for item in overrides:  # read as apply_override reads it: the last one wins, quotes are YAML's
        if isinstance(item, str):
            apply_override(scratch, item, [])
    task = str(scratch.get("task") or DEFAULT_TASK)
    tasks = task_registry()
    if task not in tasks or not tasks[task].packaged_job().is_file():
        return {}
    job = read_yaml(tasks[task].packaged_job(), problems)
    given = scratch.get("data") if isinstance(scratch.get("data"), dict) else {}
    packaged = job.get("data") if isinstance(job.get("data"), dict) else {}
    if given.get("train_file") or given.get("dataset") not in (None, packaged.get("dataset")):
        # the user's own data: the packaged job's row caps are sized for its packaged set, not theirs
        for cap in ("max_train_samples", "max_eval_samples"):
            if cap not in given:
                packaged.pop(cap, None)
    return job


def from_dict(raw: dict, problems: list[str]) -> ExperimentConfig:
    methods_by_name, tasks = registry(), task_registry()
    raw = copy.deepcopy(raw)
    config_sections = sections()
    allowed_keys = ["task", *config_sections, "methods", *methods_by_name, *tasks]
    for key in raw:
        if key not in allowed_keys:
            problems.append(f"{key}: unknown key{did_you_mean(str(key), allowed_keys)}; allowed: {one_of(allowed_keys)}")
    task = parse_task(raw, tasks, problems)
    built = {name: build(cls, raw.get(name), name, problems) for name, cls in config_sections.items()}
    methods = parse_methods(raw.get("methods", ExperimentConfig().methods), methods_by_name, problems)
    options = {name: build(method.Options, raw.get(name), name, problems)
               for name, method in methods_by_name.items() if name in methods or name in raw}
    for name, opts in options.items():
        check_rule(opts.lr, {"gt": 0}, f"{name}.lr", problems)
    if built["train"].fsdp:
        problems += [f"train.fsdp: method {name!r} cannot train sharded: {methods_by_name[name].cannot_shard}; "
                     "leave it out of methods or set train.fsdp=false"
                     for name in methods if methods_by_name[name].cannot_shard]
    if built["train"].gradient_checkpointing:
        problems += [f"train.gradient_checkpointing: method {name!r} cannot train with it: "
                     f"{methods_by_name[name].cannot_checkpoint}; leave it out of methods or set "
                     "train.gradient_checkpointing=false"
                     for name in methods if methods_by_name[name].cannot_checkpoint]
    task_options = build(tasks[task].Options, raw.get(task), task, problems) if task in tasks else TaskOptions()
    if task in tasks:
        problems += task_problems(tasks, task, raw, built, task_options)
    config = ExperimentConfig(task=task, **built, methods=methods, method_options=options, task_options=task_options)
    from ..sweep.space import space_problems  # a bad range fails `validate`, not trial 1 of `compare --tune`

    problems += space_problems(config, tuning=False)
    return config


def parse_task(raw: dict, tasks: dict, problems: list[str]) -> str:
    task = coerce(raw.get("task", DEFAULT_TASK), str, "task", problems) or DEFAULT_TASK
    if task not in tasks:
        problems.append(f"task: unknown task {task!r}{did_you_mean(task, tasks)}; allowed: {one_of(tasks)}")
    return task


def task_problems(tasks: dict, task: str, raw: dict, built: dict, options: TaskOptions) -> list[str]:
    """Settings that belong to another task than the chosen one, and a metric the task does not have or will
    not compute with these options."""
    problems = [f"{other}: options for task {other!r}, but task is {task!r}"
                for other in tasks if other != task and other in raw]
    mine = set(tasks[task].data_keys)
    for other_name, other in tasks.items():
        for key in set(other.data_keys) - mine:
            if getattr(built["data"], key) is not None:
                problems.append(f"data.{key}: is for task {other_name!r}, not {task!r}; remove it or set task")
    chosen = {"train.metric_for_best": built["train"].metric_for_best, "sweep.metric": built["sweep"].metric}
    not_computed = tasks[task].metrics_not_computed(options)
    for key, metric in chosen.items():
        if metric is not None and metric not in tasks[task].metrics:
            problems.append(f"{key}: {metric!r} is not a metric of task {task!r}"
                            f"{did_you_mean(metric, tasks[task].metrics)}; allowed: {one_of(tasks[task].metrics)}")
        elif metric in not_computed:
            problems.append(f"{key}: {metric!r} {not_computed[metric]}")
    return problems


def parse_methods(value: Any, known: dict, problems: list[str]) -> list[str]:
    before = len(problems)
    names = coerce(value, list[str], "methods", problems) or []
    if len(problems) > before:  # already said what is wrong with the list
        return [n for n in dict.fromkeys(names) if n in known]
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
