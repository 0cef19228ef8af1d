"""One tokenized split as plain arrays, the form every task hands to the shared loop."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # positions that carry no loss (prompt and padding in causal LM), as torch and HF expect


@dataclass
class Encoded:
    """Rows of token ids right-padded to the longest row, with their real lengths.

    `labels` is one id per row (classification) or one per token (causal LM, IGNORE_INDEX where no loss
    is taken). `type_ids` holds segment ids for sentence pairs; `prompt_lengths` the number of prompt
    tokens per row, so generation can start from the prompt alone.
    """

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    type_ids: np.ndarray | None = None
    prompt_lengths: np.ndarray | None = None
    prompt_texts: list[str] | None = None  # the user's last turn, as written, for reports
    # the answer as written: what generated answers are scored against, whole even where max_length cut its tokens
    reference_texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def per_token_labels(self) -> bool:
        return self.labels.ndim == 2


def pad_rows(rows: list[list[int]], fill: int) -> tuple[np.ndarray, np.ndarray]:
    """A right-padded table of `rows` and their lengths."""
    lengths = np.fromiter((len(x) for x in rows), dtype=np.int64, count=len(rows))
    table = np.full((len(rows), max(int(lengths.max(initial=1)), 1)), fill, dtype=np.int64)
    for i, tokens in enumerate(rows):
        table[i, : len(tokens)] = tokens
    return table, lengths


def config_pad_id(config) -> int | None:
    """The pad id a model's config alone suggests (no tokenizer at hand): its own, else its end-of-text id (the
    first, where several are listed: Llama 3 names two)."""
    if getattr(config, "pad_token_id", None) is not None:
        return config.pad_token_id
    eos = getattr(config, "eos_token_id", None)
    return eos[0] if isinstance(eos, (list, tuple)) and eos else eos


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)
