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
    return [setup.tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in greedy_ids(model, data, rows, setup, max_new_tokens)]


def greedy_ids(model: nn.Module, data: Encoded, rows: np.ndarray, setup, max_new_tokens: int) -> list[list[int]]:
    """The new token ids of each row's greedy continuation, up to (without) the end-of-sequence token."""
    tokenizer = setup.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = greedy_recomputed if adds_virtual_tokens(model) else greedy_cached
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    with torch.inference_mode(), setup.autocast():
        for start in range(0, len(rows), GENERATION_BATCH):
            chunk = rows[start:start + GENERATION_BATCH]
            new = greedy(model, data, chunk, setup.device, max_new_tokens, pad, tokenizer.eos_token_id)
            outputs += [until_end(row, tokenizer.eos_token_id) for row in new]
    model.train(was_training)
    return outputs


def adds_virtual_tokens(model: nn.Module) -> bool:
    """peft's prompt learning (prompt tuning, p-tuning, prefix tuning). Its `generate` is wrong under
    transformers 5 (peft 0.21): transformers passes the KV cache as `cache`, peft still looks for
    `past_key_values`, so prefix tuning's prefix is dropped and the other two re-insert their virtual tokens at
    every step. Those continuations differ from the forward the run trained and was scored with."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def greedy_cached(model, data, rows, device, max_new_tokens, pad, eos) -> list[list[int]]:
    ids, mask = left_padded_prompts(data, rows, pad)
    generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                               max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None, top_k=None)
    return generated[:, ids.shape[1]:].tolist()  # peft and transformers both return prompt + continuation


def greedy_recomputed(model, data, rows, device, max_new_tokens, pad, eos) -> list[list[int]]:
    """Greedy decoding through the model's plain forward, as in training: prompts right-padded, the whole
    sequence recomputed for each new token (no KV cache), each row's next token read at its own last position.
    Padding after a row's tokens cannot reach them (causal attention), so each row gets what it would alone."""
    lengths = data.prompt_lengths[rows].astype(np.int64)
    ids = torch.full((len(rows), int(lengths.max()) + max_new_tokens), pad, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, :n] = torch.from_numpy(data.ids[row, :n])
    lengths, new = torch.from_numpy(lengths), [[] for _ in rows]
    running = torch.ones(len(rows), dtype=torch.bool)
    positions = torch.arange(ids.shape[1])
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        batch = ids[:, :width].to(device)
        logits = model(input_ids=batch, attention_mask=(positions[:width] < lengths[:, None]).long().to(device)).logits
        virtual = logits.shape[1] - width  # prompt tuning and p-tuning return logits for their tokens first
        tokens = logits[torch.arange(len(rows)), virtual + lengths - 1].argmax(-1).cpu()
        for i in torch.nonzero(running).flatten().tolist():
            new[i].append(int(tokens[i]))
            ids[i, lengths[i]] = tokens[i]
        lengths += running.long()
        running &= tokens != (eos if eos is not None else -1)
        if not running.any():
            break
    return new


def until_end(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens


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
