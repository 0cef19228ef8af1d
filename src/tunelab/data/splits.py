"""Seeded splits: carving validation from train and capping sizes, stratified by a column when given."""
from __future__ import annotations

import numpy as np
import pandas as pd


def stratified_split(frame: pd.DataFrame, by: str | None, fraction: float,
                     seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, held-out): `fraction` of each group of column `by` (of the whole frame when `by` is None)."""
    rng = np.random.default_rng(seed)
    groups = frame.groupby(frame[by].astype(str), sort=True) if by else [("", frame)]
    held = []
    for _, rows in groups:
        take = int(round(len(rows) * fraction))
        if len(rows) > 1:
            take = min(max(take, 1), len(rows) - 1)  # each class on both sides where possible
        held.extend(rng.choice(rows.index.to_numpy(), size=take, replace=False).tolist())
    held_mask = frame.index.isin(held)
    return frame[~held_mask], frame[held_mask]


def stratified_sample(frame: pd.DataFrame, by: str | None, size: int, seed: int) -> pd.DataFrame:
    if size >= len(frame):
        return frame
    _, sample = stratified_split(frame, by, size / len(frame), seed)
    return sample


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
