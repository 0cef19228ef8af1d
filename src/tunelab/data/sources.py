"""`data.dataset` as a local folder or a Hugging Face Hub dataset, read with `datasets` itself: a folder that
`datasets.load_dataset` understands (e.g. train.csv + test.csv, or data/train-*.parquet), a
`save_to_disk` folder, or a hub id (with `data.dataset_config`), cached by `datasets` as usual.

The dataset's split names map to tunelab's train/validation/test through `data.train_split`,
`data.validation_split` and `data.test_split`; ClassLabel columns become their names (-1, "no label", becomes
missing, which the task refuses or drops).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..errors import TunelabInputError
from ..models.hub import hub_offline, is_hub_id, is_offline, path_hint, unreachable_hub
from .delimited import not_utf8, read_csv_as_text

if TYPE_CHECKING:
    from ..config import DataConfig

VALIDATION_NAMES = ("validation", "valid", "dev", "val")


# A local folder's files are read anew every time: datasets' cache keys them by path and modification time, so
# a file edited with its time kept (cp -p, rsync -a, an unzip) was read as it was before.
REBUILT = "force_redownload"


def read_dataset_source(name: str, cfg: "DataConfig", allowed: str) -> dict[str, pd.DataFrame]:
    """Frames per tunelab split from a folder or hub dataset; raises TunelabInputError with every problem."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(name).expanduser()
    if path.is_dir():
        loaded = _load_folder(path, cfg)
    elif path.is_file():
        raise TunelabInputError([f"data.dataset: {name!r} is a file; a data file is data.train_file (and "
                                 "data.validation_file, data.test_file), data.dataset a folder or a hub id"])
    elif is_hub_id(name):
        loaded = _load_hub(name, cfg)
    else:
        raise TunelabInputError([f"data.dataset: {name!r} is not {allowed}, a local folder or a hub dataset id"])
    return {split: frame_with_label_names(dataset) for split, dataset in pick_splits(loaded, cfg).items()}


def _load_folder(path: Path, cfg: "DataConfig"):
    import datasets

    if cfg.dataset_revision is not None:  # it would be ignored: the folder is read as it is now
        raise TunelabInputError([f"data.dataset_revision: {cfg.dataset_revision!r}: a revision is a hub dataset's "
                                 f"branch, tag or commit, and {str(path)!r} is a local folder; unset it"])
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if saved and cfg.dataset_config:  # it would be ignored: the user would think another subset was read
        raise TunelabInputError([f"data.dataset_config: {cfg.dataset_config!r} names a config, but {str(path)!r} "
                                 "is a saved dataset (save_to_disk), which has none; remove data.dataset_config"])
    try:
        if saved:
            loaded = datasets.load_from_disk(str(path))
        elif csv_tables(path):
            loaded = load_csv_folder(path, cfg.dataset_config)
        else:
            loaded = datasets.load_dataset(str(path), cfg.dataset_config, download_mode=REBUILT)
    except TunelabInputError:
        raise
    except Exception as exc:
        raise TunelabInputError([f"data.dataset: could not read the folder {str(path)!r} with "
                                 f"datasets.load_dataset ({_cause(exc)}); it needs data files such as "
                                 "train.csv and test.csv (or train.jsonl, data/train-*.parquet)"]) from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)


def load_csv_folder(path: Path, config_name: str | None):
    """Each split of a folder of CSV (or TSV) files, each file read as data.train_file reads one (every field
    the text it is, a repeated column name or a row longer than the header refused), with the split's own
    columns: an unlabelled test.csv beside train.csv is usual. The files of a split are datasets' own choice
    (its folder patterns, or the folder's README config)."""
    import datasets

    split_files = datasets.load_dataset_builder(str(path), config_name).config.data_files
    splits = {}
    for split, files in split_files.items():
        frames = []
        for file in files:
            try:
                frames.append(read_csv_as_text(Path(file)))
            except UnicodeDecodeError:
                raise TunelabInputError([f"data.dataset: {str(file)!r} {not_utf8(Path(file))}"]) from None
            except (ValueError, pd.errors.ParserError) as exc:  # EmptyDataError included
                raise TunelabInputError([f"data.dataset: {str(file)!r} does not read as a table: {exc}"]) from None
        columns = {str(file): list(frame.columns) for file, frame in zip(files, frames)}
        if len({frozenset(names) for names in columns.values()}) > 1:  # concatenated, each lacks the other's
            raise TunelabInputError([f"data.dataset: the {split} files of {str(path)!r} have different columns: "
                                     + "; ".join(f"{Path(f).name}: {', '.join(c)}" for f, c in columns.items())])
        frame = pd.concat(frames, ignore_index=True)
        splits[str(split)] = datasets.Dataset.from_pandas(frame, preserve_index=False)
    return datasets.DatasetDict(splits)


def csv_tables(folder: Path) -> list[Path]:
    """The folder's CSV/TSV files, where it holds no other data files (then datasets reads it as CSV)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    if any(f.suffix.lower() in (".json", ".jsonl", ".parquet", ".arrow") for f in files):
        return []
    return [f for f in files if f.suffix.lower() in (".csv", ".tsv")]


def _load_hub(repo_id: str, cfg: "DataConfig"):
    import datasets

    # with no network, the cached copy at once (datasets falls back to it too, after 30-40 s of retries)
    no_hub = "hub access is off (HF_HUB_OFFLINE=1 or --offline)" if is_offline() else unreachable_hub()
    try:
        with hub_offline(bool(no_hub)):
            return datasets.load_dataset(repo_id, cfg.dataset_config, revision=cfg.dataset_revision)
    except Exception as exc:
        where = repo_id + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
        if no_hub:
            raise TunelabInputError([
                f"data.dataset: {where!r} is not in the local datasets cache and {no_hub}; on a connected "
                "machine load it once (run tunelab there "
                f"without --offline, or `python -c \"import datasets; datasets.load_dataset('{repo_id}'"
                + (f", '{cfg.dataset_config}'" if cfg.dataset_config else "") + ")\"`), then run again "
                f"({_cause(exc)}){path_hint(repo_id)}"]) from None
        raise TunelabInputError([f"data.dataset: could not load {where!r} from the Hub ({_cause(exc)})"
                                 f"{hub_hint(exc, cfg)}{path_hint(repo_id)}"]) from None


def hub_hint(exc: Exception, cfg: "DataConfig") -> str:
    """What to do about a Hub dataset that would not load: name a config, or fix the connection."""
    text = f"{type(exc).__name__} {exc}".lower()
    if any(sign in text for sign in ("connection", "timeout", "timed out", "name resolution", "max retries")):
        return "; check the network connection, or with the dataset already in the local cache pass --offline"
    if not cfg.dataset_config and "config" in text:
        return "; for a dataset with several configs set data.dataset_config"
    return ""


def pick_splits(loaded, cfg: "DataConfig") -> dict:
    """tunelab's splits from the dataset's: named by the data.*_split keys, else by the usual names."""
    available = list(loaded)
    wanted = {"train": cfg.train_split,
              "validation": cfg.validation_split or next((n for n in VALIDATION_NAMES if n in loaded), None),
              "test": cfg.test_split or ("test" if "test" in loaded else None)}
    if cfg.test_split is None and wanted["test"] in (wanted["train"], wanted["validation"]):
        wanted["test"] = None  # the default test split is already used for training or validation: none
    problems = [f"data.{split}_split: the dataset has no split {name!r}; its splits are: {', '.join(available)}"
                for split, name in wanted.items() if name is not None and name not in loaded]
    # training on the rows that choose or score the model is refused; validation = test stays the user's call
    # (GLUE's test splits are unlabelled, and its validation split is then both, as papers report it)
    problems += [f"data.train_split: split {wanted['train']!r} would also be the {role} split (a model chosen or "
                 "scored on rows it trained on); name a different split for each"
                 for role in ("validation", "test") if wanted[role] is not None and wanted[role] == wanted["train"]]
    if problems:
        raise TunelabInputError(problems)
    return {split: loaded[name] for split, name in wanted.items() if name is not None}


def frame_with_label_names(dataset) -> pd.DataFrame:
    """The split as a frame, ClassLabel columns as their names, in the ClassLabel's order (a pandas
    categorical: the class ids of the dataset stay the model's ids); -1 (datasets' "no label", e.g. GLUE test
    sets) becomes missing."""
    import datasets

    frame = dataset.to_pandas()
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            frame[column] = pd.Categorical([feature.names[i] if i >= 0 else None for i in frame[column]],
                                           categories=feature.names)
    return frame


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
