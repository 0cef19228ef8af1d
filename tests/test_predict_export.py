"""`tunelab predict` and `tunelab export` on what a real (tiny) comparison saved, for every method.

predict must reproduce the predictions the run itself scored on the test split; a merged export must load
with plain transformers and give the adapter's logits; methods that cannot merge say why (exit 2)."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import tunelab
from tunelab.cli import main
from tunelab.errors import TunelabInputError
from tunelab.methods.base import registry
from tunelab.use.artifact import find_artifact, load_artifact

from test_methods_matrix import MATRIX, NOT_APPLICABLE

CLASSIFICATION_METHODS = sorted(m for m in registry() if (m, "classification") not in NOT_APPLICABLE)
NOT_MERGEABLE = {"prompt-tuning", "p-tuning", "prefix-tuning"}  # virtual tokens: inputs, not weights


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_bert, toy_data):
    out = tmp_path_factory.mktemp("experiment")
    options = [o for m in CLASSIFICATION_METHODS for o in MATRIX[m][0]]
    overrides = [f"model.name_or_path={tiny_bert}", f"data.train_file={toy_data['train']}",
                 f"data.validation_file={toy_data['validation']}", f"data.test_file={toy_data['test']}",
                 "data.max_length=32", "train.batch_size=8", "train.max_steps=6", "train.precision=fp32",
                 "train.eval_every_steps=0", f"methods={','.join(CLASSIFICATION_METHODS)}", *options]
    outcome = tunelab.compare(overrides=overrides, output_dir=out, show_progress=False, isolate=False)
    assert all(r["status"] == "success" for r in outcome.records)
    return out, {r["method"]: r for r in outcome.records}


@pytest.mark.parametrize("method", CLASSIFICATION_METHODS)
def test_predict_reproduces_the_runs_own_test_predictions(method, experiment, toy_data, tmp_path, capsys):
    out, records = experiment
    predictions = tmp_path / "p.jsonl"
    assert main(["predict", str(out), "--method", method, "--input", str(toy_data["test"]),
                 "--output", str(predictions), "--batch-size", "64"]) == 0
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    names = ["neg", "pos"]
    assert [names.index(line["label"]) for line in lines] == records[method]["test_per_example"]["pred"]
    assert all(abs(sum(line["scores"].values()) - 1) < 1e-4 for line in lines)


def test_predict_defaults_to_the_best_method_and_takes_text_arguments(experiment, capsys):
    out, _ = experiment
    best = json.loads((out / "results.json").read_text())["summary"][0]["method"]
    assert main(["predict", str(out), "--text", "the tea was lovely", "--text", "stale box"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["text"] for line in captured.out.splitlines()] == ["the tea was lovely", "stale box"]
    assert f"with {best} " in captured.err


def test_predict_runs_in_the_trained_precision_unless_told(experiment):
    out, _ = experiment  # trained in fp32
    texts = ["the tea was lovely", "stale box", "great great coffee"]
    scores = {p: [o["scores"] for o in tunelab.predict(out, texts, method="full", precision=p)[1]]
              for p in (None, "fp32", "bf16")}
    assert scores[None] == scores["fp32"]
    assert scores["bf16"] != scores["fp32"]  # bf16 autocast: other roundings, the same answers within 0.05
    assert all(abs(a[k] - b[k]) < 0.05 for a, b in zip(scores["bf16"], scores["fp32"]) for k in a)


@pytest.mark.parametrize("method", sorted(set(CLASSIFICATION_METHODS) - NOT_MERGEABLE))
def test_a_merged_export_loads_with_transformers_and_gives_the_same_logits(method, experiment, tmp_path):
    out, _ = experiment
    merged = tunelab.export(out, tmp_path / "merged", method=method, merge=True)
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    adapter, _ = load_artifact(find_artifact(out, method))
    batch = AutoTokenizer.from_pretrained(merged)(["the tea was lovely", "stale soggy box"], padding=True,
                                                  return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, adapter(**batch).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", sorted(NOT_MERGEABLE))
def test_virtual_token_methods_say_they_cannot_merge(method, experiment, tmp_path, capsys):
    out, _ = experiment
    assert main(["export", str(out), "--method", method, "--merge", "--output", str(tmp_path / "m")]) == 2
    assert "cannot be merged: its virtual tokens are inputs" in capsys.readouterr().err
    assert main(["export", str(out), "--method", method, "--output", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "adapter_config.json").is_file()


def test_export_overwrite_never_deletes_the_source_nor_an_export_it_cannot_replace(experiment, tmp_path, capsys):
    out, _ = experiment
    artifact = find_artifact(out, "lora").directory
    before = sorted(p.name for p in artifact.iterdir())
    for target in (artifact, out, artifact / "inside"):  # the artifact itself, its experiment, a folder in it
        assert main(["export", str(out), "--method", "lora", "--output", str(target), "--overwrite"]) == 2
        assert "overlaps" in capsys.readouterr().err
    assert sorted(p.name for p in artifact.iterdir()) == before and (out / "results.json").is_file()
    earlier = tunelab.export(out, tmp_path / "m", method="lora", merge=True)
    files = sorted(p.name for p in earlier.iterdir())
    # a refused merge leaves the earlier export as it was
    assert main(["export", str(out), "--method", "prompt-tuning", "--merge", "--output", str(earlier),
                 "--overwrite"]) == 2
    assert sorted(p.name for p in earlier.iterdir()) == files
    assert main(["export", str(earlier), "--merge", "--output", str(tmp_path / "again")]) == 0  # merged: a copy
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert main(["export", str(out), "--method", "lora", "--output", str(other), "--overwrite"]) == 2
    assert "not a tunelab export" in capsys.readouterr().err and (other / "mine.txt").is_file()
    assert main(["export", str(out), "--method", "full", "--output", str(earlier), "--overwrite"]) == 0
    assert json.loads((earlier / "tunelab.json").read_text())["method"] == "full"
    # another experiment's trained artifact is not an earlier export: predict would serve it under its old name
    other_experiment = tmp_path / "other"
    shutil.copytree(out / "artifacts" / "full", other_experiment / "artifacts" / "full")
    (other_experiment / "results.json").write_text("{}")
    assert main(["export", str(out), "--method", "lora", "--output", str(other_experiment / "artifacts" / "full"),
                 "--overwrite"]) == 2
    assert "is inside the artifacts of the experiment" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["export", str(out), "--method", "lora", "--output", str(tmp_path / "a-file" / "out")]) == 2
    assert "--output: cannot write" in capsys.readouterr().err  # not a FileExistsError traceback


def test_the_best_of_an_unfinished_experiment_is_called_the_best_so_far(experiment, tmp_path, capsys):
    out, _ = experiment
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert find_artifact(copy).note == ""  # every planned run finished
    payload = json.loads((copy / "results.json").read_text())
    best = payload["summary"][0]["method"]
    payload["methods"] = [r for r in payload["methods"] if r["method"] in (best, "lora", "full")]
    (copy / "results.json").write_text(json.dumps(payload))  # as while the others still train
    assert main(["predict", str(copy), "--text", "the tea was lovely"]) == 0
    err = capsys.readouterr().err
    waiting = len(CLASSIFICATION_METHODS) - len({best, "lora", "full"})
    assert f"note: {best} is the best of the finished runs; {waiting} run(s) of" in err
    assert "so the best may still change" in err
    assert find_artifact(copy, "lora").note == ""  # a method named by the user is not a choice to qualify
    assert main(["export", str(copy), "--output", str(tmp_path / "exported")]) == 0
    assert f"note: {best} is the best of the finished runs" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_an_adapter_is_not_rebuilt_on_other_base_weights(method, experiment, tiny_bert, tmp_path):
    """The base overwritten in place (retrained, saved over) or gone, with another model under the same relative
    name in predict's working folder: predictions were made on whatever was found, without a word."""
    from safetensors.torch import load_file, save_file

    from tunelab.use.artifact import find_artifact, load_artifact

    out, _ = experiment
    artifact_dir, base = tmp_path / "artifact", tmp_path / "base"
    shutil.copytree(out / "artifacts" / method, artifact_dir)
    shutil.copytree(tiny_bert, base)
    manifest = json.loads((artifact_dir / "tunelab.json").read_text())
    assert manifest["base_source"] == "local" and manifest["base_fingerprint"]
    (artifact_dir / "tunelab.json").write_text(json.dumps({**manifest, "base_model": str(base)}))
    load_artifact(find_artifact(artifact_dir))  # the same weights in another folder: fine
    # files from_pretrained does not read, and the transformers version a config was saved by, change nothing
    (base / "training_args.bin").write_bytes(b"x" * 100)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "transformers_version": "9.9.9"}))
    load_artifact(find_artifact(artifact_dir))
    weights = load_file(base / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, base / "model.safetensors")  # same size, other numbers
    with pytest.raises(TunelabInputError, match="is not the one it was trained on"):
        load_artifact(find_artifact(artifact_dir))
    shutil.rmtree(base)
    with pytest.raises(TunelabInputError, match="the base model it was trained on, .* is gone; restore that folder"):
        load_artifact(find_artifact(artifact_dir))


def test_a_replaced_artifact_is_not_served_under_the_methods_name(experiment, tmp_path):
    out, _ = experiment
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "artifacts" / "full")
    shutil.copytree(copy / "artifacts" / "lora", copy / "artifacts" / "full")
    with pytest.raises(TunelabInputError, match="holds a 'lora' artifact where 'full' was saved"):
        find_artifact(copy, "full")


@pytest.mark.parametrize("metric, direction, best", [("accuracy", "higher", "lora-seed-2"), ("loss", "lower", "lora-seed-1")])
def test_with_several_seeds_the_artifact_of_the_best_validation_score_is_used(metric, direction, best, tmp_path):
    runs = [{"method": "lora", "status": "success", "run_id": f"lora-seed-{i}", "best_val": {"accuracy": acc, "loss": loss}}
            for i, acc, loss in ((1, 0.6, 0.3), (2, 0.8, 0.5), (3, 0.7, 0.4))]
    for run in runs:
        folder = tmp_path / "artifacts" / run["run_id"]
        folder.mkdir(parents=True)
        (folder / "tunelab.json").write_text(json.dumps({"method": "lora"}))
    job = {"metric_for_best": metric, "metrics": {metric: direction}}
    (tmp_path / "results.json").write_text(json.dumps({"job": job, "methods": runs, "summary": []}))
    assert find_artifact(tmp_path, "lora").directory.name == best
    for run in runs:  # the same score on every seed: the lower validation loss, as between checkpoints
        run["best_val"][metric] = 0.5
    (tmp_path / "results.json").write_text(json.dumps({"job": job, "methods": runs, "summary": []}))
    assert find_artifact(tmp_path, "lora").directory.name == "lora-seed-1"


def test_a_sweep_folder_predicts_with_its_best_trial(tmp_path):
    studies = {"lora": {"direction": "maximize", "best": {"number": 2, "value": 0.7}},
               "ia3": {"direction": "maximize", "best": {"number": 0, "value": 0.8}},
               "bitfit": {"direction": "maximize", "best": None}}
    for method, number in (("lora", 2), ("ia3", 0)):
        folder = tmp_path / "artifacts" / method / f"trial-{number:03d}"
        folder.mkdir(parents=True)
        (folder / "tunelab.json").write_text(json.dumps({"method": method}))
    (tmp_path / "sweep.json").write_text(json.dumps({"job": {}, "studies": studies}))
    assert find_artifact(tmp_path).directory == tmp_path / "artifacts" / "ia3" / "trial-000"
    assert find_artifact(tmp_path, "lora").directory == tmp_path / "artifacts" / "lora" / "trial-002"
    with pytest.raises(TunelabInputError, match="has no finished trial of 'bitfit'; studies with one: ia3, lora"):
        find_artifact(tmp_path, "bitfit")


def test_unknown_artifact_and_method_are_refused(experiment, tmp_path):
    out, _ = experiment
    with pytest.raises(TunelabInputError, match="neither an experiment folder"):
        find_artifact(tmp_path)
    with pytest.raises(TunelabInputError, match="no saved artifact of 'nope'"):
        find_artifact(out, "nope")


def test_causal_lm_predict_and_merged_export(tiny_causal_overrides, tmp_path, capsys):
    out = tmp_path / "lm"
    tunelab.compare(overrides=[*tiny_causal_overrides, "methods=lora", "lora.r=4", "train.max_steps=4",
                               "train.precision=fp32"], output_dir=out, show_progress=False, isolate=False)
    assert main(["predict", str(out), "--text", "what is opposite of good"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["prompt"] == "what is opposite of good" and isinstance(line["output"], str)
    chats = tmp_path / "chats.jsonl"  # malformed chats: named input errors, not tracebacks
    chats.write_text('{"messages": []}\n{"messages": [{"role": "assistant", "content": "hi"}]}\n'
                     '{"messages": "hello"}\n{"messages": [{"content": "hi"}]}\n'
                     '{"messages": {"role": "user", "content": "hi"}}\n'
                     '{"messages": [{"role": "user", "content": "what is opposite of good"}]}\n')
    assert main(["predict", str(out), "--input", str(chats)]) == 2
    err = capsys.readouterr().err
    assert err.count("nothing to answer") == 2 and err.count("is not a list of {role, content} turns") == 3
    assert "input 6" not in err
    chat = [{"role": "user", "content": "what is opposite of good"}, {"role": "assistant", "content": "bad"}]
    pd.DataFrame({"messages": [chat]}).to_parquet(tmp_path / "chats.parquet")  # list cells come back as arrays
    assert main(["predict", str(out), "--input", str(tmp_path / "chats.parquet")]) == 0
    assert json.loads(capsys.readouterr().out)["messages"] == chat  # as JSON, not numpy's repr in a string
    merged = tunelab.export(out, tmp_path / "merged", merge=True)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    adapter, tokenizer = load_artifact(find_artifact(out))
    ids = tokenizer(["what is opposite of good"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, adapter(**ids).logits, rtol=1e-4, atol=1e-5)
    exported = AutoTokenizer.from_pretrained(merged)  # batched generate needs left padding; truncation as trained
    assert exported.padding_side == exported.truncation_side == "left" and exported.model_max_length == 32


CAUSAL_METHODS = sorted(m for m in registry() if (m, "causal-lm") not in NOT_APPLICABLE)


@pytest.fixture(scope="module")
def causal_experiment(tmp_path_factory, tiny_llama, toy_qa):
    out = tmp_path_factory.mktemp("causal")
    options = [o for m in CAUSAL_METHODS for o in MATRIX[m][0]]
    overrides = ["task=causal-lm", f"model.name_or_path={tiny_llama}", f"data.train_file={toy_qa['train']}",
                 f"data.validation_file={toy_qa['validation']}", f"data.test_file={toy_qa['test']}",
                 "data.max_length=32", "train.batch_size=8", "train.max_steps=6", "train.precision=fp32",
                 "train.eval_every_steps=0", "causal-lm.generation_samples=4", "causal-lm.report_examples=4",
                 "causal-lm.max_new_tokens=6", f"methods={','.join(CAUSAL_METHODS)}", *options]
    outcome = tunelab.compare(overrides=overrides, output_dir=out, show_progress=False, isolate=False)
    assert all(r["status"] == "success" for r in outcome.records)
    return out, {r["method"]: r for r in outcome.records}


@pytest.mark.parametrize("method", CAUSAL_METHODS)
def test_causal_lm_predict_reproduces_the_runs_own_test_answers(method, causal_experiment):
    out, records = causal_experiment
    examples = records[method]["examples"]
    assert len(examples) == 4
    _, outputs = tunelab.predict(out, [e["prompt"] for e in examples], method=method)
    assert [o["output"] for o in outputs] == [e["output"] for e in examples]


@pytest.mark.parametrize("method", sorted(set(CAUSAL_METHODS) - NOT_MERGEABLE))
def test_causal_lm_merged_export_gives_the_same_logits(method, causal_experiment, tmp_path):
    out, _ = causal_experiment
    merged = tunelab.export(out, tmp_path / "merged", method=method, merge=True)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    adapter, tokenizer = load_artifact(find_artifact(out, method))
    ids = tokenizer(["what is opposite of good", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, adapter(**ids).logits, rtol=1e-4, atol=1e-5)
