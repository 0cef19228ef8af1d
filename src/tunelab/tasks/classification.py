"""Sequence classification: one text (or a pair of texts) → one of the labels seen in train."""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import Encoded, config_pad_id, pad_rows, pad_token_id, split_frames, where
from ..errors import TunelabInputError
from ..train.batches import collate, eval_batches
from .base import (HIGHER, LOWER, EvalSetup, Evaluation, Task, TaskColumns, TaskData, missing_columns,
                   register)


def text_column(cfg) -> str:
    return cfg.data.text_column or "text"


def label_column(cfg) -> str:
    return cfg.data.label_column or "label"


@dataclass
class ClassificationColumns(TaskColumns):
    text_column: str | None = field(default=None, metadata={"help": "default: 'text' (or the packaged set's)"})
    text_pair_column: str | None = field(default=None, metadata={"help": "second text of sentence pairs"})
    label_column: str | None = field(default=None, metadata={"help": "default: 'label' (or the packaged set's)"})


@register
class Classification(Task):
    name = "classification"
    description = "Sequence classification (single text or sentence pair) with a fresh classification head"
    peft_task_type = "SEQ_CLS"
    metrics = {"accuracy": HIGHER, "f1_macro": HIGHER, "loss": LOWER}
    metric_ranges = {"accuracy": (0.0, 1.0), "f1_macro": (0.0, 1.0), "loss": (0.0, None)}
    default_metric = "accuracy"
    default_model = "all-MiniLM-L6-v2"
    default_dataset = "amazon-fine-food"
    Columns = ClassificationColumns
    output_keys = ("label", "scores")
    input_columns = ("text_column", "text_pair_column")
    text_keys = ("text", "text_pair")

    def check_frames(self, frames: dict[str, pd.DataFrame], cfg) -> list[str]:
        # a model fed its own labels scores perfectly and learns nothing: a slip in the column names
        inputs = {"text_column": text_column(cfg), "text_pair_column": cfg.data.text_pair_column}
        problems = [f"data.{key}: {column!r} is also data.label_column; the model would read the answer"
                    for key, column in inputs.items() if column is not None and column == label_column(cfg)]
        if inputs["text_pair_column"] == inputs["text_column"]:  # every pair a text and itself: a slip
            problems.append(f"data.text_pair_column: {inputs['text_pair_column']!r} is also data.text_column; a "
                            "pair needs a second column (leave data.text_pair_column out for single texts)")
        if all(label_column(cfg) in frame for frame in frames.values()):  # (a missing one is reported below)
            problems += nested_value_problems(frames, label_column(cfg), cfg, "label", "classification needs one "
                                              "label per row (multi-label data is not supported)")
        for column in filter(None, inputs.values()):  # a list of words would be read as its printout, brackets too
            problems += nested_value_problems(frames, column, cfg, "text", "classification reads one text per row: "
                                              "join the parts into one string")
        for split, frame in frames.items():
            source = where(cfg.data, split)
            # a dataset's test split is taken by its name unless data.test_split says otherwise: often unlabelled
            unnamed_test = split == "test" and cfg.data.dataset and not cfg.data.test_split
            missing = missing_columns(frame, wanted_columns(cfg), source, "; an unlabelled test split cannot score "
                                      "the methods: name a labelled one with data.test_split (the validation "
                                      "split's name is allowed)" if unnamed_test else "")
            problems += missing + ([f"{source}: has no rows"] if len(frame) == 0 else [])
            if not missing:  # rows are checked where the columns exist, so every split's problems come at once
                problems += invalid_row_problems(self.invalid_rows(frame, cfg), source)
        if not problems:  # the labels of every split, read from columns that must all be there
            problems += check_labels(frames, label_column(cfg), cfg)
        return problems

    def tokenizer_problems(self, tokenizer, cfg) -> list[str]:
        """A max_length the special tokens fill leaves no text; below them the tokenizer gives up truncating and
        returns whole rows, longer than the model's positions."""
        pair = bool(cfg.data.text_pair_column)
        special = tokenizer.num_special_tokens_to_add(pair=pair)
        needed = special + (2 if pair else 1)  # a token of each text
        if cfg.data.max_length >= needed:
            return []
        return [f"data.max_length: {cfg.data.max_length} leaves no room for text: the tokenizer adds {special} "
                f"special tokens{' to a pair' if pair else ''}; allowed: at least {needed}"]

    def invalid_rows(self, frame: pd.DataFrame, cfg) -> dict[str, pd.Series]:
        masks = {}
        for column in filter(None, (text_column(cfg), cfg.data.text_pair_column)):
            masks[f"an empty {column!r}"] = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        label = frame[label_column(cfg)]
        blank = label.map(lambda value: isinstance(value, str) and not value.strip())  # "" or "  ": no class
        masks[f"no {label_column(cfg)!r} label"] = label.isna() | blank.astype(bool)
        return masks

    def split(self, frames: dict[str, pd.DataFrame], cfg, unfit=None):
        return split_frames(named_classes(frames, label_column(cfg)), cfg.data, label_column(cfg), cfg.train.seed,
                            unfit)

    def encode(self, frames: dict[str, pd.DataFrame], tokenizer, cfg) -> TaskData:
        names = label_names(frames["train"][label_column(cfg)])  # the categories `split` gave every split
        encoded = {split: encode_rows(frame, names, tokenizer, cfg) for split, frame in frames.items()}
        return TaskData(encoded["train"], encoded["validation"], encoded.get("test"), info={"labels": names})

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def head_modules(self, model: nn.Module) -> tuple[str, ...]:
        # Everything beside the pretrained backbone: `classifier`/`score` in most models, but also DistilBERT's
        # `pre_classifier`, BART's `classification_head`, DeBERTa's `pooler`; none of it is in a backbone
        # checkpoint, so all of it is new and trained (peft: modules_to_save).
        # A pooler the checkpoint lacks (one saved from a masked-LM model) is new too: models/loading.py marks it.
        backbone = getattr(model, "base_model_prefix", "")
        heads = tuple(name for name, child in model.named_children()
                      if name != backbone and any(True for _ in child.parameters()))
        return heads + tuple(name for name in getattr(model, "tunelab_fresh_modules", ()) if name not in heads)

    def prompt_init_text(self, info: dict[str, Any]) -> str:
        # the label names: Lester et al. (2021) found class-label initialisation the best of their three
        return "Classify the text as " + " or ".join(map(str, info.get("labels") or ["a label"])) + "."

    def head_is_stale(self, saved_config, info: dict[str, Any]) -> bool:
        # its rows are the checkpoint's labels in the checkpoint's order: kept where they are the run's, or
        # where the checkpoint named none (transformers' LABEL_0, LABEL_1...: rows taken by position, as
        # from_pretrained takes them)
        saved = getattr(saved_config, "id2label", None) or {}
        names = [str(saved[i]) for i in sorted(saved)]
        run = [str(n) for n in info.get("labels") or ["0", "1"]]
        return names != run and names != [f"LABEL_{i}" for i in range(len(run))]

    def model_kwargs(self, info: dict[str, Any]) -> dict[str, Any]:
        names = info.get("labels") or ["0", "1"]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}

    def prepare_model(self, model: nn.Module, tokenizer) -> nn.Module:
        # A decoder classifier reads each row's last real token, found by the config's pad id: it must be the id
        # rows are padded with, the tokenizer's (a config without one, or with the end-of-text id while the
        # tokenizer pads with its own, made a row's scores depend on the rows batched with it). An encoder's
        # embeddings took their padding index when built; the config's id no longer matters to them.
        if tokenizer is not None:
            model.config.pad_token_id = pad_token_id(tokenizer)
        else:  # planning from a config alone (estimate): no tokenizer to ask
            model.config.pad_token_id = config_pad_id(model.config)
        return model

    def evaluate(self, model: nn.Module, data: Encoded, setup: EvalSetup) -> Evaluation:
        preds, losses = predict(model, data, setup)
        metrics = {**classification_metrics(preds, data.labels, model.config.num_labels),
                   "loss": float(losses.mean()) if len(losses) else math.nan}
        return Evaluation(metrics, per_example={"pred": preds.tolist(), "label": data.labels.tolist(),
                                                "loss": losses.tolist()})

    def predict(self, model: nn.Module, inputs: list[dict[str, Any]], setup: EvalSetup, info: dict[str, Any],
                max_length: int) -> list[dict[str, Any]]:
        texts = [str(item["text"]) for item in inputs]
        pair_column = (info.get("columns") or {}).get("text_pair_column")
        refuse_mismatched_pairs(inputs, pair_column)
        pairs = [str(item["text_pair"]) for item in inputs] if pair_column else None
        tokens = setup.tokenizer(texts, pairs, truncation=True, max_length=max_length)
        ids, lengths = pad_rows(tokens["input_ids"], pad_token_id(setup.tokenizer))
        type_ids = pad_rows(tokens["token_type_ids"], 0)[0] if pairs and "token_type_ids" in tokens else None
        data = Encoded(ids, lengths, np.zeros(len(texts), dtype=np.int64), type_ids=type_ids)
        names = info["labels"]
        return [{**item, "label": names[int(p.argmax())], "scores": {n: round(float(x), 6) for n, x in zip(names, p)}}
                for item, p in zip(inputs, class_probabilities(model, data, setup))]

    def statistic(self, metric: str, per_example: dict[str, list]):
        if not per_example:
            return None
        if metric == "loss":
            return [np.asarray(per_example["loss"])], np.mean
        # the class count comes from the columns scored, not from this run's: a paired test applies the function
        # to another method's predictions too, which may name a class this run never predicted
        return ([np.asarray(per_example["pred"]), np.asarray(per_example["label"])],
                lambda pred, label, axis=-1: scores_along(pred, label, int(max(pred.max(), label.max())) + 1,
                                                          axis)[metric])

    def baseline(self, data: TaskData, load_model: Callable[[], nn.Module], setup: EvalSetup) -> dict[str, Any]:
        """Always predicting train's most frequent class, with train's class frequencies as probabilities."""
        counts = np.bincount(data.train.labels, minlength=len(data.info["labels"]))
        prior = counts / counts.sum()
        out = {"name": "majority class"}
        for split in ("validation", "test"):
            encoded = getattr(data, split)
            if encoded is not None and len(encoded):
                preds = np.full(len(encoded), int(prior.argmax()))
                loss = float(-np.mean(np.log(np.maximum(prior[encoded.labels], 1e-12))))
                out[split] = {**classification_metrics(preds, encoded.labels, len(prior)), "loss": loss}
        return out

    def summary(self, data: TaskData) -> dict[str, Any]:
        notes = continuous_label_notes(data.info["labels"]) + case_variant_notes(data.info["labels"])
        return {"labels": data.info["labels"], **({"notes": notes} if notes else {})}


def wanted_columns(cfg) -> dict[str, str]:
    """Config key → the column it names, for every column classification reads."""
    columns = {"data.text_column": text_column(cfg)}
    if cfg.data.text_pair_column:
        columns["data.text_pair_column"] = cfg.data.text_pair_column
    return {**columns, "data.label_column": label_column(cfg)}


def invalid_row_problems(masks: dict[str, pd.Series], source: str) -> list[str]:
    problems = []
    for reason, mask in masks.items():
        rows = np.flatnonzero(mask.to_numpy())
        if len(rows):
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            problems.append(f"{source}: {len(rows)} rows have {reason} (rows {shown}, counted from 0); remove "
                            "them or set data.drop_invalid_rows=true")
    return problems


def label_text(value: Any) -> str:
    """A label as its name. A whole float is the integer it stands for, as a number or written "3.0": integers
    in a column with a missing value become floats (JSON readers do it, and pandas writes such a column to CSV
    as 3.0), and the same class must get the same name in every split. Other text stays as written ("01")."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    # "a" and "a " (a hand-edited CSV) are one class, not two; so are "café" composed and decomposed (NFC/NFD:
    # files from different systems), which print alike
    text = unicodedata.normalize("NFC", str(value).strip())
    return text.split(".")[0] if WHOLE_FLOAT.fullmatch(text) else text


def named_classes(frames: dict[str, pd.DataFrame], column: str) -> dict[str, pd.DataFrame]:
    """The label column as categories of every class the data read holds, before splits are carved and
    capped: a data.max_train_samples below the number of classes leaves some class without a training row,
    never without its name (the model's head, the report and predict keep all of them). A ClassLabel's own
    categories stand as they are."""
    if isinstance(frames["train"][column].dtype, pd.CategoricalDtype):
        return frames
    texts = {split: label_texts(frame[column]) for split, frame in frames.items()}
    names = label_names(pd.Series([name for split in texts.values() for name in split], dtype=object))
    return {split: frame.assign(**{column: pd.Categorical(texts[split], categories=names)})
            for split, frame in frames.items()}


def label_texts(values: pd.Series) -> list[str]:
    """label_text of each value, read at the column's own precision: a float32 0.1 is "0.1", as in a float64
    split, not the "0.10000000149011612" of the Python float it widens to."""
    return [label_text(value) for value in values.to_numpy()]


def label_names(values: pd.Series) -> list[str]:
    """Label names from train, sorted (integers numerically: 2 before 10); every split maps through the list.
    A ClassLabel column keeps its own classes and order, so class i of the dataset is class i of the model."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return [label_text(name) for name in values.cat.categories]
    names = set(label_texts(values.dropna()))
    integers = all(INTEGER.fullmatch(name) for name in names)
    return sorted(names, key=lambda name: (int(name), name)) if integers else sorted(names)


def continuous_label_notes(names: list[str]) -> list[str]:
    """Scores such as STS-B's 0.0-5.0 are read as one class per value: valid, but rarely what was meant."""
    try:
        values = [float(name) for name in names]
    except ValueError:
        return []
    if len(values) < CONTINUOUS_LABELS or all(v.is_integer() for v in values):
        return []
    return [f"the {len(names)} labels are numbers with decimals ({', '.join(names[:4])}, ...): each value is a "
            "class of its own, scored by exact match; tunelab has no regression task"]


def case_variant_notes(names: list[str]) -> list[str]:
    """'Pos' and 'pos' are two classes (labels are compared as written, spaces aside): often a slip of the data."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.casefold(), []).append(name)
    alike = [" and ".join(map(repr, group)) for group in groups.values() if len(group) > 1]
    return [f"labels {'; '.join(alike[:3])} differ only in case: each is a class of its own"] if alike else []


CONTINUOUS_LABELS = 10  # distinct numeric labels, some fractional, from which they look like scores, not classes
INTEGER = re.compile(r"[+-]?\d+")
WHOLE_FLOAT = re.compile(r"[+-]?\d+\.0+")


def nested_value_problems(frames: dict[str, pd.DataFrame], column: str, cfg, role: str, why: str) -> list[str]:
    """A list or mapping where a column holds one value per row: multi-label data in the label column, a list of
    words or a dict in a text column."""
    problems = []
    for split, frame in frames.items():
        if column not in frame:  # (a missing column is reported on its own)
            continue
        bad = frame[column].map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray)))
        if bad.any():
            example = short_repr(frame[column][bad].iloc[0])
            problems.append(f"{where(cfg.data, split)}: {int(bad.sum())} rows have a list or mapping in {role} column "
                            f"{column!r} (e.g. {example}); {why}")
    return problems


def short_repr(value, limit: int = 80) -> str:
    # a list column read from Parquet or JSON arrives as a numpy array, whose repr spans lines
    text = " ".join(repr(value.tolist() if isinstance(value, np.ndarray) else value).split())
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def check_labels(frames: dict[str, pd.DataFrame], column: str, cfg) -> list[str]:
    names = label_names(frames["train"][column])
    occurring = sorted(set(label_texts(frames["train"][column].dropna())))  # a ClassLabel names all classes
    problems = []
    if len(occurring) < 2:
        problems.append(f"{where(cfg.data, 'train')}: train has one class only "
                        f"({occurring[0] if occurring else 'none'}); classification needs at least two")
    for split in ("validation", "test"):
        if split in frames:
            unseen = sorted(set(label_texts(frames[split][column].dropna())) - set(names))
            if unseen:
                problems.append(f"{where(cfg.data, split)}: labels {unseen[:5]} do not occur in train; "
                                f"train labels are {names}")
    return problems


def refuse_mismatched_pairs(inputs: list[dict[str, Any]], pair_column: str | None) -> None:
    """A pair model scored without its second text, or a single-text model given one, answers something that
    means nothing (and a pair in one row would reshape every row of the call): both are refused."""
    if pair_column:
        wrong = [i for i, item in enumerate(inputs, 1) if not str(item.get("text_pair") or "")]
        problem = (f"the model was trained on text pairs ({pair_column!r} as the second text); inputs {wrong[:5]} "
                   "have no 'text_pair'; give --input with 'text' and 'text_pair' columns or keys")
    else:
        wrong = [i for i, item in enumerate(inputs, 1) if str(item.get("text_pair") or "")]
        problem = (f"the model was trained on single texts, without a second text; inputs {wrong[:5]} have a "
                   "'text_pair'; leave it out (or train with data.text_pair_column to score pairs)")
    if wrong:
        raise TunelabInputError([f"predict: {problem}"])


def encode_rows(frame: pd.DataFrame, names: list[str], tokenizer, cfg) -> Encoded:
    """Tokenize once without padding (as a pair when data.text_pair_column is set)."""
    texts = frame[text_column(cfg)].astype(str).tolist()
    pairs = frame[cfg.data.text_pair_column].astype(str).tolist() if cfg.data.text_pair_column else None
    tokens = tokenizer(texts, pairs, truncation=True, max_length=cfg.data.max_length, add_special_tokens=True)
    ids, lengths = pad_rows(tokens["input_ids"], pad_token_id(tokenizer))
    type_ids = pad_rows(tokens["token_type_ids"], 0)[0] if pairs and "token_type_ids" in tokens else None
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[name] for name in label_texts(frame[label_column(cfg)])], dtype=np.int64)
    return Encoded(ids, lengths, labels, type_ids=type_ids)


def batch_logits(model: nn.Module, data: Encoded, setup: EvalSetup):
    """(rows, logits, labels) per evaluation batch, in eval mode and without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), setup.autocast():
            for rows in eval_batches(data.lengths, setup.batch_size):
                batch = collate(data, rows, setup.device)
                labels = batch.pop("labels")
                yield rows, model(**batch).logits.float(), labels
    finally:
        model.train(was_training)


def predict(model: nn.Module, data: Encoded, setup: EvalSetup) -> tuple[np.ndarray, np.ndarray]:
    """Predicted label ids and cross-entropy losses, in the split's own row order."""
    preds = np.empty(len(data), dtype=np.int64)
    losses = np.empty(len(data), dtype=np.float64)
    for rows, logits, labels in batch_logits(model, data, setup):
        losses[rows] = nn.functional.cross_entropy(logits, labels, reduction="none").double().cpu().numpy()
        preds[rows] = logits.argmax(-1).cpu().numpy()
    return preds, losses


def class_probabilities(model: nn.Module, data: Encoded, setup: EvalSetup) -> np.ndarray:
    probabilities = np.empty((len(data), model.config.num_labels), dtype=np.float64)
    for rows, logits, _ in batch_logits(model, data, setup):
        probabilities[rows] = logits.softmax(-1).double().cpu().numpy()
    return probabilities


def classification_metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    if not len(labels):
        return {"accuracy": math.nan, "f1_macro": math.nan}
    return {name: float(value) for name, value in scores_along(preds, labels, num_labels).items()}


def scores_along(preds: np.ndarray, labels: np.ndarray, num_labels: int, axis: int = -1) -> dict[str, np.ndarray]:
    """Accuracy and macro F1 reduced along `axis`: of one run's predictions, or of many resamples of them at
    once (the bootstrap's rows along the last axis). Counted per class with one bincount over all rows, so a
    thousand classes cost no more than two."""
    preds, labels = np.moveaxis(np.asarray(preds), axis, -1), np.moveaxis(np.asarray(labels), axis, -1)
    leading = preds.shape[:-1]
    offsets = np.arange(int(np.prod(leading)), dtype=np.int64).reshape(*leading, 1) * num_labels
    size = offsets.size * num_labels

    def per_class(keys: np.ndarray) -> np.ndarray:
        return np.bincount(keys.ravel(), minlength=size).reshape(*leading, num_labels)

    right = preds == labels
    true_positives = per_class((offsets + labels)[right])
    # 2·TP + FP + FN = how often the class is predicted + how often it is the label
    both_counts = per_class(offsets + preds) + per_class(offsets + labels)
    f1 = np.divide(2 * true_positives, both_counts, out=np.zeros(both_counts.shape), where=true_positives > 0)
    # averaged over the classes that occur among the labels or the predictions (scikit-learn's macro average):
    # a class absent from both has no F1, so the score does not depend on how many classes the head has
    occurring = np.maximum((both_counts > 0).sum(axis=-1), 1)
    return {"accuracy": right.mean(axis=-1), "f1_macro": f1.sum(axis=-1) / occurring}
