"""`tunelab predict` inputs as users have them: labelled test files, missing cells, other formats, text pairs,
chat rows that end with the reference answer."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import tunelab
from tunelab.cli import main
from tunelab.tasks._chat import as_prompt_turns, as_turns

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


def test_a_single_text_model_refuses_a_second_text_that_would_change_every_row(single, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"text": "good food", "text_pair": "stale box"}\n{"text": "good food"}\n')
    assert main(["predict", str(single), "--input", str(path)]) == 2
    assert "trained on single texts, without a second text; inputs [1] have a 'text_pair'" in capsys.readouterr().err
    path.write_text('{"text": "good food", "text_pair": ""}\n{"text": "good food"}\n')  # an empty one is no pair
    assert main(["predict", str(single), "--input", str(path)]) == 0
    first, second = strict_json_lines(capsys.readouterr().out)
    assert first["scores"] == second["scores"]


def test_empty_inputs_are_refused_not_scored_as_text(single, tmp_path, capsys):
    path = tmp_path / "gaps.csv"
    path.write_text('text\ngood\n""\n"  "\n')
    assert main(["predict", str(single), "--input", str(path)]) == 2
    assert "inputs [2, 3] have an empty or missing 'text'" in capsys.readouterr().err
    (tmp_path / "null.jsonl").write_text('{"text": null}\nnull\n')
    assert main(["predict", str(single), "--input", str(tmp_path / "null.jsonl")]) == 2
    assert "inputs [1, 2]" in capsys.readouterr().err


def test_inputs_that_would_not_line_up_with_the_outputs_or_be_read_as_printouts_are_refused(single, tmp_path,
                                                                                              capsys):
    """A blank line was skipped (output N no longer answered input N), a column-oriented JSON file was one input
    holding every row, and a list of words was scored as its printout, brackets and quotes included."""
    (tmp_path / "gap.csv").write_text("text\ngood food\n\nbad tea\n")
    (tmp_path / "gap.txt").write_text("good food\n\nbad tea\n\n")  # trailing blank lines end the file
    toy_rows(4).to_json(tmp_path / "columns.json")
    (tmp_path / "words.jsonl").write_text('{"text": ["good", "food"]}\n')
    (tmp_path / "array.jsonl").write_text('[{"text": "good"}, {"text": "stale"}]\n')  # a JSON array saved as .jsonl
    (tmp_path / "bare.jsonl").write_text('["good", "food"]\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("text\n")
    for name, message in (("gap.csv", "inputs [2] have an empty"), ("gap.txt", "inputs [2] have an empty"),
                          ("columns.json", "holds one JSON object"), ("words.jsonl", "inputs [1] have a list"),
                          ("array.jsonl", "inputs [1] have a list"), ("bare.jsonl", "inputs [1] have a list"),
                          ("empty.jsonl", "holds no inputs"), ("header.csv", "holds no inputs")):
        assert main(["predict", str(single), "--input", str(tmp_path / name)]) == 2, name
        assert message in capsys.readouterr().err, name


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
    # the offset counted in the file (pandas decodes in chunks and said 3 here)
    for name, message in (("latin.csv", "is not UTF-8 text (bad byte 0xe9 at offset 8, line 2)"),
                          ("chat.jsonl", "has no 'text' key"), ("", "is a folder")):
        assert main(["predict", str(single), "--input", str(tmp_path / name)]) == 2, name
        assert message in capsys.readouterr().err


def test_a_pair_model_refuses_inputs_without_their_second_text_and_reads_its_own_columns(tmp_path, tiny_bert,
                                                                                         capsys):
    frame = toy_rows(40).rename(columns={"text": "review"})
    frame["second"] = frame["review"].str.split().str[::-1].str.join(" ")
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    out = tmp_path / "pairs"
    overrides = [f"model.name_or_path={tiny_bert}", f"data.train_file={tmp_path / 'pairs.csv'}",
                 "data.text_column=review", "data.text_pair_column=second", "data.max_length=32",
                 "train.batch_size=8", "train.precision=fp32", *QUICK]
    assert tunelab.compare(overrides=overrides, output_dir=out, show_progress=False, isolate=False).exit_code == 0
    assert main(["predict", str(out), "--text", "good food"]) == 2
    assert "trained on text pairs ('second'" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"text": "good food", "text_pair": "food good"}\n'
                                       '{"text": "stale box", "text_pair": "box"}\n')
    assert main(["predict", str(out), "--input", str(tmp_path / "in.jsonl")]) == 0
    by_task_keys = strict_json_lines(capsys.readouterr().out)
    # a file shaped like the training data: the run's column names, answered under those names
    (tmp_path / "own.csv").write_text("review,second,label\ngood food,food good,pos\nstale box,box,neg\n")
    assert main(["predict", str(out), "--input", str(tmp_path / "own.csv")]) == 0
    by_own_columns = strict_json_lines(capsys.readouterr().out)
    assert [line["scores"] for line in by_own_columns] == [line["scores"] for line in by_task_keys]
    assert set(by_own_columns[0]) == {"review", "second", "input_label", "label", "scores"}
    (tmp_path / "other.csv").write_text("body\ngood\n")
    assert main(["predict", str(out), "--input", str(tmp_path / "other.csv")]) == 2
    assert "has no column 'text' or 'review'; columns are: body" in capsys.readouterr().err


def test_predict_takes_task_options_and_keeps_answers_inside_a_position_table(tiny_causal_overrides, tiny_llama,
                                                                              tmp_path, capsys):
    from test_bad_input import tiny_gpt2

    out = tmp_path / "gpt2-run"  # 64 learned positions, data.max_length=32, trained with 4 new tokens
    overrides = [*tiny_causal_overrides, f"model.name_or_path={tiny_gpt2(tmp_path, tiny_llama)}",
                 "train.precision=fp32", *QUICK]
    assert tunelab.compare(overrides=overrides, output_dir=out, show_progress=False, isolate=False).exit_code == 0
    long_prompt = " ".join(["what is opposite of good"] * 12)  # 60 tokens: cut to its end
    _, short = tunelab.predict(out, [long_prompt, "hi"], overrides=["causal-lm.max_new_tokens=2"])
    _, longer = tunelab.predict(out, [long_prompt, "hi"], overrides=["causal-lm.max_new_tokens=40"])
    assert all(b.startswith(a) for a, b in zip((s["output"] for s in short), (s["output"] for s in longer)))
    assert main(["predict", str(out), "--text", "hi", "causal-lm.max_new_tokens=64"]) == 2
    assert "64 generated tokens leave no room for a prompt in the model's 64 positions" in capsys.readouterr().err
    assert main(["predict", str(out), "--text", "hi", "causal-lm.max_new_tokens=0", "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "causal-lm.max_new_tokens: 0 is not allowed; must be > 0" in err
    assert "override 'train.lr=1': predict takes the task's options only, as causal-lm.KEY=VALUE" in err


def test_chat_inputs_leave_out_the_reference_answer_and_read_text_parts():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is "}, "up"]},
                        {"role": "assistant", "content": "the sky"}]}
    assert as_prompt_turns(row) == ([{"role": "user", "content": "what is up"}], None)
    assert as_turns(row["messages"])[0]["content"] == "what is up"  # training reads the parts' text too
    image = [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, {"role": "assistant", "content": "a cat"}]
    assert as_turns(image) is None  # a text model cannot take it: dropped and counted, never trained as a repr
    assert as_prompt_turns({"messages": image})[0] is None  # nor answered as an empty prompt


def test_a_run_given_a_relative_model_path_predicts_from_another_folder(tiny_bert, toy_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_bert.parent)
    out = tmp_path / "relative"
    overrides = [f"model.name_or_path={tiny_bert.name}", f"data.train_file={toy_data['train']}",
                 "data.max_length=32", "train.batch_size=8", "train.precision=fp32", *QUICK]
    assert tunelab.compare(overrides=overrides, output_dir=out, show_progress=False, isolate=False).exit_code == 0
    monkeypatch.chdir(tmp_path)
    _, outputs = tunelab.predict(out, ["good food"])
    assert outputs[0]["label"] in ("neg", "pos")
    adapter_config = json.loads(next(out.glob("artifacts/*/adapter_config.json")).read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_bert.resolve())  # plain peft finds it too


def test_an_experiment_that_did_not_finish_says_how_to_finish_it(tmp_path, capsys):
    """A stopped run has checkpoints, not an artifact to predict with; the error named only --method. A diverged
    one says so, with its error; an experiment whose first run is still training says that."""
    (tmp_path / "run.json").write_text("{}")
    assert main(["predict", str(tmp_path), "--text", "good"]) == 2
    assert "has no finished run yet (results.json appears when the first one ends)" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"job": {}, "summary": [], "methods": [
        {"method": "lora", "run_id": "lora", "status": "interrupted"},
        {"method": "full", "run_id": "full", "status": "diverged", "error": "loss became non-finite at step 4\n.."}]}))
    assert main(["predict", str(tmp_path), "--text", "good"]) == 2
    assert f"`tunelab compare --resume --output {tmp_path}` finishes them" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--method", "full", "--text", "good"]) == 2
    assert "no saved artifact of 'full' (full diverged: loss became non-finite at step 4)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict"])
    assert "required: EXPERIMENT_DIR|ARTIFACT_DIR\n" in capsys.readouterr().err  # task options are optional
