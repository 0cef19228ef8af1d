"""Greedy answers to held-out prompts, and how close they are to the reference (SQuAD-style scores)."""
from __future__ import annotations

import contextlib
import inspect
import re
import string
import warnings
from collections import Counter

import numpy as np
import torch
from torch import nn

from ..data import Encoded
from ._chat import end_of_turn_id


def generate(model: nn.Module, data: Encoded, rows: np.ndarray, setup, max_new_tokens: int) -> list[str]:
    """Greedy continuations of each row's prompt, decoded without special tokens."""
    return [setup.tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in greedy_ids(model, data, rows, setup, max_new_tokens)]


def greedy_ids(model: nn.Module, data: Encoded, rows: np.ndarray, setup, max_new_tokens: int) -> list[list[int]]:
    """The new token ids of each row's greedy continuation, up to (without) the end-of-sequence token."""
    tokenizer = setup.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(model, tokenizer)
    cached_after_virtual = {"embeddings": greedy_after_virtual_embeddings,
                            "prefix": greedy_after_prefix}.get(virtual_tokens(model))
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    with torch.inference_mode(), setup.autocast(), argmax_only(model):
        for start in range(0, len(rows), setup.batch_size):  # train.eval_batch_size, predict's --batch-size
            chunk = rows[start:start + setup.batch_size]
            args = (model, data, chunk, setup.device, max_new_tokens, pad, stops)
            new = checked_against_forward(cached_after_virtual, *args) if cached_after_virtual else greedy_cached(*args)
            outputs += [until_end(row, stops) for row in new]
    model.train(was_training)
    return outputs


@contextlib.contextmanager
def argmax_only(model: nn.Module):
    """generate() under a blank generation config. It fills every setting it is not given from the model's
    own (a repetition penalty, no_repeat_ngram_size, suppressed tokens, a minimum length: some instruct models
    ship them), and any of those makes answers something else than the forward's argmax, and differ between
    methods whose answers are checked against the forward and those that are not."""
    from transformers import GenerationConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(base, "generation_config", None)
    if saved is None:
        yield
        return
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's end of sequence, the model's own (its generation config
    may list several: Gemma, Llama 3 Instruct), and the chat template's end of turn, which training puts after
    every answer (`<|im_end|>` where the tokenizer's eos is `<|endoftext|>`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured]),
           end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def checked_against_forward(greedy, model, data, rows, device, *rest) -> list[list[int]]:
    """`greedy`'s answers if their first tokens are what the plain forward predicts after each prompt, else
    the answers recomputed through that forward (slower, always right). The cached paths below hand peft's
    virtual tokens to transformers' `generate` themselves, which other transformers versions or models (a
    generation config with its own cache implementation) may not take as 5.25 and Llama do."""
    try:
        answers = greedy(model, data, rows, device, *rest)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: a cache MPT's ALiBi cannot extend
        warnings.warn(f"generating through the KV cache failed ({exc}); answers are recomputed per token instead")
        return greedy_recomputed(model, data, rows, device, *rest)
    if all(first_tokens_agree(model, data, rows, device, answers)):
        return answers
    warnings.warn("the cached generation disagreed with the model's forward; answers are recomputed per token")
    return greedy_recomputed(model, data, rows, device, *rest)


def first_tokens_agree(model, data, rows, device, answers) -> list[bool]:
    """Whether each answer's first token scores within rounding of the best logit after its prompt, under
    the forward training ran (right-padded prompts, virtual tokens added by peft). A path that drops the
    virtual tokens picks tokens far below that; bf16 rounding alone moves logits by a few hundredths."""
    tolerance = 0.5 if torch.is_autocast_enabled(device.type) else 0.05
    lengths = torch.from_numpy(data.prompt_lengths[rows].astype(np.int64))
    last = next_token_logits(model, torch.from_numpy(data.ids[rows]), lengths, device).float()
    return [not answer or bool(row[answer[0]] >= row.max() - tolerance) for row, answer in zip(last, answers)]


def next_token_logits(model, ids: torch.Tensor, lengths: torch.Tensor, device) -> torch.Tensor:
    """The logits after each row's last real token, from one forward over right-padded `ids` as training runs
    it (peft's virtual tokens, where it adds them, come first and are skipped)."""
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    logits = model(input_ids=ids[:, :width].to(device), attention_mask=mask.to(device)).logits
    return logits[torch.arange(len(lengths)), logits.shape[1] - width + lengths - 1]


def virtual_tokens(model: nn.Module) -> str | None:
    """How a peft prompt-learning model adds its virtual tokens: "embeddings" before the input (prompt tuning,
    p-tuning) or a key/value "prefix" (prefix tuning); None for other models. peft 0.21's own `generate` is
    wrong for all three under transformers 5: transformers passes the KV cache as `cache`, peft still looks for
    `past_key_values`, so the prefix is dropped and the virtual embeddings are inserted again at every step.
    Those continuations are not what the run trained and was scored with."""
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False):
        return None
    return "prefix" if config.peft_type == "PREFIX_TUNING" else "embeddings"  # peft_type: a str enum


def greedy_cached(model, data, rows, device, max_new_tokens, pad, eos) -> list[list[int]]:
    ids, mask = left_padded_prompts(data, rows, pad)
    generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                               **greedy_options(max_new_tokens, pad, eos))
    return generated[:, ids.shape[1]:].tolist()  # peft and transformers both return prompt + continuation


def greedy_after_virtual_embeddings(model, data, rows, device, max_new_tokens, pad, eos) -> list[list[int]]:
    """The base model's cached generate on the input embeddings training saw: each row's virtual tokens right
    before its prompt, after its left padding, so they sit next to the prompt as they did in training."""
    ids, mask = left_padded_prompts(data, rows, pad)
    base = model.get_base_model()
    words = base.get_input_embeddings()(ids.to(device))
    virtual = model.get_prompt(batch_size=len(rows)).to(words.dtype)
    count, width = virtual.shape[1], ids.shape[1]
    embeds = words.new_zeros((len(rows), count + width, words.shape[-1]))
    full_mask = torch.zeros((len(rows), count + width), dtype=torch.long)
    for i, padding in enumerate((width - mask.sum(1)).tolist()):
        embeds[i, padding:padding + count] = virtual[i]
        embeds[i, padding + count:] = words[i, padding:]
        full_mask[i, padding:] = 1
    generated = base.generate(inputs_embeds=embeds, attention_mask=full_mask.to(device),
                              **greedy_options(max_new_tokens, pad, eos))
    return generated.tolist()  # from embeddings, generate returns only the new tokens


def greedy_after_prefix(model, data, rows, device, max_new_tokens, pad, eos) -> list[list[int]]:
    """The base model's cached generate, its cache starting as the trained prefix (as the forward peft runs in
    training hands it over), the attention mask extended over the prefix."""
    ids, mask = left_padded_prompts(data, rows, pad)
    base = model.get_base_model()
    prefix = model.get_prompt(batch_size=len(rows))
    full_mask = torch.cat([mask.new_ones((len(rows), prefix.get_seq_length())), mask], dim=1)
    # transformers 5 renamed past_key_values to cache (the old name warns, and goes in 6.0)
    cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    generated = base.generate(input_ids=ids.to(device), attention_mask=full_mask.to(device), **{cache_name: prefix},
                              **greedy_options(max_new_tokens, pad, eos))
    return generated[:, ids.shape[1]:].tolist()


def greedy_options(max_new_tokens: int, pad: int, eos: list[int]) -> dict:
    # sampling settings a model's generation_config may carry are unset, so greedy decoding does not warn
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, "pad_token_id": pad,
            "eos_token_id": eos or None, "temperature": None, "top_p": None, "top_k": None}


def greedy_recomputed(model, data, rows, device, max_new_tokens, pad, eos) -> list[list[int]]:
    """Greedy decoding through the model's plain forward, as in training: prompts right-padded, the whole
    sequence recomputed for each new token (no KV cache), each row's next token read at its own last position.
    Padding after a row's tokens cannot reach them (causal attention), so each row gets what it would alone."""
    lengths = torch.from_numpy(data.prompt_lengths[rows].astype(np.int64))
    ids = torch.full((len(rows), int(lengths.max()) + max_new_tokens), pad, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths.tolist())):
        ids[i, :n] = torch.from_numpy(data.ids[row, :n])
    new: list[list[int]] = [[] for _ in rows]
    running = torch.ones(len(rows), dtype=torch.bool)
    for _ in range(max_new_tokens):
        tokens = next_token_logits(model, ids, lengths, device).argmax(-1).cpu()
        for i in torch.nonzero(running).flatten().tolist():
            new[i].append(int(tokens[i]))
            ids[i, lengths[i]] = tokens[i]
        lengths += running.long()
        running &= ~torch.isin(tokens, torch.tensor(eos, dtype=tokens.dtype))
        if not running.any():
            break
    return new


def until_end(tokens: list[int], stops: list[int]) -> list[int]:
    """The tokens before the first one that ends an answer."""
    ends = [i for i, token in enumerate(tokens) if token in stops]
    return tokens[:ends[0]] if ends else tokens


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
