"""`tunelab predict` inputs as users have them: labelled test files, missing cells, other formats, text pairs,
chat rows that end with the reference answer."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import tunelab
from tunelab.cli import main
from tunelab.tasks.causal_lm import as_prompt_turns, as_turns

from conftest import toy_rows

QUICK = ["train.max_steps=2", "train.eval_every_steps=0", "methods=lora"]


def strict_json_lines(text: str) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_bert, toy_data):
    out = tmp_path_factory.mktemp("single")
    overrides = [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}", "data.max_length=32",
                 "train.batch_size=8", "train.precision=fp32", *QUICK]
    assert tunelab.compare(overrides=overrides, output_dir=out, show_progress=False, isolate=False).exit_code == 0
    return out


def test_a_labelled_file_keeps_its_labels_and_missing_cells_become_null(single, tmp_path, capsys):
    path = tmp_path / "labelled.csv"
    path.write_text("text,label,score\ngood food,neg,\nNA,pos,2\n")
    assert main(["predict", str(single), "--input", str(path)]) == 0
    lines = strict_json_lines(capsys.readouterr().out)
    assert [line["input_label"] for line in lines] == ["neg", "pos"]  # the gold labels, next to the predictions
    assert all(line["label"] in ("neg", "pos") and set(line["scores"]) == {"neg", "pos"} for line in lines)
    assert lines[0]["score"] is None and lines[1]["score"] == "2" and lines[1]["text"] == "NA"  # "NA" is text


def test_empty_inputs_are_refused_not_scored_as_text(single, tmp_path, capsys):
    path = tmp_path / "gaps.csv"
    path.write_text('text\ngood\n""\n"  "\n')
    assert main(["predict", str(single), "--input", str(path)]) == 2
    assert "inputs [2, 3] have an empty or missing 'text'" in capsys.readouterr().err
    (tmp_path / "null.jsonl").write_text('{"text": null}\nnull\n')
    assert main(["predict", str(single), "--input", str(tmp_path / "null.jsonl")]) == 2
    assert "inputs [1, 2]" in capsys.readouterr().err


def test_other_input_formats_and_their_errors(single, tmp_path, capsys):
    pd.DataFrame({"text": ["good", "stale box"]}).to_parquet(tmp_path / "in.parquet")
    (tmp_path / "in.json").write_text(json.dumps(["good", {"text": "stale box"}]))
    (tmp_path / "bom.txt").write_bytes("\ufeffgood\nstale\x0cbox\n".encode())
    for name, texts in (("in.parquet", ["good", "stale box"]), ("in.json", ["good", "stale box"]),
                        ("bom.txt", ["good", "stale\x0cbox"])):
        assert main(["predict", str(single), "--input", str(tmp_path / name)]) == 0, name
        assert [line["text"] for line in strict_json_lines(capsys.readouterr().out)] == texts
    (tmp_path / "latin.csv").write_bytes(b"text\ncaf\xe9\n")
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for name, message in (("latin.csv", "is not UTF-8"), ("chat.jsonl", "has no 'text' key"), ("", "is a folder")):
        assert main(["predict", str(single), "--input", str(tmp_path / name)]) == 2, name
        assert message in capsys.readouterr().err


def test_a_pair_model_refuses_inputs_without_their_second_text(tmp_path, tiny_bert, capsys):
    frame = toy_rows(40)
    frame["second"] = frame["text"].str.split().str[::-1].str.join(" ")
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    out = tmp_path / "pairs"
    overrides = [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path / 'pairs.csv'}",
                 "data.text_pair_column=second", "data.max_length=32", "train.batch_size=8",
                 "train.precision=fp32", *QUICK]
    assert tunelab.compare(overrides=overrides, output_dir=out, show_progress=False, isolate=False).exit_code == 0
    assert main(["predict", str(out), "--text", "good food"]) == 2
    assert "trained on text pairs ('second'" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"text": "good food", "text_pair": "food good"}\n')
    assert main(["predict", str(out), "--input", str(tmp_path / "in.jsonl")]) == 0


def test_chat_inputs_leave_out_the_reference_answer_and_read_text_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is "}, "up"]},
                        {"role": "assistant", "content": "the sky"}]}
    assert as_prompt_turns(row) == [{"role": "user", "content": "what is up"}]
    assert as_turns(row["messages"])[0]["content"] == "what is up"  # training reads the parts' text too
    image = [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, {"role": "assistant", "content": "a cat"}]
    assert as_turns(image) is None  # a text model cannot take it: dropped and counted, never trained as a repr
