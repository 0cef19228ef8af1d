"""Seeded splits: carving validation from train and capping sizes, stratified by a column when given."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np
import pandas as pd

UnfitRows = Callable[[pd.DataFrame], "dict[str, pd.Series]"]
CHUNK_ROWS = 8192  # rows tokenized at once while looking for unfit ones


def stratified_split(frame: pd.DataFrame, by: str | None, fraction: float,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, held-out): `fraction` of the rows (rounded), each group of column `by` in proportion, every group
    that can spare a row held out while the count allows; a group of one row stays in the rest. Holding out at
    least one row of every class took half of 60 classes × 2 rows at a fraction of 0.1."""
    rng = np.random.default_rng(seed)
    groups = [rows for _, rows in frame.groupby(frame[by].astype(str), sort=True)] if by else [frame]
    spare = [rows for rows in groups if len(rows) > 1]  # each class on both sides where possible
    size = min(int(round(len(frame) * fraction)), sum(len(rows) - 1 for rows in spare))
    if not spare or size < 1:
        return frame, frame.iloc[:0]
    picker = np.random.default_rng([seed, len(spare)]) if size < len(spare) else None
    quotas = exact_quotas(np.array([len(rows) for rows in spare]), size, picker)
    held = [rng.choice(rows.index.to_numpy(), size=min(int(q), len(rows) - 1), replace=False)
            for rows, q in zip(spare, quotas)]
    held_mask = frame.index.isin(np.concatenate(held))
    return frame[~held_mask], frame[held_mask]


def stratified_sample(frame: pd.DataFrame, by: str | None, size: int, seed: int) -> pd.DataFrame:
    """Exactly `size` rows (data.max_*_samples is a maximum, and users size batches by it), each group of
    column `by` in proportion, every group kept while `size` allows."""
    if size >= len(frame):
        return frame
    rng = np.random.default_rng(seed)
    groups = list(frame.groupby(frame[by].astype(str), sort=True)) if by else [("", frame)]
    # fewer rows than groups: which groups keep a row is the seed's choice (its own stream: the rows drawn
    # below, and every larger sample, stay as they were)
    picker = np.random.default_rng([seed, len(groups)]) if size < len(groups) else None
    quotas = exact_quotas(np.array([len(rows) for _, rows in groups]), size, picker)
    chosen = [rng.choice(rows.index.to_numpy(), size=int(q), replace=False) for (_, rows), q in zip(groups, quotas)]
    return frame[frame.index.isin(np.concatenate(chosen))]


def exact_quotas(counts: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rows per group summing to `size` (< counts.sum()): in proportion, rounded by largest remainder (ties
    broken by `rng`, else to the earlier group: fewer rows than groups keep groups the seed picks, not the
    first in sort order); then a group left without a row takes one from the largest, while size allows."""
    share = counts * size / counts.sum()
    quotas = np.floor(share).astype(int)
    tiebreak = rng.permutation(len(counts)) if rng is not None else np.arange(len(counts))
    order = np.lexsort((tiebreak, -(share - quotas)))
    quotas[order[:size - int(quotas.sum())]] += 1
    if size >= len(counts):
        for empty in np.flatnonzero(quotas == 0):
            quotas[np.argmax(quotas)] -= 1
            quotas[empty] = 1
    return quotas


def split_frames(frames: dict[str, pd.DataFrame], data_cfg, by: str | None, seed: int,
                 unfit: UnfitRows | None = None) -> tuple[dict[str, pd.DataFrame], str, dict[str, int]]:
    """Carve validation from train when there is none; cap sizes. Stratified by column `by` if given.
    `unfit` (a frame's rows that cannot train, a mask per reason; it tokenizes) drops rows within each split
    after the carve, so that a cap counts rows that train; returns how many went, per "split: reason"."""
    train, validation, source = frames["train"], frames.get("validation"), "file"
    if validation is None:
        train, validation = stratified_split(train, by, data_cfg.validation_fraction, seed)
        source = "carved from train"
    caps = {"train": data_cfg.max_train_samples, "validation": data_cfg.max_eval_samples,
            "test": data_cfg.max_eval_samples}
    out, dropped = {}, {}
    for split, frame in (("train", train), ("validation", validation), ("test", frames.get("test"))):
        if frame is None:
            continue
        if unfit is None:
            out[split] = stratified_sample(frame, by, caps[split], seed) if caps[split] else frame
            continue
        out[split], reasons = fitting_sample(frame, by, caps[split], seed, unfit)
        dropped.update({f"{split}: {reason}": count for reason, count in reasons.items()})
    return out, source, dropped


def fitting_sample(frame: pd.DataFrame, by: str | None, size: int | None, seed: int,
                   unfit: UnfitRows) -> tuple[pd.DataFrame, dict[str, int]]:
    """Up to `size` rows (all without one) that `unfit` keeps, and the unfit rows met per reason. Unstratified,
    the rows are drawn in a seeded order and only those up to the last one kept are examined, so a cap reads
    what it keeps: tokenizing every row of a million-row file for a 2,000-row cap took minutes and gigabytes."""
    if by is not None or not size or size >= len(frame):
        kept, dropped = fitting_positions(frame, np.arange(len(frame)), None, unfit)
        fitting = frame.iloc[kept]
        return (stratified_sample(fitting, by, size, seed) if size else fitting), dropped
    order = np.random.default_rng(seed).permutation(len(frame))
    kept, dropped = fitting_positions(frame, order, size, unfit)
    return frame.iloc[np.sort(kept)], dropped


def fitting_positions(frame: pd.DataFrame, order: np.ndarray, size: int | None,
                      unfit: UnfitRows) -> tuple[list[int], dict[str, int]]:
    """Positions in `order` that fit, until `size` are found, examined a chunk at a time (bounded memory); the
    rows read past the last one kept are not counted, so the counts do not depend on the chunk size."""
    kept, dropped, start = [], Counter(), 0
    while start < len(order) and (size is None or len(kept) < size):
        wanted = CHUNK_ROWS if size is None else int(np.clip((size - len(kept)) * 5 // 4, 256, CHUNK_ROWS))
        chunk = order[start:start + wanted]
        start += len(chunk)
        for position, reason in zip(chunk, first_reasons(unfit(frame.iloc[chunk]), len(chunk))):
            if reason is not None:
                dropped[reason] += 1
                continue
            kept.append(int(position))
            if len(kept) == size:
                break
    return kept, dict(dropped)


def first_reasons(masks: dict[str, pd.Series], rows: int) -> list[str | None]:
    """Per row, the first reason whose mask marks it (a row with two faults is counted once), else None."""
    reasons: list[str | None] = [None] * rows
    for reason, mask in masks.items():
        for position in np.flatnonzero(mask.to_numpy()):
            reasons[position] = reasons[position] or reason
    return reasons
