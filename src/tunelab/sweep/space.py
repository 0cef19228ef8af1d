"""Search spaces: each method's default ranges, with the user's `sweep.space` on top, sampled by optuna."""
from __future__ import annotations

from typing import Any

from ..errors import TunelabInputError


def method_space(cfg, method: str) -> dict[str, dict[str, Any]]:
    """Dotted key → range for one method: its defaults (`lora.lr`, `lora.r`), then the user's entries for
    this method and for `train.*` (null removes a default)."""
    from ..methods.base import get_method

    space = {f"{method}.{key}": spec for key, spec in get_method(method).search_space().items()}
    for key, spec in (cfg.sweep.space or {}).items():
        section = str(key).split(".")[0]
        if section in (method, "train"):
            if spec is None:
                space.pop(key, None)
            else:
                space[key] = spec
    return space


def space_problems(cfg, tuning: bool = True) -> list[str]:
    """Each `sweep.space` entry: a range or choices, written as optuna reads them, for an option that exists, of
    train or of a method that is selected (`tuning`: what a sweep or `compare --tune` will search) or registered
    (any config, which may narrow `methods` of a shared file without searching)."""
    from ..methods.base import registry

    sections = ("train", *(cfg.methods if tuning else registry()))
    problems = []
    for key, spec in (cfg.sweep.space or {}).items():
        if spec is None:
            continue
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            problems.append(f"sweep.space.{key}: expected {{low, high[, log]}} or {{choices: [...]}}, got {spec!r}")
        elif written := spec_problems(str(key), spec):
            problems += written
        elif str(key) == "train.seed":  # tuned, it replaced the seed of every run of compare --tune --seeds K
            problems.append("sweep.space.train.seed: a seed is not a hyperparameter to tune; compare --seeds K "
                            "trains the tuned values on K seeds")
        elif "low" in spec and None in (number(spec["low"]), number(spec["high"])):
            problems.append(f"sweep.space.{key}: low and high must be numbers, "
                            f"got {spec['low']!r} and {spec['high']!r}")
        elif "low" in spec and not number(spec["low"]) < number(spec["high"]):  # '1e-5' is text to PyYAML
            problems.append(f"sweep.space.{key}: low {spec['low']!r} must be below high {spec['high']!r}")
        elif str(key).split(".")[0] not in sections:
            problems.append(f"sweep.space.{key}: names neither train.* nor a {'selected' if tuning else 'known'} "
                            f"method ({', '.join(sections[1:])})")
        else:
            problems += option_problems(str(key)) or value_problems(str(key), spec)
    if tuning and (cfg.sweep.space or {}).get("train.lr") is not None and not train_lr_searched(cfg):
        problems.append("sweep.space.train.lr: no selected method trains at it: each trains at its own METHOD.lr, "
                        "searched by default (or its own default rate); search METHOD.lr instead")
    return problems


def train_lr_searched(cfg) -> bool:
    """Whether a drawn train.lr reaches any selected method: only one with no rate of its own, drawn or default
    (resolve_lr takes METHOD.lr, then the method's default, then train.lr)."""
    from ..methods.base import get_method

    return any(f"{m}.lr" not in method_space(cfg, m) and get_method(m).default_lr is None for m in cfg.methods)


def spec_problems(key: str, spec: dict[str, Any]) -> list[str]:
    """A range or choices written with a key optuna would not read (`step`, a misspelt `log`), both forms at once,
    or a `log` that is not true/false: each was silently ignored, or 'false' taken as true."""
    form = {"choices"} if "choices" in spec else {"low", "high", "log"}
    extra = sorted(set(spec) - form)
    if extra:
        return [f"sweep.space.{key}: unknown key(s) {', '.join(map(repr, extra))}; a range takes low, high and log, "
                "choices stand alone"]
    if "log" in spec and not isinstance(spec["log"], bool):
        return [f"sweep.space.{key}: log must be true or false, got {spec['log']!r}"]
    return []


def number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def option_class(section: str) -> type:
    from ..config import TrainConfig
    from ..methods.base import get_method

    return TrainConfig if section == "train" else get_method(section).Options


def option_problems(key: str) -> list[str]:
    """A dotted key that names no option of its section (`lora.rnk`), with a suggestion."""
    import dataclasses

    from ..errors import did_you_mean, one_of

    section, _, name = key.partition(".")
    known = [f.name for f in dataclasses.fields(option_class(section)) if f.name != "task_info"]
    if name in known:
        return []
    return [f"sweep.space.{key}: {section} has no option {name!r}{did_you_mean(name, known)}; allowed: {one_of(known)}"]


def is_whole(key: str) -> bool:
    """Whether the option takes whole numbers (lora.r), so a range draws integers; decimals (weight decay,
    dropout, rates) draw from the whole interval even where its bounds are written 0 and 1."""
    import typing

    section, _, name = key.partition(".")
    hint = typing.get_type_hints(option_class(section))[name]
    return int in (hint, *typing.get_args(hint))


def value_problems(key: str, spec: dict[str, Any]) -> list[str]:
    """What a trial would be refused for, found before any is drawn: no choices, a log range that reaches 0,
    a fractional bound of a whole-number option, and any choice or bound the option does not allow."""
    from ..config.schema import build

    path = f"sweep.space.{key}"
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            return [f"{path}: choices must be a non-empty list, got {spec['choices']!r}"]
        candidates = spec["choices"]
    else:
        low, high = number(spec["low"]), number(spec["high"])
        if spec.get("log") and low <= 0:
            return [f"{path}: a log range needs low > 0, got {spec['low']!r}"]
        if is_whole(key) and not (low.is_integer() and high.is_integer()):
            return [f"{path}: {key} takes whole numbers; low and high must be whole, got {spec['low']!r} and "
                    f"{spec['high']!r}"]
        candidates = edge_values(spec)
    section, _, name = key.partition(".")
    problems: list[str] = []
    for value in candidates:  # checked as the option itself is: "sweep.space.lora.r: 0 is not allowed; ..."
        build(option_class(section), {name: value}, f"sweep.space.{section}", problems)
    return list(dict.fromkeys(problems))


def readable(spec: Any) -> bool:
    """Whether edge_values can read a space entry: a mapping with choices, or with low and high (space_problems
    names what is wrong with any other)."""
    return isinstance(spec, dict) and (isinstance(spec.get("choices"), (list, tuple)) or {"low", "high"} <= set(spec))


def edge_values(spec: dict[str, Any]) -> list[Any]:
    """What a trial can be given at the extremes: every choice, or both ends of the range."""
    return list(spec["choices"]) if "choices" in spec else [spec["low"], spec["high"]]


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One value per key, drawn by the trial (so the sampler and the importances see each by name)."""
    values = {}
    for key, spec in space.items():
        log = bool(spec.get("log"))
        if "choices" in spec:
            values[key] = suggest_choice(trial, key, list(spec["choices"]))
        elif is_whole(key):
            values[key] = trial.suggest_int(key, int(float(spec["low"])), int(float(spec["high"])), log=log)
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=log)
    return values


def suggest_choice(trial, key: str, choices: list[Any]) -> Any:
    """optuna warns at every trial where a choice is a list (`target_modules` choices): it stores the choices as
    JSON, which lists survive (a trial's values are also kept whole in its user attributes), so the warning says
    nothing to act on and only floods the sweep's output."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Choices for a categorical distribution should be a tuple")
        return trial.suggest_categorical(key, choices)


def with_values(cfg, values: dict[str, Any]):
    """The config with `values` (dotted keys) applied and validated like any override."""
    from ..config import from_dict

    raw = cfg.to_dict()
    for key, value in values.items():
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    problems: list[str] = []
    result = from_dict(raw, problems)
    if problems:
        raise TunelabInputError(problems)
    return result
