"""Seeded splits: carving validation from train and capping sizes, stratified by a column when given."""
from __future__ import annotations

import numpy as np
import pandas as pd


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


def split_frames(frames: dict[str, pd.DataFrame], data_cfg, by: str | None,
                 seed: int) -> tuple[dict[str, pd.DataFrame], str]:
    """Carve validation from train when there is none; cap sizes. Stratified by column `by` if given."""
    train, validation, source = frames["train"], frames.get("validation"), "file"
    if validation is None:
        train, validation = stratified_split(train, by, data_cfg.validation_fraction, seed)
        source = "carved from train"
    if data_cfg.max_train_samples and data_cfg.max_train_samples < len(train):
        train = stratified_sample(train, by, data_cfg.max_train_samples, seed)
    test = frames.get("test")
    if data_cfg.max_eval_samples:
        validation = stratified_sample(validation, by, data_cfg.max_eval_samples, seed)
        test = None if test is None else stratified_sample(test, by, data_cfg.max_eval_samples, seed)
    out = {"train": train, "validation": validation}
    if test is not None:
        out["test"] = test
    return out, source
