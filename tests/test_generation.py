"""Greedy answers (causal-LM evaluation and `tunelab predict`) must be the model's own argmax continuations
under the forward it trained with, whatever the method: checked token by token with one forward over prompt
+ answer, for prompts of different lengths in one batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.data import Encoded, pad_rows
from tunelab.tasks._generation import greedy_ids
from tunelab.tasks.base import EvalSetup

ADAPTERS = {
    "none": None,
    "lora": LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False),
    "prompt-tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix-tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}
NEW_TOKENS = 6


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_greedy_answers_are_the_models_argmax_continuations(adapter, tiny_llama):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if ADAPTERS[adapter] is not None:
        model = get_peft_model(model, ADAPTERS[adapter])
        with torch.no_grad():  # trained-looking virtual tokens: far from where they start, so they matter
            for p in getattr(model, "prompt_encoder", torch.nn.Module()).parameters():
                p.normal_(0, 3.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [[2, 5, 6], [2, 7, 8, 9, 10, 11], [2, 12, 13, 14, 15]]  # padding differs from row to row
    ids, lengths = pad_rows(prompts, tokenizer.pad_token_id)
    data = Encoded(ids, lengths, ids, prompt_lengths=lengths)
    setup = EvalSetup(batch_size=16, device=torch.device("cpu"), tokenizer=tokenizer)
    answers = greedy_ids(model, data, np.arange(len(prompts)), setup, NEW_TOKENS)
    model.eval()
    for prompt, answer in zip(prompts, answers):
        sequence = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0]
        logits = logits[logits.shape[0] - sequence.shape[1]:]  # without the virtual tokens' own positions
        for i, token in enumerate(answer):
            position = len(prompt) - 1 + i
            assert logits[position, token] >= logits[position].max() - 1e-4, (adapter, prompt, answer, i)
        if len(answer) < NEW_TOKENS:  # it stopped: the end token was the argmax after the answer
            assert int(logits[-1].argmax()) == tokenizer.eos_token_id
