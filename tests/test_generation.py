"""Greedy answers (causal-LM evaluation and `tunelab predict`) must be the model's own argmax continuations
under the forward it trained with, whatever the method: checked token by token with one forward over prompt
+ answer, for prompts of different lengths in one batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab.tasks._generation as generation
from tunelab.data import Encoded, pad_rows
from tunelab.methods.prefix_tuning import accept_prefix_as_cache
from tunelab.tasks._generation import greedy_ids
from tunelab.tasks.base import EvalSetup

ADAPTERS = {
    "none": None,
    "lora": LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False),
    "prompt-tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix-tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}
PROMPTS = [[2, 5, 6], [2, 7, 8, 9, 10, 11], [2, 12, 13, 14, 15]]  # padding differs from row to row
NEW_TOKENS = 6


def adapted_model(adapter: str, folder):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if adapter == "prefix-tuning":
        accept_prefix_as_cache(model)  # as the method prepares a model
    if ADAPTERS[adapter] is not None:
        model = get_peft_model(model, ADAPTERS[adapter])
        with torch.no_grad():  # trained-looking virtual tokens: far from where they start, so they matter
            for p in getattr(model, "prompt_encoder", torch.nn.Module()).parameters():
                p.normal_(0, 3.0)
    return model


def answers_of(model, tokenizer) -> list[list[int]]:
    ids, lengths = pad_rows(PROMPTS, tokenizer.pad_token_id)
    data = Encoded(ids, lengths, ids, prompt_lengths=lengths)
    setup = EvalSetup(batch_size=16, device=torch.device("cpu"), tokenizer=tokenizer)
    return greedy_ids(model, data, np.arange(len(PROMPTS)), setup, NEW_TOKENS)


def assert_argmax_continuations(model, tokenizer, answers):
    model.eval()
    for prompt, answer in zip(PROMPTS, answers):
        sequence = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0]
        logits = logits[logits.shape[0] - sequence.shape[1]:]  # without the virtual tokens' own positions
        for i, token in enumerate(answer):
            position = len(prompt) - 1 + i
            assert logits[position, token] >= logits[position].max() - 1e-4, (prompt, answer, i)
        if len(answer) < NEW_TOKENS:  # it stopped: the end token was the argmax after the answer
            assert int(logits[-1].argmax()) == tokenizer.eos_token_id


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_greedy_answers_are_the_models_argmax_continuations(adapter, tiny_llama):
    model, tokenizer = adapted_model(adapter, tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    answers = answers_of(model, tokenizer)
    assert_argmax_continuations(model, tokenizer, answers)
    # an end token the model does emit: answers stop before it, at different lengths
    row, position = next((r, i) for r, a in enumerate(answers) for i, t in enumerate(a) if i and t not in a[:i])
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(answers[row][position])
    stopped = answers_of(model, tokenizer)
    assert stopped[row] == answers[row][:position] and all(tokenizer.eos_token_id not in a for a in stopped)
    assert_argmax_continuations(model, tokenizer, stopped)


@pytest.mark.parametrize("adapter", ["none", "lora", "prompt-tuning"])
def test_a_generation_config_with_a_repetition_penalty_does_not_change_the_answers(adapter, tiny_llama):
    """Some instruct models ship a repetition penalty or a no-repeat n-gram size; generate() applies every such
    setting of the model's own config that it is not given, which made answers differ from the argmax."""
    model, tokenizer = adapted_model(adapter, tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    base = model.get_base_model() if adapter != "none" else model
    plain = answers_of(model, tokenizer)
    assert any(len(set(a)) < len(a) for a in plain)  # the tiny model repeats itself: the penalty would act
    base.generation_config.repetition_penalty = 5.0
    base.generation_config.no_repeat_ngram_size = 1
    answers = answers_of(model, tokenizer)
    assert answers == plain
    assert_argmax_continuations(model, tokenizer, answers)
    assert base.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


@pytest.mark.parametrize("failure", ["wrong answers", "an error", "a cache of the wrong shape"])
def test_a_cached_path_that_goes_wrong_falls_back_to_the_plain_forward(failure, tiny_llama, monkeypatch):
    model, tokenizer = adapted_model("prefix-tuning", tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)

    def broken(model, *args):
        if failure == "an error":
            raise ValueError("this model's generation config sets its own cache")
        if failure == "a cache of the wrong shape":  # MPT: its ALiBi bias stops at max_seq_len without the prefix
            raise RuntimeError("The size of tensor a (74) must match the size of tensor b (64)")
        return generation.greedy_cached(model.get_base_model(), *args)  # the prefix dropped, as peft 0.21 does

    monkeypatch.setattr(generation, "greedy_after_prefix", broken)
    with pytest.warns(UserWarning, match="recomputed per token"):
        answers = answers_of(model, tokenizer)
    assert_argmax_continuations(model, tokenizer, answers)


def test_an_answer_ends_at_any_end_marker_the_tokenizer_model_or_template_uses(tiny_llama):
    """A tokenizer whose eos is not the token its chat template ends a turn with (Gemma's and Llama 3's
    base tokenizers): training puts the template's marker after each answer, so generation stops there too."""
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_llama), AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer.eos_token = "<unk>"  # id 1; the template still ends turns with </s> (id 3)
    model.generation_config.eos_token_id = None
    assert generation.stop_ids(model, tokenizer) == [1, 3]
    model.generation_config.eos_token_id = [3, 7]  # a list, as Gemma's generation config has
    assert generation.stop_ids(model, tokenizer) == [1, 3, 7]
    assert generation.until_end([5, 6, 7, 3], [1, 3, 7]) == [5, 6]


MISTRAL_LIKE = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                "{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}"
                "{% for m in rest %}{% if m['role'] == 'user' %}[INST] {% if loop.last and system is defined %}"
                "{{ system }} {% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}"
                "{% endfor %}")


def test_a_template_that_moves_the_system_turn_trains_on_the_prompt_generation_sees(tiny_llama):
    """Mistral's template writes the system message into the last user turn only while that turn is last:
    rendered with its answer, the prompt differs. Training must still use the prompt predict will send."""
    from tunelab.tasks._chat import prompt_and_response, prompt_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = MISTRAL_LIKE
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is it good"},
             {"role": "assistant", "content": "yes"}]
    prompt, response = prompt_and_response(turns, tokenizer)
    assert prompt == prompt_text(turns[:-1], tokenizer) == "[INST] be brief is it good [/INST]"
    assert response == "yes</s>"
    for answer in ("<", ">", "s"):  # answers that occur inside the end marker itself
        assert prompt_and_response([*turns[:-1], {"role": "assistant", "content": answer}], tokenizer)[1] == \
            answer + "</s>"


def test_a_template_that_ends_answers_with_plain_text_gets_the_end_of_sequence_token(tiny_llama):
    """`{{ role }}: {{ content }}\n` ends an answer with a newline, no special token: without the eos after it the
    model never learns to stop, and every answer runs to max_new_tokens."""
    from tunelab.tasks._chat import prompt_and_response

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    turns = [{"role": "user", "content": "two and two"}, {"role": "assistant", "content": "four"}]
    assert prompt_and_response(turns, tokenizer) == ("user: two and two\nassistant: ", "four\n</s>")
    tokenizer.chat_template = tokenizer.chat_template.replace("}}\n{% endfor", "}}\n</s>{% endfor")
    assert prompt_and_response(turns, tokenizer)[1] == "four\n</s>"  # written by the template: not twice


def test_answers_are_scored_against_the_whole_reference_even_where_training_cut_it(tiny_llama):
    """A response cut at data.max_length trains on its start; scoring against that cut text gave a whole,
    correct answer an exact match of 0."""
    import pandas as pd

    from tunelab.config import load_config
    from tunelab.tasks.causal_lm import encode_rows, reference

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    answer = " ".join(["blue is one colour of the sky on a clear day"] * 8)
    frame = pd.DataFrame({"prompt": ["which colour"], "response": [answer]})
    data, _ = encode_rows(frame, tokenizer, load_config(None, ["task=causal-lm", "data.max_length=48"]))
    assert data.lengths[0] == 48  # the response's tokens were cut
    assert reference(data, 0, tokenizer) == answer
    assert generation.exact_match(answer, reference(data, 0, tokenizer)) == 1.0


def test_chat_rows_without_any_prompt_text_are_dropped_and_counted():
    import pandas as pd

    from tunelab.config import load_config
    from tunelab.tasks._chat import conversations

    frame = pd.DataFrame({"messages": [
        [{"role": "user", "content": "  "}, {"role": "assistant", "content": "yes"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "yo"}]]})
    chats, dropped = conversations(frame, load_config(None, ["task=causal-lm"]))
    assert len(chats) == 1 and dropped["empty prompt"] == 1


def test_numeric_answers_are_trained_as_written_and_list_cells_are_dropped():
    import pandas as pd

    from tunelab.config import load_config
    from tunelab.tasks._chat import conversations

    frame = pd.DataFrame({"prompt": ["six times seven", "one", "two", "list"],
                          "response": [42, None, 7, ["bad", "stale"]]})  # a missing value makes the column float
    chats, dropped = conversations(frame, load_config(None, ["task=causal-lm"]))
    assert [c[-1]["content"] for c in chats] == ["42", "7"]  # not "42.0": the answer the model would learn
    assert dropped["empty response"] == 1 and dropped["prompt or response not text (a list or mapping)"] == 1
