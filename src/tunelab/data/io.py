"""Reading user data files (CSV, TSV, JSON Lines, Parquet, `datasets.save_to_disk` folders) and packaged sets
into one pandas frame per split. Which columns matter is the task's business, not this module's."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..errors import TunelabInputError
from .delimited import not_utf8, read_csv_as_text
from .packaged import PACKAGED_DATASETS, load_packaged
from .sources import frame_with_label_names, read_dataset_source

if TYPE_CHECKING:  # the config imports tasks, which import this module
    from ..config import DataConfig

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")


def read_frames(cfg: "DataConfig", default_dataset: str) -> dict[str, pd.DataFrame]:
    """The user's files when `data.train_file` is set, else data.dataset (packaged, a folder or a hub id);
    raises every problem."""
    problems: list[str] = []
    if cfg.train_file is None:
        if cfg.validation_file or cfg.test_file:
            problems.append("data.train_file: needed when data.validation_file or data.test_file is set")
        name = cfg.dataset or default_dataset
        if name in PACKAGED_DATASETS:
            problems += unused_source_keys(cfg, f"the packaged dataset {name!r} has fixed splits, and no configs or "
                                                "revisions")
            frames = load_packaged(name, problems)
        else:
            frames = read_dataset_source(name, cfg, f"a packaged dataset ({', '.join(PACKAGED_DATASETS)})")
    else:
        frames, problems = {}, training_file_reused(cfg)
        problems += unused_source_keys(cfg, "data.train_file's files are the data (data.dataset is not read)")
        for split in SPLITS:
            path = getattr(cfg, f"{split}_file")
            if path is not None:
                frame = read_table(path, f"data.{split}_file", problems)
                if frame is not None:
                    frames[split] = frame
    if problems:
        raise TunelabInputError(problems)
    return frames


# keys of a dataset folder or hub id, with their defaults
SOURCE_KEYS = {"dataset_config": None, "dataset_revision": None, "train_split": "train", "validation_split": None,
               "test_split": None}


def unused_source_keys(cfg: "DataConfig", why: str) -> list[str]:
    """Keys set for a source that has none of what they name: silently ignored, a run used other data than
    asked (data.test_split=nope, data.dataset_config=x passed validate)."""
    return [f"data.{key}: {getattr(cfg, key)!r} is not used: {why}; it applies to a dataset folder or hub id "
            "(data.dataset); unset it" for key, default in SOURCE_KEYS.items() if getattr(cfg, key) != default]


def training_file_reused(cfg: "DataConfig") -> list[str]:
    """The training file named again for validation or test: a model chosen or scored on rows it trained on
    (refused as the same split of a dataset is; validation = test stays the user's call, as there)."""
    train, problems = Path(cfg.train_file).expanduser().resolve(), []
    for split, instead in (("validation", "leave it unset to carve validation from train"), ("test", "leave it unset")):
        path = getattr(cfg, f"{split}_file")
        if path and Path(path).expanduser().resolve() == train:
            problems.append(f"data.{split}_file: {path!r} is also data.train_file (a model chosen or scored on rows "
                            f"it trained on); give other rows, or {instead}")
    return problems


def where(cfg: "DataConfig", split: str) -> str:
    """How to name a split's source in a message."""
    return f"data.{split}_file" if cfg.train_file else f"data.dataset ({split})"


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
                if len(loaded) != 1:  # taking one of them would leave the others unused without a word
                    problems.append(f"{field}: {path_text!r} holds splits {list(loaded)}; point at one split's "
                                    "folder, or pass the folder as data.dataset to use its splits")
                    return None
                loaded = next(iter(loaded.values()))
            return frame_with_label_names(loaded)  # ClassLabel ids as their names, as data.dataset reads them
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            problems.append(f"{field}: {path_text!r} has extension {path.suffix!r}; allowed: "
                            f"{', '.join(FILE_BUILDERS)} or a datasets.save_to_disk folder")
            return None
        if path.stat().st_size == 0:
            problems.append(f"{field}: {path_text!r} is empty")
            return None
        # decoded first: a bad byte gets a clear error, not one from deep inside a reader
        text = path.read_bytes().decode("utf-8-sig") if builder != "parquet" else ""
        if builder == "csv":
            return read_csv_as_text(path)
        shape = json_shape_problem(text) if path.suffix.lower() == ".json" else None
        if shape:
            problems.append(f"{field}: {path_text!r} {shape}")
            return None
        # a cache of its own: datasets' shared one keys a local file by path and modification time, so a file
        # edited with its time kept (cp -p, rsync -a, an unzip) was read as it was before
        with reader_errors_unlogged(), tempfile.TemporaryDirectory(prefix="tunelab-read-") as cache:
            loaded = datasets.load_dataset(builder, data_files={"split": str(path)}, split="split", cache_dir=cache)
            return loaded.to_pandas()
    except UnicodeDecodeError:
        problems.append(f"{field}: {path_text!r} {not_utf8(path)}")
    except Exception as exc:  # the readers raise many kinds; the user needs the cause, not a traceback
        if "corresponds to no data" in str(exc) or isinstance(exc, pd.errors.EmptyDataError):  # a header, no rows
            problems.append(f"{field}: {path_text!r} has no rows")
            return None
        if path.is_dir():  # not a save_to_disk folder: perhaps a folder of data files
            problems.append(f"{field}: {path_text!r} is a folder but not a datasets.save_to_disk one; a folder of "
                            f"data files (train.csv, data/train-*.parquet) is read by data.dataset={path_text}")
            return None
        cause = exc.__cause__ or exc.__context__ or exc
        # Arrow fixes a JSON column's type from its first block of rows: a column of numbers that later holds
        # text (or the reverse) fails on a large file only
        mixed = "; a column holds numbers in some rows and text in others: quote all its values" \
            if "Failed to parse" in str(cause) or "changed from" in str(cause) else ""
        problems.append(f"{field}: could not read {path_text!r} ({type(cause).__name__}: "
                        f"{str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ''}){mixed}")
    return None


@contextlib.contextmanager
def reader_errors_unlogged():
    """datasets' JSON reader logs "Failed to load JSON from file ..." before it raises; the raised error becomes
    the problem line below, so the log line only printed the same failure twice, the first time unformatted."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def json_shape_problem(text: str) -> str | None:
    """What is wrong with a .json file's shape, if it is not rows: one object of columns or of rows (pandas'
    to_json by default, or with orient='index'), or an array of arrays (orient='values': rows without names)."""
    import json

    start = text.lstrip()[:1]
    if start not in ("{", "["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # JSON Lines in a .json file, or broken: the reader says which
    fix = "write one object per row: to_json(orient='records') for a JSON array, or lines=True for JSON Lines"
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return ("holds one JSON object of objects (pandas' to_json writes its columns so by default, its rows with "
                f"orient='index'), not one object per row; {fix}")
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return f"holds a JSON array of arrays (rows without column names, pandas' orient='values'); {fix}"
    return None
