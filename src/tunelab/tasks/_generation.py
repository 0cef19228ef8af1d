"""Greedy answers to held-out prompts, and how close they are to the reference (SQuAD-style scores)."""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np
import torch
from torch import nn

from ..data import Encoded

GENERATION_BATCH = 16


def generate(model: nn.Module, data: Encoded, rows: np.ndarray, setup, max_new_tokens: int) -> list[str]:
    """Greedy continuations of each row's prompt, decoded without special tokens."""
    tokenizer = setup.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    with torch.inference_mode(), setup.autocast():
        for start in range(0, len(rows), GENERATION_BATCH):
            chunk = rows[start:start + GENERATION_BATCH]
            ids, mask = left_padded_prompts(data, chunk, pad)
            generated = model.generate(input_ids=ids.to(setup.device), attention_mask=mask.to(setup.device),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                       temperature=None, top_p=None, top_k=None)
            new = generated[:, ids.shape[1]:]  # peft and transformers both return prompt + continuation
            outputs += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new.tolist()]
    model.train(was_training)
    return outputs


def left_padded_prompts(data: Encoded, rows: np.ndarray, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder models continue from the last position, so prompts of a batch are aligned at the right."""
    lengths = data.prompt_lengths[rows]
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, width - n:] = torch.from_numpy(data.ids[row, :n])
        mask[i, width - n:] = 1
    return ids, mask


def normalize(text: str) -> list[str]:
    """Lower case, no punctuation, no articles, single spaces (as SQuAD scores answers)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def exact_match(output: str, reference: str) -> float:
    return float(normalize(output) == normalize(reference))


def token_f1(output: str, reference: str) -> float:
    predicted, gold = normalize(output), normalize(reference)
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)
