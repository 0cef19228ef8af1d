"""Causal-LM rows as chat turns: read from prompt/response or `messages` columns (rows that cannot be trained
on are named with the reason), and framed into prompt and answer text by the tokenizer's chat template."""
from __future__ import annotations

import json
import math
import weakref
from typing import Any

import numpy as np
import pandas as pd


def needed_columns(train: pd.DataFrame, cfg) -> dict[str, str]:
    data = cfg.data
    messages = data.messages_column or "messages"
    if data.messages_column or (not (data.prompt_column or data.response_column) and messages in train.columns):
        return {"data.messages_column": messages}
    return {"data.prompt_column": data.prompt_column or "prompt",
            "data.response_column": data.response_column or "response"}


NOT_TURNS = "messages not a list of {role, content} ending with an assistant turn"
NOT_TEXT = "prompt or response not text (a list or mapping)"
# pandas' to_csv writes a list of dicts as Python prints it: single quotes, which JSON does not read
NOT_JSON = "messages text not JSON (a Python printout with single quotes? write the cells with json.dumps)"


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def conversations(frame: pd.DataFrame, cfg) -> tuple[list[list[dict]], dict[str, int]]:
    """Each usable row as chat turns (the last one the assistant's), plus rows dropped per reason."""
    chats, dropped = [], {}
    for turns, problem in row_turns(frame, cfg):
        if problem:
            dropped[problem] = dropped.get(problem, 0) + 1
        else:
            chats.append(turns)
    return chats, dropped


def row_turns(frame: pd.DataFrame, cfg) -> list[tuple[list[dict] | None, str | None]]:
    """Each row's chat turns, or None and why the row cannot be trained on."""
    columns = needed_columns(frame, cfg)
    if "data.messages_column" in columns:
        return [chat_turns(value) for value in frame[columns["data.messages_column"]].tolist()]
    return [prompt_response_turns(prompt, response) for prompt, response in
            zip(frame[columns["data.prompt_column"]].tolist(), frame[columns["data.response_column"]].tolist())]


def chat_turns(value) -> tuple[list[dict] | None, str | None]:
    turns = as_turns(value)
    if turns is None:
        return None, NOT_JSON if isinstance(value, str) and not is_json(value) else NOT_TURNS
    return checked_turns(turns)


def prompt_response_turns(prompt, response) -> tuple[list[dict] | None, str | None]:
    if not (is_scalar(prompt) and is_scalar(response)):
        return None, NOT_TEXT
    return checked_turns([{"role": "user", "content": text_or_empty(prompt)},
                          {"role": "assistant", "content": text_or_empty(response)}])


def checked_turns(turns: list[dict]) -> tuple[list[dict] | None, str | None]:
    if not turns[-1]["content"].strip():
        return None, "empty response"
    if not any(t["content"].strip() for t in turns[:-1]):
        return None, "empty prompt"
    return turns, None


def text_or_empty(value) -> str:
    """A cell as text; a whole number read as a float (a numeric column with a missing value) as written: 42, not
    42.0, which is what the model would learn to answer."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def is_scalar(value) -> bool:
    return not isinstance(value, (list, tuple, dict, np.ndarray))


def content_text(content) -> str | None:
    """A turn's content as text: a string, or the text parts of a list of parts ({"type": "text", "text": ...},
    the format of chat APIs and multimodal datasets); None where a part is not text (an image), which a
    text model cannot take: such rows are dropped as not {role, content} turns."""
    if isinstance(content, str) or content is None or isinstance(content, float):
        return text_or_empty(content)
    parts = [content] if isinstance(content, dict) else list(content)
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            return None
    return "".join(texts)


def as_turns(value) -> list[dict] | None:
    """A training row's chat: at least two turns, the last one the assistant's answer."""
    turns = parsed_turns(value)
    return turns if turns and len(turns) >= 2 and turns[-1]["role"] == "assistant" else None


def parsed_turns(value) -> list[dict] | None:
    """A messages cell (a list, an array from Parquet, or its JSON text) as {role, content} turns with text
    content; None where it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, dict):  # one turn, not a list of them
        return None
    try:
        turns = [{"role": str(t["role"]), "content": content_text(t["content"])} for t in list(value)]
    except (TypeError, KeyError):
        return None
    return None if any(t["content"] is None for t in turns) else turns


def prompt_and_response(turns: list[dict], tokenizer) -> tuple[str, str]:
    """The prompt text (up to where the answer starts) and the response text, end marker included."""
    prompt = prompt_text(turns[:-1], tokenizer)
    answer = turns[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(turns, tokenize=False)
        if full.startswith(prompt):
            return prompt, with_end(full[len(prompt):], tokenizer)
        # A template that renders earlier turns differently once an answer follows (Mistral's puts the system
        # message into the last user turn only while that turn is the last): train on the prompt as
        # generation will frame it, then the answer and the end marker the template writes after an answer
        # (found after a stand-in answer: the real one may occur in the marker, `<` in `</s>`).
        marked = tokenizer.apply_chat_template([*turns[:-1], {**turns[-1], "content": STAND_IN_ANSWER}],
                                               tokenize=False)
        if STAND_IN_ANSWER in marked:
            return prompt, with_end(answer + marked[marked.rfind(STAND_IN_ANSWER) + len(STAND_IN_ANSWER):],
                                    tokenizer)
    return prompt, answer + (tokenizer.eos_token or "")


def with_end(response: str, tokenizer) -> str:
    """The response as the template wrote it, and the end-of-sequence token after it where the template ends
    an answer with no special token (`{{ content }}\n`): the model would never learn to stop, and every answer
    would run to max_new_tokens."""
    eos = tokenizer.eos_token
    if not eos or end_of_turn_id(tokenizer) is not None or response.rstrip().endswith(eos):
        return response
    return response + eos


STAND_IN_ANSWER = "tunelab-answer-7f3c9"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token a chat template writes right after an assistant's answer, if it writes one (found once
    per tokenizer and template: rows ask for it one by one)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    key = (template, tokenizer.eos_token)
    known = _END_OF_TURN.get(tokenizer)
    if known is None or known[0] != key:
        known = _END_OF_TURN[tokenizer] = (key, template_end_of_turn(tokenizer))
    return known[1]


_END_OF_TURN: "weakref.WeakKeyDictionary[Any, tuple[tuple, int | None]]" = weakref.WeakKeyDictionary()


def template_end_of_turn(tokenizer) -> int | None:
    try:
        full = tokenizer.apply_chat_template([{"role": "user", "content": "ping"},
                                              {"role": "assistant", "content": "pong"}], tokenize=False)
    except Exception:  # a template that wants other turns (a system prompt, say): nothing more to learn here
        return None
    suffix = full[full.rfind("pong") + len("pong"):] if "pong" in full else ""
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix.strip() else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    return ids[0] if ids and ids[0] in special else None


def prompt_text(turns: list[dict], tokenizer) -> str:
    """The turns before an answer, framed so the model's next tokens are the answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return plain_prompt(turns)


def plain_prompt(turns: list[dict]) -> str:
    """Without a chat template: the turns' texts, one per line, and a newline before the answer."""
    return "\n".join(t["content"] for t in turns) + "\n"


def as_prompt_turns(item: dict[str, Any]) -> tuple[list[dict] | None, str | None]:
    """A predict input as chat turns, or None and why it cannot be answered: {"prompt": text} or {"messages":
    [{role, content}, ...]}. Chat rows as training and evaluation read them end with the reference answer:
    those final assistant turns are left out, as evaluation leaves them out, so the model never sees the
    answer it is asked for."""
    if item.get("messages") is None:
        turns = [{"role": "user", "content": text_or_empty(item.get("prompt"))}]
    else:
        turns = parsed_turns(item["messages"])
        if turns is None:
            return None, "'messages' is not a list of {role, content} turns with text content"
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
    if not any(t["content"].strip() for t in turns):
        return None, "nothing to answer: no turn with text before the (left out) assistant's answer"
    return turns, None
