"""The task layer: sentence pairs, causal-LM encoding and its data checks, generation scores, and a tiny
causal-LM comparison through the real command."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tunelab import validate
from tunelab.cli import main
from tunelab.data import IGNORE_INDEX
from tunelab.errors import TunelabInputError
from tunelab.tasks._generation import exact_match, token_f1

from conftest import POSITIVE, build_tiny_llama, toy_qa_rows


def pair_rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a = POSITIVE[rng.integers(len(POSITIVE))]
        b = a if i % 2 else POSITIVE[(POSITIVE.index(a) + 1) % len(POSITIVE)]
        rows.append({"first": f"the {a} food", "second": f"it was {b}", "label": "same" if i % 2 else "different"})
    return pd.DataFrame(rows)


def test_sentence_pairs_are_encoded_as_pairs_and_train(tmp_path, tiny_bert):
    pair_rows(64).to_csv(tmp_path / "pairs.csv", index=False)
    args = [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path / 'pairs.csv'}", "data.text_column=first",
            "data.text_pair_column=second", "data.max_length=32", "train.batch_size=8"]
    job = validate(None, args)
    frame = job.data.frames["train"]
    expected = job.tokenizer(frame["first"].iloc[0], frame["second"].iloc[0])
    n = int(job.train.lengths[0])
    assert job.train.ids[0, :n].tolist() == expected["input_ids"]
    assert job.train.type_ids[0, :n].tolist() == expected["token_type_ids"] and 1 in expected["token_type_ids"]
    out = tmp_path / "exp"
    assert main(["compare", *args, "methods=full", "train.max_steps=4", "--output", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"][0]["status"] == "success"


def test_causal_lm_loss_is_on_response_tokens_only(tiny_causal_overrides):
    job = validate(None, tiny_causal_overrides)
    rows = job.data.frames["train"]
    prompt = job.tokenizer.apply_chat_template([{"role": "user", "content": rows["prompt"].iloc[0]}],
                                               add_generation_prompt=True, tokenize=False)
    prompt_ids = job.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    train = job.train
    p, n = int(train.prompt_lengths[0]), int(train.lengths[0])
    assert train.ids[0, :p].tolist() == prompt_ids
    assert (train.labels[0, :p] == IGNORE_INDEX).all() and (train.labels[0, n:] == IGNORE_INDEX).all()
    assert train.labels[0, p:n].tolist() == train.ids[0, p:n].tolist()
    assert job.tokenizer.decode(train.ids[0, p:n].tolist(), skip_special_tokens=True).strip() == rows["response"].iloc[0]


def test_messages_column_and_renamed_columns_encode_the_same(tmp_path, tiny_llama, tiny_causal_overrides):
    frame = toy_qa_rows(40)
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
             for p, r in zip(frame.prompt, frame.response)]
    pd.DataFrame({"messages": chats}).to_json(tmp_path / "chat.jsonl", orient="records", lines=True)
    frame.rename(columns={"prompt": "question", "response": "answer"}).to_csv(tmp_path / "qa.csv", index=False)
    common = ["task=causal-lm", f"model.name_or_path={tiny_llama}", "data.max_length=32", "train.batch_size=4"]
    by_messages = validate(None, [*common, f"data.train_file={tmp_path / 'chat.jsonl'}"])
    by_columns = validate(None, [*common, f"data.train_file={tmp_path / 'qa.csv'}", "data.prompt_column=question",
                                 "data.response_column=answer"])
    assert np.array_equal(by_messages.train.ids, by_columns.train.ids)
    assert np.array_equal(by_messages.train.labels, by_columns.train.labels)


def test_a_split_with_both_chat_and_prompt_columns_must_say_which_it_reads(tmp_path, tiny_llama):
    """Train has prompt/response; validation also has a 'messages' column. Each split was read by the columns it
    has: validation as chat (here, one turn each: every row dropped), or, with well-formed chats, scored on other
    inputs than train's. Refused until the columns are named; then both read alike."""
    frame = toy_qa_rows(40)
    frame.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    both = frame.head(8).assign(messages=[[{"role": "user", "content": p}] for p in frame.prompt.head(8)])
    both.to_json(tmp_path / "val.jsonl", orient="records", lines=True)
    args = ["task=causal-lm", f"model.name_or_path={tiny_llama}", "data.max_length=32", "train.batch_size=4",
            f"data.train_file={tmp_path / 'train.jsonl'}", f"data.validation_file={tmp_path / 'val.jsonl'}"]
    with pytest.raises(TunelabInputError) as refused:
        validate(None, args)
    assert refused.value.problems == [
        "data.validation_file: has both a chat column ('messages') and prompt/response columns, and each split "
        "would be read by what it has; name the columns to read: data.prompt_column and data.response_column, "
        "or data.messages_column"]
    assert len(validate(None, [*args, "data.prompt_column=prompt"]).validation) == 8


def test_chat_cells_printed_by_python_are_named_as_not_json(tmp_path, tiny_llama):
    frame = toy_qa_rows(20)
    frame["messages"] = [str([{"role": "user", "content": p}, {"role": "assistant", "content": r}])
                         for p, r in zip(frame.prompt, frame.response)]  # what DataFrame.to_csv writes
    frame[["messages"]].to_csv(tmp_path / "chat.csv", index=False)
    with pytest.raises(TunelabInputError, match=r"dropped all 20 \(messages text not JSON \(a Python printout"):
        validate(None, ["task=causal-lm", f"model.name_or_path={tiny_llama}", f"data.train_file={tmp_path / 'chat.csv'}",
                        "data.max_length=32", "train.batch_size=4"])


def test_without_a_chat_template_the_prompt_ends_with_a_newline(tmp_path, toy_qa):
    model = build_tiny_llama(tmp_path / "plain", chat_template=False)
    job = validate(None, ["task=causal-lm", f"model.name_or_path={model}", f"data.train_file={toy_qa['train']}",
                          "data.max_length=32", "train.batch_size=4"])
    p, n = int(job.train.prompt_lengths[0]), int(job.train.lengths[0])
    assert job.train.ids[0, n - 1] == job.tokenizer.eos_token_id  # the response ends the sequence
    assert (job.train.labels[0, :p] == IGNORE_INDEX).all() and job.train.labels[0, n - 1] == job.tokenizer.eos_token_id


def test_unusable_rows_are_counted_per_reason(tmp_path, tiny_llama):
    frame = toy_qa_rows(30)
    frame.loc[0, "response"] = "  "
    frame.loc[1, "prompt"] = ""
    frame.loc[2, "prompt"] = " ".join(["good"] * 40)  # fills max_length: no room for a response
    frame.loc[3, "response"] = "zzz qqq"  # words the tokenizer has no tokens for: <unk>s and the end marker
    frame.to_csv(tmp_path / "qa.csv", index=False)
    job = validate(None, ["task=causal-lm", f"model.name_or_path={tiny_llama}", f"data.train_file={tmp_path / 'qa.csv'}",
                          "data.max_length=32", "data.validation_fraction=0.2", "train.batch_size=4"])
    dropped = job.summary()["dropped_rows"]
    assert sum(dropped.values()) == 4
    assert {k.split(": ", 1)[1] for k in dropped} == {"empty response", "empty prompt",
                                                      "prompt fills data.max_length=32",
                                                      "response has no text after tokenizing"}
    assert len(job.train) + len(job.validation) == 26


def test_a_cap_counts_rows_that_train_and_validation_is_carved_before_tokenizing(tmp_path, tiny_llama):
    """Rows without a response go before the carve; rows whose prompt fills max_length go within each split
    as its rows are drawn: a cap of 16 trains 16 rows, and validation keeps only the usable rows of its 8."""
    frame = toy_qa_rows(40)
    frame.loc[:9, "response"] = ""
    frame.loc[10:14, "prompt"] = " ".join(["good"] * 40)  # fills max_length: known only once tokenized
    frame.to_csv(tmp_path / "qa.csv", index=False)
    job = validate(None, ["task=causal-lm", f"model.name_or_path={tiny_llama}", f"data.train_file={tmp_path / 'qa.csv'}",
                          "data.max_length=32", "data.validation_fraction=0.25", "data.max_train_samples=16",
                          "train.batch_size=4"])
    dropped = job.summary()["dropped_rows"]
    too_long = "prompt fills data.max_length=32"
    assert len(job.train) == 16 and not job.data.frames["train"].prompt.str.startswith("good good").any()
    assert len(job.validation) + dropped.get(f"validation: {too_long}", 0) == round(0.25 * 30)  # carved from 30
    assert dropped["train: empty response"] == 10
    assert dropped.get(f"train: {too_long}", 0) + dropped.get(f"validation: {too_long}", 0) <= 5


@pytest.mark.parametrize("case,frame_edit,expected", [
    ("missing columns", lambda f: f.rename(columns={"response": "reply"}), "data.response_column: column 'response'"),
    ("both columns missing", lambda f: f.rename(columns={"response": "reply", "prompt": "question"}),
     "data.prompt_column: column 'prompt' not in data.train_file; columns are: question, reply"),
    ("both columns missing, the second", lambda f: f.rename(columns={"response": "reply", "prompt": "question"}),
     "data.response_column: column 'response' not in data.train_file; columns are: question, reply"),
    ("misspelt column", lambda f: f.rename(columns={"response": "responses"}), "(did you mean 'responses'?)"),
    ("nothing usable", lambda f: f.assign(response=""), "no rows left after the causal-lm task dropped all 20"),
])
def test_causal_lm_bad_data_exits_2_before_writing(case, frame_edit, expected, tmp_path, tiny_llama, capsys):
    frame_edit(toy_qa_rows(20)).to_csv(tmp_path / "qa.csv", index=False)
    out = tmp_path / "exp"
    code = main(["compare", "task=causal-lm", f"model.name_or_path={tiny_llama}", f"data.train_file={tmp_path / 'qa.csv'}",
                 "data.max_length=32", "train.batch_size=4", "--output", str(out), "--no-progress"])
    assert code == 2 and expected in capsys.readouterr().err
    assert not out.exists()


def test_settings_of_another_task_are_refused(tiny_causal_overrides):
    with pytest.raises(TunelabInputError) as err:
        validate(None, [*tiny_causal_overrides, "data.text_column=review", "train.metric_for_best=accuracy"])
    text = "\n".join(err.value.problems)
    assert "data.text_column: is for task 'classification'" in text
    assert "train.metric_for_best: 'accuracy' is not a metric of task 'causal-lm'" in text


def test_generation_scores():
    assert exact_match("The Cat!", "cat") == 1.0 and exact_match("a dog", "cat") == 0.0
    assert token_f1("red fox jumps", "the red fox") == pytest.approx(0.8)  # 2 common; p 2/3, r 2/2
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_tiny_causal_lm_comparison_beats_the_untrained_model(tiny_causal_overrides, tmp_path):
    out = tmp_path / "exp"
    assert main(["compare", *tiny_causal_overrides, "methods=full,lora", "train.epochs=2", "train.lr=3e-3",
                 "lora.lr=1e-2", "--output", str(out), "--no-progress"]) == 0
    payload = json.loads((out / "results.json").read_text())
    baseline = payload["job"]["baseline"]
    assert baseline["name"] == "untrained model" and baseline["examples"]
    for record in payload["methods"]:
        assert set(record["best_val"]) >= {"loss", "perplexity", "exact_match", "token_f1"}
        assert record["best_val"]["loss"] < baseline["validation"]["loss"]
        assert record["examples"] and set(record["examples"][0]) == {"prompt", "reference", "output"}
        assert all("val_token_f1" in h for h in record["history"])
    report = (out / "report.md").read_text()
    assert "## Sample generations" in report and "- untrained model:" in report and "test perplexity ↓" in report
    header = (out / "results.csv").read_text().splitlines()[0]
    assert "test.perplexity" in header and "test.accuracy" not in header


def test_the_report_says_which_split_answered_and_on_how_many_answers_em_and_f1_stand():
    """EM and token F1 sit beside the split's row count but are scored on the generated answers alone; with no
    test split the answers shown are validation's (the heading said "test split")."""
    from tunelab.tasks.base import get_task

    example = {"prompt": "p", "reference": "r", "output": "o"}
    record = {"method": "lora", "status": "success", "config": {"causal-lm": {"generation_samples": 16}},
              "examples": [example]}
    for job, split, scored in (({"test_rows": 24, "validation_rows": 30}, "test", "16 greedy answers to the test "
                                "split's prompts (causal-lm.generation_samples), not on all its 24 rows"),
                               ({"test_rows": 0, "validation_rows": 9}, "validation", "greedy answers to all 9 of the "
                                "validation split's prompts.")):
        text = "\n".join(get_task("causal-lm").report_lines({"job": job, "methods": [record]}))
        assert f"## Sample generations ({split} split, greedy)" in text and scored in text, text



def test_an_estimate_counts_the_rows_a_causal_lm_run_trains_on(tmp_path, tiny_llama):
    """The rows per epoch an estimate times are those left once prompts that fill max_length are dropped."""
    from tunelab.config import load_config
    from tunelab.estimate.rows import epoch_rows

    frame = toy_qa_rows(40)
    frame.loc[:9, "prompt"] = " ".join(["good"] * 40)
    frame.to_csv(tmp_path / "qa.csv", index=False)
    settings = ["task=causal-lm", f"model.name_or_path={tiny_llama}", f"data.train_file={tmp_path / 'qa.csv'}",
                "data.max_length=32", "data.validation_fraction=0.25", "train.batch_size=4"]
    trained = validate(None, settings).summary()
    assert epoch_rows(load_config(None, settings))[0] == trained["train_rows"]
    assert trained["train_rows"] + trained["dropped_rows"]["train: prompt fills data.max_length=32"] == 40 - 10


def test_a_split_without_rows_is_said_to_have_none_not_to_lack_its_columns(tmp_path, tiny_llama):
    toy_qa_rows(20).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "validation.csv").write_text("prompt,response\n")
    with pytest.raises(TunelabInputError) as info:
        validate(None, ["task=causal-lm", f"model.name_or_path={tiny_llama}", f"data.train_file={tmp_path / 'train.csv'}",
                        f"data.validation_file={tmp_path / 'validation.csv'}", "data.max_length=32"])
    assert [p for p in info.value.problems if "validation_file" in p] == ["data.validation_file: has no rows"]


def test_the_report_says_capped_splits_count_unfit_rows_among_those_drawn():
    from tunelab.tasks.causal_lm import drawn_rows_note

    def payload(cap, dropped):
        return {"methods": [{"config": {"data": {"max_train_samples": cap, "max_eval_samples": None}}}],
                "job": {"dropped_rows": dropped}}

    too_long = {"train: prompt fills data.max_length=64": 3}
    assert "counted among the rows a capped split drew" in drawn_rows_note(payload(100, too_long))[0]
    assert drawn_rows_note(payload(None, too_long)) == []  # every row was read
    assert drawn_rows_note(payload(100, {"train: empty response": 2})) == []  # counted before the carve
