"""The task protocol and the registry of tasks.

A task is one module in `tunelab.tasks` that subclasses `Task` and decorates it with `@register`. It owns
everything that depends on what is being learned: which data columns it reads and how it checks them,
how rows become token ids and labels, which model class and PEFT task type it uses, which modules form
the trainable head, how it evaluates (metrics, each with a direction), its baseline and what the report
adds. The loop, the methods, the runner and the report only go through this protocol.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import Encoded
from ..errors import did_you_mean

_REGISTRY: dict[str, "Task"] = {}
HIGHER, LOWER = "higher", "lower"


@dataclass
class TaskOptions:
    """A task's own options (section named after the task); a task with options subclasses this."""


@dataclass
class TaskColumns:
    """The `data.*` keys a task reads (its column names), each with a default and a help text. A task that
    reads columns subclasses this; the fields join the `data` section for everyone, so a new task brings its
    keys along and edits no central config. Two tasks may share a key if they declare it alike."""


@dataclass
class TaskData:
    """The encoded splits of a job, what the model needs to know about them (`info`, e.g. label names)
    and what was left out and why (`dropped`: reason → rows)."""

    train: Encoded
    validation: Encoded
    test: Encoded | None
    info: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    validation_source: str = "file"
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)  # the rows behind each split, as read

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the encoded splits and their labels: what a resumed experiment must train on again (a data
        file edited, or another tokenizer, would mix two datasets into one run under the same config)."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(self.info, sort_keys=True, default=str).encode())
        for encoded in (self.train, self.validation, self.test):
            for array in ((encoded.ids, encoded.lengths, encoded.labels, encoded.type_ids) if encoded else ()):
                if array is not None:
                    digest.update(str((array.shape, array.dtype.str)).encode())
                    digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]  # (cached: asked at the resume check and again for run.json)


@dataclass
class EvalSetup:
    """How to run a model for evaluation; the task decides what to compute."""

    batch_size: int
    device: torch.device
    autocast: Callable = contextlib.nullcontext
    tokenizer: Any = None
    options: TaskOptions = field(default_factory=TaskOptions)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    examples: list[dict[str, str]] = field(default_factory=list)  # shown in the report (e.g. generations)
    # per-example values from which `statistic` recomputes each metric (bootstrap intervals, paired tests)
    per_example: dict[str, list] = field(default_factory=dict)


class Task:
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    Columns: ClassVar[type[TaskColumns]] = TaskColumns  # its `data.*` keys
    peft_task_type: ClassVar[str]              # peft.TaskType member name: SEQ_CLS, CAUSAL_LM, ...
    metrics: ClassVar[dict[str, str]]          # metric → HIGHER or LOWER is better
    metric_ranges: ClassVar[dict[str, tuple[float | None, float | None]]] = {}  # the values a metric can take
    # (None: unbounded); the report cuts intervals there (a t-interval over two seeds reaches past them)
    default_metric: ClassVar[str]              # train.metric_for_best when not set
    default_model: ClassVar[str]               # model.name_or_path when not set
    default_dataset: ClassVar[str]             # data.dataset when neither it nor data.train_file is set
    shows_examples: ClassVar[bool] = False     # evaluate() returns examples the report shows
    input_key: ClassVar[str] = "text"          # what one `tunelab predict` input is called (--text, JSON key)
    predict_keys: ClassVar[tuple[str, ...]] = ("text",)  # a predict input needs one of these, not empty
    text_keys: ClassVar[tuple[str, ...]] = ("text",)  # predict input keys that hold one text (not a list)
    output_keys: ClassVar[tuple[str, ...]] = ()  # what predict adds to an input (an input field so named is kept
    # under "input_<name>": a labelled test file keeps its labels next to the predictions)
    input_columns: ClassVar[tuple[str, ...]] = ()  # data keys whose column a predict input may carry under the
    # run's column name (data.text_column=review: an input's "review" is its "text")
    always_drops_invalid_rows: ClassVar[bool] = False  # invalid_rows are dropped and counted, as with
    # data.drop_invalid_rows, even where it is off (a chat without an answer: chat data has such rows)

    # --- data -------------------------------------------------------------------------------------
    def check_frames(self, frames: dict[str, pd.DataFrame], cfg) -> list[str]:
        """Problems with the loaded frames (columns, labels), before anything is tokenized."""
        return []

    def tokenizer_problems(self, tokenizer, cfg) -> list[str]:
        """Problems of the settings with this tokenizer (e.g. a data.max_length its special tokens fill)."""
        return []

    def invalid_rows(self, frame: pd.DataFrame, cfg) -> dict[str, pd.Series]:
        """Rows the task cannot use, as a boolean mask per reason (e.g. "an empty 'text'"): refused by
        check_frames, or dropped and counted with data.drop_invalid_rows (or always_drops_invalid_rows), before
        validation is carved and sizes capped. Called once the columns exist."""
        return {}

    def unfit_rows(self, frame: pd.DataFrame, tokenizer, cfg) -> dict[str, pd.Series]:
        """Rows the tokenizer leaves unusable (a prompt that fills data.max_length), as a boolean mask per
        reason: always dropped and counted, as invalid rows are, within each split after validation is carved,
        as its rows are drawn (a cap counts rows that train; `split` passes it to split_frames). Called after
        check_frames passed, on a chunk of rows at a time."""
        return {}

    def split(self, frames: dict[str, pd.DataFrame], cfg,
              unfit: Callable[[pd.DataFrame], dict[str, pd.Series]] | None = None
              ) -> tuple[dict[str, pd.DataFrame], str, dict[str, int]]:
        """Frames for train/validation(/test) after carving and capping, where validation came from, and the
        rows `unfit` (unfit_rows with the tokenizer, when there is one) dropped, per "split: reason"."""
        raise NotImplementedError

    def encode(self, frames: dict[str, pd.DataFrame], tokenizer, cfg) -> TaskData:
        """Tokenize once; raise TunelabInputError when nothing trainable remains."""
        raise NotImplementedError

    # --- model ------------------------------------------------------------------------------------
    def auto_class(self):
        """The transformers Auto class that builds the model for this task."""
        raise NotImplementedError

    def model_kwargs(self, info: dict[str, Any]) -> dict[str, Any]:
        """Extra `from_pretrained` arguments (e.g. the number of labels)."""
        return {}

    def head_is_stale(self, saved_config, info: dict[str, Any]) -> bool:
        """Whether a head the checkpoint brings (same shape as the task's) means something else in this run, so
        it must start fresh as a head of another shape does (a classifier trained on other labels, or on these
        in another order)."""
        return False

    def head_modules(self, model: nn.Module) -> tuple[str, ...]:
        """Modules of `model` (dotted names) that the task creates fresh and every method trains in full."""
        return ()

    def example_labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Labels shaped as the task's model takes them for a batch of `input_ids` (the estimate's fake step
        trains on them): one class per sequence unless the task says otherwise."""
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

    def logits_per_token(self, vocab: int) -> int:
        """How many logits the model's output holds per token (0: one row per sequence), for the memory formula."""
        return 0

    def prompt_init_text(self, info: dict[str, Any]) -> str:
        """Words whose embeddings start a soft prompt (prompt tuning's text init): true of any dataset."""
        return "Read the input and give the answer."

    def prepare_model(self, model: nn.Module, tokenizer) -> nn.Module:
        """Last touches after loading (e.g. a pad token id for decoder models). `tokenizer` is None where a
        model is planned from its config alone (`tunelab estimate`)."""
        return model

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, data: Encoded, setup: EvalSetup) -> Evaluation:
        raise NotImplementedError

    def baseline(self, data: TaskData, load_model: Callable[[], nn.Module], setup: EvalSetup) -> dict[str, Any]:
        """Reference metrics every method must beat: {"validation": {...}, "test": {...}} and what the
        report shows next to them (e.g. "examples")."""
        raise NotImplementedError

    def predict(self, model: nn.Module, inputs: list[dict[str, Any]], setup: EvalSetup, info: dict[str, Any],
                max_length: int) -> list[dict[str, Any]]:
        """One output record per input, for `tunelab predict` (inputs are dicts keyed like the task's data)."""
        raise NotImplementedError

    def statistic(self, metric: str, per_example: dict[str, list]) -> tuple[list[np.ndarray], Callable] | None:
        """Columns of `per_example` (rows = examples) and a function of them giving `metric`, so the
        statistics can resample examples; None where the metric cannot be recomputed. The function takes
        `axis` and reduces along it, as np.mean does: the bootstrap hands it many resamples at once, each a
        row of a 2-D column, examples along the last axis."""
        return None

    def report_lines(self, payload: dict[str, Any]) -> list[str]:
        """Task-specific report sections, from results.json alone."""
        return []

    def summary(self, data: TaskData) -> dict[str, Any]:
        """What `validate` prints and results.json keeps about the data."""
        return {}

    def generated_positions(self, options) -> int:
        """Positions generation adds after a prompt (answers of up to N tokens), for the max_length check."""
        return 0

    @property
    def data_keys(self) -> tuple[str, ...]:
        """The task-specific `data.*` keys it reads."""
        return tuple(f.name for f in dataclasses.fields(self.Columns))

    def metrics_not_computed(self, options) -> dict[str, str]:
        """Metrics these task options turn off, each with why: one of them cannot pick the best checkpoint."""
        return {}

    def higher_is_better(self, metric: str) -> bool:
        return self.metrics[metric] == HIGHER

    def packaged_job(self) -> Path:
        """The YAML of this task's packaged offline job, beside the task's module."""
        import sys

        return Path(sys.modules[type(self).__module__].__file__).with_name(f"{self.name}.yaml")


def missing_columns(frame: pd.DataFrame, columns: dict[str, str], source: str, hint: str = "") -> list[str]:
    """One problem per wanted column (config key → column name) that `frame` lacks, all of them, so a file with
    several wrong names is fixed in one go; each names the closest real column (a typo, a case slip)."""
    present = [str(c) for c in frame.columns]
    return [f"{key}: column {column!r} not in {source}{did_you_mean(column, present)}; columns are: "
            f"{', '.join(present)}{hint}{other_separator(present)}" for key, column in columns.items()
            if column not in frame.columns]


def other_separator(present: list[str]) -> str:
    """One column whose name holds ';' or '|': a file written with another separator (Excel in many locales
    writes ';'), read as CSV into one column per row."""
    mark = next((m for m in (";", "|") if len(present) == 1 and m in present[0]), None)
    return "" if mark is None else (f" (one column named with {mark!r} in it: the file separates fields by {mark!r}; "
                                    "a .csv needs commas and a .tsv tabs, so save it again as one of them)")


def register(cls: type[Task]) -> type[Task]:
    if cls.name in _REGISTRY:
        raise ValueError(f"task {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def registry() -> dict[str, Task]:
    from . import discover

    discover()
    return dict(_REGISTRY)


def get_task(name: str) -> Task:
    return registry()[name]
