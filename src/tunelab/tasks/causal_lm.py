"""Causal-LM instruction tuning (SFT): prompt → response, loss on the response tokens only.

Rows come from prompt/response columns or a chat `messages` column (a list of {role, content} turns whose
last turn is the assistant's answer). With a chat template the tokenizer's own template frames the prompt;
without one the prompt is followed by a newline and the response by the end-of-sequence token.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import IGNORE_INDEX, Encoded, config_pad_id, pad_rows, pad_token_id, split_frames, where
from ..errors import TunelabInputError
from ..train.batches import collate, eval_batches
from .base import (HIGHER, LOWER, EvalSetup, Evaluation, Task, TaskColumns, TaskData, TaskOptions,
                   missing_columns, register)
from ._chat import as_prompt_turns, conversations, needed_columns, prompt_and_response, prompt_text, row_turns
from ._generation import exact_match, generate, token_f1

LOGITS_BUDGET = 2**26  # logits held at once during evaluation (floats): 256 MB, whatever the vocabulary


@dataclass
class CausalLMOptions(TaskOptions):
    generation_samples: int = dataclasses.field(default=16, metadata={
        "ge": 0, "help": "held-out rows answered greedily at every evaluation (exact match, token F1)"})
    max_new_tokens: int = dataclasses.field(default=32, metadata={"gt": 0})
    report_examples: int = dataclasses.field(default=4, metadata={"ge": 0, "help": "generations shown in the report"})


@dataclass
class CausalLMColumns(TaskColumns):
    prompt_column: str | None = dataclasses.field(default=None, metadata={"help": "causal-lm; default: 'prompt'"})
    response_column: str | None = dataclasses.field(default=None, metadata={
        "help": "causal-lm; default: 'response'"})
    messages_column: str | None = dataclasses.field(default=None, metadata={
        "help": "causal-lm chat data, a list of {role, content} turns; default: 'messages' when present"})


@register
class CausalLM(Task):
    name = "causal-lm"
    description = "Causal-LM instruction tuning: loss on response tokens, perplexity, greedy-answer EM/F1"
    Options = CausalLMOptions
    Columns = CausalLMColumns
    peft_task_type = "CAUSAL_LM"
    metrics = {"loss": LOWER, "perplexity": LOWER, "exact_match": HIGHER, "token_f1": HIGHER}
    metric_ranges = {"loss": (0.0, None), "perplexity": (1.0, None), "exact_match": (0.0, 1.0),
                     "token_f1": (0.0, 1.0)}
    default_metric = "loss"
    default_model = "SmolLM2-135M-Instruct"
    default_dataset = "chatterbot-english"
    shows_examples = True
    input_key = "prompt"
    predict_keys = ("prompt", "messages")
    text_keys = ("prompt",)
    output_keys = ("output",)
    input_columns = ("prompt_column", "messages_column")
    always_drops_invalid_rows = True

    def check_frames(self, frames: dict[str, pd.DataFrame], cfg) -> list[str]:
        problems = []
        columns = needed_columns(frames["train"], cfg)  # train decides chat or prompt/response for every split
        for split, frame in frames.items():
            problems += missing_columns(frame, columns, where(cfg.data, split), COLUMNS_HINT)
            if ambiguous(frame, cfg):
                problems.append(f"{where(cfg.data, split)}: has both a chat column ({DEFAULT_CHAT!r}) and prompt/"
                                "response columns, and each split would be read by what it has; name the columns "
                                "to read: data.prompt_column and data.response_column, or data.messages_column")
            if len(frame) == 0:
                problems.append(f"{where(cfg.data, split)}: has no rows")
        return problems

    def invalid_rows(self, frame: pd.DataFrame, cfg) -> dict[str, pd.Series]:
        if ambiguous(frame, cfg):  # which rows are usable depends on the columns read: check_frames asks
            return {}
        problems = pd.Series([problem for _, problem in row_turns(frame, cfg)], index=frame.index, dtype=object)
        return {reason: problems == reason for reason in problems.dropna().unique()}

    def unfit_rows(self, frame: pd.DataFrame, tokenizer, cfg) -> dict[str, pd.Series]:
        rows = [(index, turns) for index, (turns, _) in zip(frame.index, row_turns(frame, cfg)) if turns]
        _, _, reasons = tokenized([turns for _, turns in rows], tokenizer, cfg)
        reasons = pd.Series(reasons, index=[index for index, _ in rows], dtype=object).reindex(frame.index)
        return {reason: reasons == reason for reason in reasons.dropna().unique()}

    def split(self, frames, cfg, unfit=None):
        return split_frames(frames, cfg.data, None, cfg.train.seed, unfit)

    def encode(self, frames: dict[str, pd.DataFrame], tokenizer, cfg) -> TaskData:
        encoded, dropped = {}, {}
        for split, frame in frames.items():
            encoded[split], reasons = encode_rows(frame, tokenizer, cfg)
            dropped.update({f"{split}: {reason}": n for reason, n in reasons.items() if n})
        empty = [s for s in ("train", "validation") if len(encoded[s]) == 0]
        if empty:
            raise TunelabInputError([f"data: no usable rows left in {', '.join(empty)} "
                                     f"(dropped: {dropped or 'none'}); every row needs a prompt and a "
                                     f"non-empty response that fit in data.max_length={cfg.data.max_length}"])
        return TaskData(encoded["train"], encoded["validation"], encoded.get("test"), dropped=dropped)

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def example_labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids  # the next token at every position

    def logits_per_token(self, vocab: int) -> int:
        return vocab

    def prepare_model(self, model: nn.Module, tokenizer) -> nn.Module:
        if model.config.pad_token_id is None:  # (no tokenizer: planning from a config alone, see estimate)
            model.config.pad_token_id = pad_token_id(tokenizer) if tokenizer is not None else \
                config_pad_id(model.config)
        return model

    def metrics_not_computed(self, options: CausalLMOptions) -> dict[str, str]:
        if options.generation_samples:
            return {}
        why = "is scored on generated answers, and causal-lm.generation_samples is 0; set it above 0 or pick loss"
        return {"exact_match": why, "token_f1": why}

    def evaluate(self, model: nn.Module, data: Encoded, setup: EvalSetup) -> Evaluation:
        sums, counts = response_losses(model, data, setup)
        loss = float(sums.sum() / max(counts.sum(), 1))
        opts: CausalLMOptions = setup.options
        metrics = {"loss": loss, "perplexity": perplexity(loss)}
        per_example = {"loss_sum": sums.tolist(), "tokens": counts.tolist()}
        rows = sample_rows(len(data), opts.generation_samples)
        if not len(rows):
            return Evaluation(metrics, per_example=per_example)
        outputs = generate(model, data, rows, setup, opts.max_new_tokens)
        examples = [{"prompt": data.prompt_texts[r], "reference": reference(data, r, setup.tokenizer), "output": out}
                    for r, out in zip(rows, outputs)]
        per_example["exact_match"] = [exact_match(e["output"], e["reference"]) for e in examples]
        per_example["token_f1"] = [token_f1(e["output"], e["reference"]) for e in examples]
        metrics["exact_match"] = float(np.mean(per_example["exact_match"]))
        metrics["token_f1"] = float(np.mean(per_example["token_f1"]))
        return Evaluation(metrics, examples[: opts.report_examples], per_example)

    def statistic(self, metric: str, per_example: dict[str, list]):
        if metric in ("exact_match", "token_f1"):  # over the generated sample only
            return ([np.asarray(per_example[metric])], np.mean) if per_example.get(metric) else None
        if not per_example.get("tokens"):
            return None
        columns = [np.asarray(per_example["loss_sum"]), np.asarray(per_example["tokens"])]
        if metric == "loss":
            return columns, token_mean_loss
        return columns, lambda sums, tokens, axis=-1: perplexity(token_mean_loss(sums, tokens, axis))

    def baseline(self, data: TaskData, load_model: Callable[[], nn.Module], setup: EvalSetup) -> dict[str, Any]:
        """The untrained model: what fine-tuning has to improve on."""
        model = load_model().to(setup.device)
        out: dict[str, Any] = {"name": "untrained model"}
        for split in ("validation", "test"):
            encoded = getattr(data, split)
            if encoded is not None and len(encoded):
                result = self.evaluate(model, encoded, setup)
                out[split] = result.metrics
                out["examples"] = result.examples  # the test split's, when there is one
        return out

    def predict(self, model: nn.Module, inputs: list[dict[str, Any]], setup: EvalSetup, info: dict[str, Any],
                max_length: int) -> list[dict[str, Any]]:
        """Greedy answers, framed as in training (the chat template, or the prompt and a newline)."""
        tokenizer = setup.tokenizer
        turns, problems = zip(*(as_prompt_turns(item) for item in inputs))
        refused = [f"predict: input {n}: {problem}" for n, problem in enumerate(problems, 1) if problem]
        if refused:  # the first ten name the pattern; a file of thousands of bad rows needs no more lines
            raise TunelabInputError(refused[:10] + [f"... {len(refused) - 10} more"] * (len(refused) > 10))
        templated = bool(getattr(tokenizer, "chat_template", None))
        prompts = tokenizer([prompt_text(t, tokenizer) for t in turns], add_special_tokens=not templated)["input_ids"]
        prompts = [p[-max_length:] for p in prompts]  # the end of a long prompt is what the answer follows
        ids, lengths = pad_rows(prompts, pad_token_id(tokenizer))
        data = Encoded(ids, lengths, ids, prompt_lengths=lengths)
        outputs = generate(model, data, np.arange(len(inputs)), setup, setup.options.max_new_tokens)
        return [{**item, "output": output} for item, output in zip(inputs, outputs)]

    def generated_positions(self, options) -> int:
        return options.max_new_tokens

    def summary(self, data: TaskData) -> dict[str, Any]:
        return {"mean_response_tokens":
                float(np.mean(data.train.lengths - data.train.prompt_lengths)) if len(data.train) else 0.0}

    def report_lines(self, payload: dict[str, Any]) -> list[str]:
        return generated_sample_note(payload) + drawn_rows_note(payload) + sample_generations_section(payload)


DEFAULT_CHAT = "messages"


def ambiguous(frame: pd.DataFrame, cfg) -> bool:
    """A frame with the default chat column and prompt/response ones, none named: a split is read by the columns
    it has, so a 'messages' column in validation alone would score it on other inputs than train's."""
    data = cfg.data
    return (not (data.messages_column or data.prompt_column or data.response_column)
            and {DEFAULT_CHAT, "prompt", "response"} <= set(frame.columns))


COLUMNS_HINT = " (set data.prompt_column and data.response_column, or data.messages_column for chat data)"


def reference(data: Encoded, row: int, tokenizer) -> str:
    """The answer a generated one is scored against: as written (a response cut at data.max_length trained on
    its start, but a whole correct answer must still match it), else the response's tokens (data encoded by an
    earlier version)."""
    if data.reference_texts is not None:
        return data.reference_texts[row].strip()
    return decode(tokenizer, data.ids[row, data.prompt_lengths[row]:data.lengths[row]])


def encode_rows(frame: pd.DataFrame, tokenizer, cfg) -> tuple[Encoded, dict[str, int]]:
    """Prompt and response tokenized apart (as at generation time); labels only on the response. (Rows that
    cannot train were dropped as the splits were drawn, by unfit_rows; any left here are dropped and counted
    too.)"""
    chats, dropped = conversations(frame, cfg)
    prompts, responses, reasons = tokenized(chats, tokenizer, cfg)
    rows, labels, prompt_lengths, prompt_texts, references = [], [], [], [], []
    for turns, prompt, response, reason in zip(chats, prompts, responses, reasons):
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        rows.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
        prompt_lengths.append(len(prompt))
        prompt_texts.append(turns[-2]["content"])
        references.append(turns[-1]["content"])
    ids, lengths = pad_rows(rows, pad_token_id(tokenizer))
    label_table, _ = pad_rows(labels, IGNORE_INDEX)
    return Encoded(ids, lengths, label_table, prompt_lengths=np.array(prompt_lengths, dtype=np.int64),
                   prompt_texts=prompt_texts, reference_texts=references), dropped


def tokenized(chats: list[list[dict]], tokenizer, cfg) -> tuple[list[list[int]], list[list[int]], list[str | None]]:
    """Each chat's prompt and response token ids (the response cut to the room data.max_length leaves), and
    why the row cannot train (None: it can)."""
    texts = [prompt_and_response(turns, tokenizer) for turns in chats]
    templated = bool(getattr(tokenizer, "chat_template", None))
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=not templated)["input_ids"] if texts else []
    responses = tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"] if texts else []
    responses = [response[:max(cfg.data.max_length - len(prompt), 0)] for prompt, response in zip(prompts, responses)]
    # the reference an answer is scored against is the response's text: one with none (a tokenizer that has no
    # tokens for its words, an end marker alone) would train on nothing and score every answer as exact
    visible = tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []
    reasons = [f"prompt fills data.max_length={cfg.data.max_length}" if len(prompt) >= cfg.data.max_length
               else None if text.strip() else "response has no text after tokenizing"
               for prompt, text in zip(prompts, visible)]
    return prompts, responses, reasons


def response_losses(model: nn.Module, data: Encoded, setup: EvalSetup) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the summed cross-entropy of its response tokens and how many there are."""
    was_training = model.training
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else 50_000
    rows_per_batch = max(1, min(setup.batch_size, LOGITS_BUDGET // (data.ids.shape[1] * vocab)))
    sums, counts = np.zeros(len(data)), np.zeros(len(data), dtype=np.int64)
    with torch.inference_mode(), setup.autocast():
        for rows in eval_batches(data.lengths, rows_per_batch):
            batch = collate(data, rows, setup.device)
            labels = batch.pop("labels")
            width = labels.shape[1]
            # methods with virtual tokens (prompt/prefix tuning) return logits for them first: keep the last
            # `width` positions, which belong to the real tokens
            logits = model(**batch).logits[:, -width:].float()
            token_loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                     ignore_index=IGNORE_INDEX, reduction="none")
            sums[rows] = token_loss.double().sum(1).cpu().numpy()
            counts[rows] = (labels[:, 1:] != IGNORE_INDEX).sum(1).cpu().numpy()
    model.train(was_training)
    return sums, counts


def perplexity(loss):
    """exp(loss) of a number or of an array of them, capped: an untrained model's loss must not overflow the
    report."""
    return math.exp(min(loss, 50.0)) if np.isscalar(loss) else np.exp(np.minimum(loss, 50.0))


def token_mean_loss(sums: np.ndarray, tokens: np.ndarray, axis: int = -1):
    """The loss per response token of the rows along `axis`: one run's, or each bootstrap resample's."""
    return np.sum(sums, axis=axis) / np.maximum(np.sum(tokens, axis=axis), 1)


def sample_rows(n: int, k: int) -> np.ndarray:
    """Up to k rows spread evenly over the split, always the same ones."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).astype(np.int64)) if n and k else np.array([], dtype=np.int64)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def scored_split(payload: dict[str, Any]) -> tuple[str, int]:
    """The split answers are generated from (test when there is one), and its rows."""
    job = payload.get("job") or {}
    return ("test", job["test_rows"]) if job.get("test_rows") else ("validation", job.get("validation_rows") or 0)


def generated_sample_note(payload: dict[str, Any]) -> list[str]:
    """exact_match and token_f1 sit in the table beside the split's row count, but are scored on the generated
    answers alone: said, with how many, so their intervals are read as over those answers."""
    cfg = next((r["config"] for r in payload.get("methods", []) if r.get("config")), {})
    asked = (cfg.get("causal-lm") or {}).get("generation_samples")
    split, rows = scored_split(payload)
    if not asked or not rows:
        return []
    if asked >= rows:
        return [f"exact_match and token_f1 are scored on greedy answers to all {rows} of the {split} split's "
                "prompts.", ""]
    return [f"exact_match and token_f1 are scored on {asked} greedy answers to the {split} split's prompts "
            f"(causal-lm.generation_samples), not on all its {rows} rows; their intervals are over those answers.",
            ""]


def drawn_rows_note(payload: dict[str, Any]) -> list[str]:
    """Where a cap was set, rows dropped once tokenized were counted among the rows drawn, not the whole data."""
    cfg = next((r["config"] for r in payload.get("methods", []) if r.get("config")), {})
    data, dropped = cfg.get("data") or {}, (payload.get("job") or {}).get("dropped_rows") or {}
    if not (data.get("max_train_samples") or data.get("max_eval_samples")) or not any(
            "data.max_length" in key for key in dropped):
        return []
    return ["Rows whose prompt fills data.max_length are counted among the rows a capped split drew until its cap "
            "was full, not over all the data (the others were never tokenized).", ""]


def sample_generations_section(payload: dict[str, Any]) -> list[str]:
    baseline = (payload.get("job") or {}).get("baseline") or {}
    untrained = baseline.get("examples") or []
    trained = [(r.get("run_id", r["method"]), r.get("examples") or []) for r in payload.get("methods", [])
               if r.get("examples")]  # by run: with several seeds, which seed answered
    if not untrained and not trained:
        return []
    lines = [f"## Sample generations ({scored_split(payload)[0]} split, greedy)", ""]
    for i, example in enumerate(untrained or trained[0][1]):
        lines += [f"**Prompt {i + 1}:** {one_line(example['prompt'])}", "",
                  f"- reference: {one_line(example['reference'])}"]
        if untrained:
            lines.append(f"- untrained model: {one_line(example['output'])}")
        lines += [f"- {one_line(run)}: {one_line(items[i]['output'])}" for run, items in trained if i < len(items)]
        lines.append("")
    return lines


def one_line(text: str, limit: int = 300) -> str:
    """A prompt or answer on one report line, shown as written (no Markdown or HTML from the data)."""
    from ..report.view import md_text

    text = " ".join(str(text).split())
    return md_text(text if len(text) <= limit else text[:limit] + " …")
