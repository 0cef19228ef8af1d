"""`tunelab predict`: batch inference with a saved artifact, one JSON line per input."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import TunelabInputError
from .artifact import Artifact, find_artifact, load_artifact


def read_inputs(texts: Sequence[str], input_file: str | None, key: str) -> list[dict[str, Any]]:
    """--text values and the lines of --input: JSON Lines (objects, or plain strings), CSV/TSV with a column
    named like the task's input, or plain text (one input per line)."""
    inputs = [{key: text} for text in texts]
    if input_file:
        inputs += list(_file_inputs(Path(input_file).expanduser(), key))
    if not inputs:
        raise TunelabInputError([f"predict: no inputs; give --text or --input FILE (one {key} per line)"])
    return inputs


def _file_inputs(path: Path, key: str) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise TunelabInputError([f"--input: {str(path)!r} does not exist"])
    if path.suffix.lower() in (".csv", ".tsv"):
        import pandas as pd

        frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        if key not in frame.columns:
            raise TunelabInputError([f"--input: {str(path)!r} has no column {key!r}; columns are: "
                                     f"{', '.join(map(str, frame.columns))}"])
        yield from frame.to_dict("records")
        return
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() in (".jsonl", ".json"):
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise TunelabInputError([f"--input: line {number} of {str(path)!r} is not JSON ({exc})"]) from None
            if isinstance(value, dict) and key not in value and "messages" not in value:
                raise TunelabInputError([f"--input: line {number} of {str(path)!r} has no {key!r} key"])
            yield value if isinstance(value, dict) else {key: str(value)}
        else:
            yield {key: line}


def predict(path: str | Path, texts: Sequence[str] = (), input_file: str | None = None, method: str | None = None,
            batch_size: int = 32, device: str = "auto",
            precision: str | None = None) -> tuple[Artifact, list[dict[str, Any]]]:
    """Outputs for every input, from the artifact in `path` (an experiment folder: the best method), in
    `precision` ("fp32" or "bf16"; default: the one the run trained in)."""
    from ..config import TrainConfig
    from ..tasks.base import EvalSetup
    from ..train.setup import device_problems, make_accelerator

    problems = device_problems(device, "--device")
    if problems:
        raise TunelabInputError(problems)
    artifact = find_artifact(path, method)
    inputs = read_inputs(texts, input_file, artifact.task.input_key)
    model, tokenizer = load_artifact(artifact)
    # by default the precision the run trained in: the numbers its own test predictions came from
    precision = precision or artifact.manifest.get("precision", "auto")
    accelerator = make_accelerator(TrainConfig(device=device, precision=precision))
    model.to(accelerator.device)
    setup = EvalSetup(batch_size, accelerator.device, accelerator.autocast, tokenizer, artifact.task_options())
    max_length = int(artifact.manifest.get("max_length") or 512)
    return artifact, artifact.task.predict(model, inputs, setup, artifact.info, max_length)


def write_predictions(outputs: list[dict[str, Any]], output_file: str | None) -> None:
    lines = "".join(json.dumps(o, ensure_ascii=False, default=str) + "\n" for o in outputs)
    if output_file:
        Path(output_file).expanduser().write_text(lines, encoding="utf-8")
    else:
        print(lines, end="")
