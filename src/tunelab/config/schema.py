"""Turn plain dicts (from YAML and key=value overrides) into typed dataclasses, collecting every problem.

Constraints live next to the field they constrain, in the dataclass field's metadata:
`field(default=..., metadata={"gt": 0, "choices": [...], "help": "..."})` (also "ge", "lt", "le").
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any

from ..errors import did_you_mean, one_of

# Hugging Face Trainer / peft spellings of tunelab keys, too unlike ours for difflib ('rank' vs 'r'). Each lists
# candidates; the first one the section has is suggested, so no hint names a key the section lacks.
ALIASES = {
    "learning_rate": ("lr",), "num_train_epochs": ("epochs",), "num_epochs": ("epochs",),
    "per_device_train_batch_size": ("batch_size",), "train_batch_size": ("batch_size",),
    "per_device_eval_batch_size": ("eval_batch_size",), "logging_steps": ("log_every_steps",),
    "eval_steps": ("eval_every_steps",), "save_steps": ("checkpoint_every_steps",),
    "save_total_limit": ("keep_checkpoints",), "metric_for_best_model": ("metric_for_best",),
    "bf16": ("precision",), "max_seq_length": ("max_length",), "model_max_length": ("max_length",),
    "model_name_or_path": ("name_or_path",), "dataset_name": ("dataset",),
    "rank": ("r", "init_r"), "lora_r": ("r", "init_r"), "lora_alpha": ("alpha",), "lora_dropout": ("dropout",),
    "init_lora_weights": ("init",), "loraplus_lr_ratio": ("ratio",),
}


def build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending one message per problem to `problems`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping of options, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        name = str(key)
        if name not in known:
            allowed = f"allowed: {one_of(known)}" if known else f"{path} has no options"
            problems.append(f"{path}.{name}: unknown key{did_you_mean(name, known, ALIASES)}; {allowed}")
            continue
        fld = known[name]
        before = len(problems)
        converted = coerce(value, hints[name], f"{path}.{name}", problems)
        if len(problems) == before:
            check_rule(converted, fld.metadata, f"{path}.{name}", problems)
        if len(problems) == before:
            values[name] = converted
    return cls(**values)


class ScalarText(str):
    """A YAML scalar's text (a config file's number, boolean or date, or a `key=value` override's), with what
    YAML read from it. A string field takes the text as written (`model.revision=1.10` stays "1.10", where
    YAML reads the float 1.1), a number the text too when it parses (`train.seed=0123` is 123, where YAML 1.1
    reads octal 83), every other field what YAML read."""

    def __new__(cls, text: str, parsed: Any):
        self = super().__new__(cls, text)
        self.parsed = parsed
        return self

    def __reduce__(self):
        return ScalarText, (str(self), self.parsed)

    def __repr__(self) -> str:
        return repr(self.parsed)

    def for_hint(self, hint: Any) -> Any:
        if self.parsed is None:  # `null`, `~`: no value, for every field (as in a config file)
            return None
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
        if hint is str:
            return str(self)
        if hint in (int, float):
            # decimal text only: YAML 1.1 also reads `1:30` as 90 (base 60) and `0x10` as 16, which no one
            # writing a seed or a number of epochs meant; what is not a decimal number is refused as written
            for read in (hint, float):
                try:
                    return read(str(self).strip().replace("_", ""))
                except ValueError:
                    pass
            return str(self)
        return self.parsed


def plain(value: Any) -> Any:
    """`value` with every override text inside replaced by what YAML read from it (for untyped fields)."""
    if isinstance(value, ScalarText):
        return value.parsed
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def coerce(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, ScalarText):
        value = value.for_hint(hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or _spells_null(value, inner[0])):
            return None
        return coerce(value, inner[0], path, problems)
    if origin is list:
        return _coerce_list(value, args[0] if args else str, path, problems)
    if (hint is dict or origin is dict) and not isinstance(value, dict):
        problems.append(f"{path}: expected a mapping, got {plain(value)!r}")
        return None
    if hint is bool:
        return _coerce_bool(value, path, problems)
    if hint is int:
        return _coerce_int(value, path, problems)
    if hint is float:
        return _coerce_float(value, path, problems)
    if hint is str:
        if isinstance(value, str) and not value.strip():  # read as "not given", it named the default instead
            problems.append(f"{path}: an empty text is not allowed; leave the key out (or null) for its default")
            return None
        if isinstance(value, (str, int, float, os.PathLike)) and not isinstance(value, bool):
            return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
        problems.append(f"{path}: expected a string, got {value!r}")
        return None
    return plain(value)


def _spells_null(value: Any, hint: Any) -> bool:
    """`null` and `~` (YAML's own) mean no value; so does Python's `None` spelled out, except where the field
    takes text: there "none" is a value (a column, a split or a revision may well be called that)."""
    if not isinstance(value, str):
        return False
    return value.lower() in ("null", "~") or (value.lower() == "none" and hint is not str)


def _coerce_list(value: Any, item: Any, path: str, problems: list[str]) -> list:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        problems.append(f"{path}: expected a list (YAML list or comma-separated), got {value!r}")
        return []
    return [coerce(v, item, f"{path}[{i}]", problems) for i, v in enumerate(value)]


def _coerce_bool(value: Any, path: str, problems: list[str]) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    problems.append(f"{path}: expected true or false, got {value!r}")
    return None


def _coerce_int(value: Any, path: str, problems: list[str]) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    problems.append(f"{path}: expected an integer, got {value!r}")
    return None


def _coerce_float(value: Any, path: str, problems: list[str]) -> float | None:
    # PyYAML reads '1e-3' (no dot) as a string, so strings are parsed here too.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            problems.append(f"{path}: expected a number, got {value!r}")
            return None
    else:
        problems.append(f"{path}: expected a number, got {value!r}")
        return None
    if not math.isfinite(result):
        problems.append(f"{path}: expected a finite number, got {value!r}")
        return None
    return result


def check_rule(value: Any, meta: typing.Mapping, path: str, problems: list[str]) -> None:
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        problems.append(f"{path}: {value!r} is not allowed{did_you_mean(value, choices)}; "
                        f"allowed: {one_of(choices)}")
    if meta.get("min_items") is not None and isinstance(value, list) and len(value) < meta["min_items"]:
        problems.append(f"{path}: {value!r} is not allowed; name at least {meta['min_items']}, or leave it unset "
                        "for the default")
        return
    if meta.get("gt") is not None and not value > meta["gt"]:
        problems.append(f"{path}: {value!r} is not allowed; must be > {meta['gt']}")
    if meta.get("ge") is not None and not value >= meta["ge"]:
        problems.append(f"{path}: {value!r} is not allowed; must be >= {meta['ge']}")
    if meta.get("le") is not None and not value <= meta["le"]:
        problems.append(f"{path}: {value!r} is not allowed; must be <= {meta['le']}")
    if meta.get("lt") is not None and not value < meta["lt"]:
        problems.append(f"{path}: {value!r} is not allowed; must be < {meta['lt']}")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
