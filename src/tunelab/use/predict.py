"""`tunelab predict`: batch inference with a saved artifact, one JSON line per input."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..data.delimited import not_utf8
from ..data.io import json_shape_problem
from ..errors import TunelabInputError
from ..experiment.results import json_safe
from ..models.hub import offline_option
from .artifact import Artifact, find_artifact, load_artifact


def read_inputs(texts: Sequence[str], input_file: str | None, task,
                aliases: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], list[set[str]]]:
    """--text values and the rows of --input: JSON Lines (objects, or plain strings), a JSON array, CSV/TSV or
    Parquet with a column named like the task's input (or like the run's own column: `aliases`), or plain text
    (one input per line). An input field named like one the prediction adds (`label`, `output`, ...) is kept as
    `input_<name>`. Returns the inputs, a run column also under the task's key, and the keys so added."""
    key, aliases = task.input_key, aliases or {}
    keys = (*task.predict_keys, *(name for name, canonical in aliases.items() if canonical in task.predict_keys))
    inputs = [{key: text} for text in texts]
    if input_file:
        from_file = list(_file_inputs(Path(input_file).expanduser(), key, keys))
        if not from_file:
            raise TunelabInputError([f"--input: {input_file!r} holds no inputs (empty, or a header alone)"])
        inputs += from_file
    if not inputs:
        raise TunelabInputError([f"predict: no inputs; give --text or --input FILE (one {key} per line)"])
    inputs = [{(f"input_{k}" if k in task.output_keys else k): v for k, v in item.items()} for item in inputs]
    inputs, added = zip(*(as_task_keys(item, aliases) for item in inputs))
    empty = [n for n, item in enumerate(inputs, 1) if not any(present(item.get(k)) for k in task.predict_keys)]
    if empty:
        raise TunelabInputError([f"predict: inputs {numbers(empty)} have an empty or missing "
                                 f"{' or '.join(map(repr, keys))}"])
    # a list of words would be scored as its printout, brackets and quotes included
    nested = [n for n, item in enumerate(inputs, 1) if any(isinstance(item.get(k), (list, dict))
                                                           for k in task.text_keys)]
    if nested:
        raise TunelabInputError([f"predict: inputs {numbers(nested)} have a list or mapping in "
                                 f"{' or '.join(map(repr, task.text_keys))}; give one text each"])
    return list(inputs), list(added)


def numbers(found: list[int]) -> str:
    return f"{found[:5]}{' ...' if len(found) > 5 else ''}"


def column_aliases(task, columns: dict[str, Any]) -> dict[str, str]:
    """The run's own column name → the key the task's predict reads, where they differ (data.text_column=review:
    "review" → "text"), so a file shaped like the training data predicts as it is."""
    return {columns[key]: key.removesuffix("_column") for key in task.input_columns
            if columns.get(key) and columns[key] != key.removesuffix("_column")}


def as_task_keys(item: dict[str, Any], aliases: dict[str, str]) -> tuple[dict[str, Any], set[str]]:
    """`item` with each run column also under the task's key (unless the item has that key), and the keys added."""
    added = {canonical for name, canonical in aliases.items() if name in item and canonical not in item}
    return {**item, **{canonical: item[name] for name, canonical in aliases.items() if canonical in added}}, added


def present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _file_inputs(path: Path, key: str, keys: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    if path.is_dir():
        raise TunelabInputError([f"--input: {str(path)!r} is a folder; give a .jsonl, .json, .csv, .tsv, .parquet "
                                 "or text file"])
    if not path.is_file():
        raise TunelabInputError([f"--input: {str(path)!r} does not exist"])
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".parquet"):
        yield from _table_inputs(path, key, keys)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first input
    except UnicodeDecodeError:
        raise TunelabInputError([f"--input: {str(path)!r} {not_utf8(path)}"]) from None
    shape = json_shape_problem(text) if suffix == ".json" else None
    if shape:
        raise TunelabInputError([f"--input: {str(path)!r} {shape}"])
    if suffix == ".json" and text.lstrip().startswith("["):
        yield from (_json_input(value, key, keys, path, number) for number, value in enumerate(_json(text, path, 1), 1))
        return
    # split on newlines only: str.splitlines would also cut at form feeds and U+2028 inside a line
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():  # blank lines that end the file end it
        lines.pop()
    for number, line in enumerate(lines, 1):
        if suffix in (".jsonl", ".json"):
            if line.strip():  # a blank line between JSON lines is no item
                yield _json_input(_json(line, path, number), key, keys, path, number)
        else:  # a blank line of plain text is an empty input, refused: skipped, outputs would not line up
            yield {key: line}


def _json(text: str, path: Path, number: int) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise TunelabInputError([f"--input: line {number} of {str(path)!r} is not JSON ({exc})"]) from None


def _json_input(value: Any, key: str, keys: tuple[str, ...], path: Path, number: int) -> dict[str, Any]:
    if isinstance(value, dict) and not any(k in value for k in keys):
        raise TunelabInputError([f"--input: item {number} of {str(path)!r} has no {' or '.join(map(repr, keys))} key"])
    # a list where one input belongs (a JSON array saved as .jsonl, a list of words) stays a list, so that
    # read_inputs refuses it as such: its printout, brackets and quotes included, is no input
    return value if isinstance(value, dict) else {key: value if value is None or isinstance(value, list)
                                                  else str(value)}


def _table_inputs(path: Path, key: str, keys: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    import pandas as pd

    from ..data.delimited import read_csv_as_text

    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else \
            read_csv_as_text(path, skip_blank_lines=False)  # a blank line is an empty input, refused
    except UnicodeDecodeError:
        raise TunelabInputError([f"--input: {str(path)!r} {not_utf8(path)}"]) from None
    except Exception as exc:  # the readers raise many kinds; the user needs the cause, not a traceback
        raise TunelabInputError([f"--input: could not read {str(path)!r} ({type(exc).__name__}: {exc})"]) from None
    if not any(k in frame.columns for k in keys):
        raise TunelabInputError([f"--input: {str(path)!r} has no column {' or '.join(map(repr, keys))}; columns are: "
                                 f"{', '.join(map(str, frame.columns))}"])
    rows = frame.notna().any(axis=1).to_numpy().nonzero()[0]
    frame = frame.iloc[:rows[-1] + 1] if len(rows) else frame.iloc[:0]  # blank lines that end the file end it
    # missing cells as null (JSON has no NaN), so the output lines stay valid JSON
    yield from frame.astype(object).where(frame.notna(), None).to_dict("records")


@offline_option
def predict(path: str | Path, texts: Sequence[str] = (), input_file: str | None = None, method: str | None = None,
            batch_size: int = 32, device: str = "auto", precision: str | None = None,
            overrides: Sequence[str] = ()) -> tuple[Artifact, list[dict[str, Any]]]:
    """Outputs for every input, from the artifact in `path` (an experiment folder: the best method), in
    `precision` ("fp32" or "bf16"; default: the one the run trained in), with the task's options as the run had
    them unless `overrides` change them (`causal-lm.max_new_tokens=128`)."""
    from ..config import TrainConfig
    from ..tasks.base import EvalSetup
    from ..train.setup import device_problems, make_accelerator

    texts = [texts] if isinstance(texts, str) else list(texts or ())  # one text, not one per character
    overrides = [overrides] if isinstance(overrides, str) else list(overrides or ())
    problems = argument_problems(batch_size, device, precision) or device_problems(device, "--device")
    if problems:
        raise TunelabInputError(problems)
    artifact = find_artifact(path, method)
    options = artifact.task_options(overrides)
    aliases = column_aliases(artifact.task, artifact.info["columns"])
    inputs, added = read_inputs(texts, input_file, artifact.task, aliases)
    model, tokenizer = load_artifact(artifact)
    max_length = prompt_room(artifact, model.config, options)
    # by default the precision the run trained in: the numbers its own test predictions came from
    precision = precision or artifact.manifest.get("precision", "auto")
    accelerator = make_accelerator(TrainConfig(device=device, precision=precision))
    model.to(accelerator.device)
    setup = EvalSetup(batch_size, accelerator.device, accelerator.autocast, tokenizer, options)
    outputs = artifact.task.predict(model, inputs, setup, artifact.info, max_length)
    return artifact, [{k: v for k, v in out.items() if k not in keys} for out, keys in zip(outputs, added)]


def argument_problems(batch_size: int, device: str, precision: str | None) -> list[str]:
    """What the CLI's argparse choices check, for callers of the Python API."""
    problems = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"--batch-size: {batch_size!r} is not allowed; must be > 0")
    if device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device: {device!r} is not allowed; allowed: auto, cpu, cuda")
    if precision not in (None, "fp32", "bf16"):
        problems.append(f"--precision: {precision!r} is not allowed; allowed: fp32, bf16")
    return problems


def prompt_room(artifact: Artifact, model_config, options) -> int:
    """The run's max_length, less what generation needs where positions are a learned table (GPT-2, OPT): a
    prompt keeps its end, and the answer must still fit (`causal-lm.max_new_tokens` may be raised here)."""
    from ..methods.base import get_method
    from ..models.structure import max_positions, positions_are_a_table

    max_length = int(artifact.manifest.get("max_length") or 512)
    new = artifact.task.generated_positions(options)
    limit = max_positions(model_config)
    if not new or limit is None or not positions_are_a_table(model_config):
        return max_length
    method = get_method(artifact.method)
    extra = method.extra_positions(artifact.method_options())
    room = limit - extra - new
    if room < 1:
        raise TunelabInputError([f"{artifact.task.name}.max_new_tokens: {new} generated tokens"
                                 f"{f' + {extra} virtual tokens' if extra else ''} leave no room for a prompt in the "
                                 f"model's {limit} positions; allowed: up to {limit - extra - 1}"])
    return min(max_length, room)


def write_predictions(outputs: list[dict[str, Any]], output_file: str | None) -> None:
    lines = "".join(json.dumps(json_safe(o), ensure_ascii=False, default=str, allow_nan=False) + "\n"
                    for o in outputs)
    if output_file:
        try:
            Path(output_file).expanduser().write_text(lines, encoding="utf-8")
        except OSError as exc:
            raise TunelabInputError([f"--output: cannot write {output_file!r} ({exc.strerror})"]) from None
    else:
        print(lines, end="")
