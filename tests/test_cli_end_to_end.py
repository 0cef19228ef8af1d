"""End to end with the packaged model and data, through the real command, on a small subset."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

SMALL = ["data.max_train_samples=48", "data.max_eval_samples=40", "data.max_length=64", "train.batch_size=8",
         "train.max_steps=3", "train.eval_every_steps=2", "train.log_every_steps=1"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "exp"
    result = subprocess.run([sys.executable, "-m", "tunelab.cli", "compare", *SMALL, "--output", str(out),
                             "--no-progress"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_results_json_has_a_full_record_per_method(experiment):
    out, _ = experiment
    records = json.loads((out / "results.json").read_text())["methods"]
    assert [r["method"] for r in records] == ["full", "llrd", "lora", "prompt-tuning"]
    for r in records:
        assert r["status"] == "success", r.get("error")
        for key in ("trainable_params", "total_params", "peak_memory_mb", "train_time_s", "train_samples_per_s",
                    "train_tokens_per_s", "param_groups", "history", "best_val", "test", "artifact_dir",
                    "artifact_size_mb", "config", "versions", "precision", "precision_reason"):
            assert r[key] not in (None, []), key
        assert r["trainable_params"] == r["trainable_params_expected"]
        assert r["artifact_dir"] == f"artifacts/{r['method']}"  # within the folder: still right once it moves
        assert (out / r["artifact_dir"] / "tunelab.json").is_file()
        assert r["step_shortcuts"]["head_row_only_from"]  # a BERT classifier: its last block cut
        assert r["step_shortcuts"]["embedding_gradient_rows_only"] == (r["method"] in ("full", "llrd"))
        assert set(r["best_val"]) >= {"accuracy", "f1_macro", "loss", "step"}
        assert [h["step"] for h in r["history"]] == [2, 3]
        assert len(r["losses"]) == 3
    llrd = next(r for r in records if r["method"] == "llrd")
    lrs = {g["name"]: g["lr"] for g in llrd["param_groups"]}
    assert lrs["head"] == pytest.approx(5e-5) and lrs["embeddings"] == pytest.approx(5e-5 * 0.9 ** 7)


def test_csv_report_and_tensorboard_runs(experiment):
    out, result = experiment
    assert len((out / "results.csv").read_text().strip().splitlines()) == 5
    report = (out / "report.md").read_text()
    assert "| prompt-tuning | success |" in report and "Baseline (majority class)" in report
    assert (out / "plots" / "tradeoffs.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for method in ("full", "llrd", "lora", "prompt-tuning"):
        events = EventAccumulator(str(out / "tensorboard" / method))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/lr", "train/grad_norm", "eval/accuracy", "system/peak_memory_mb"} <= tags
    # the HParams tab sets runs apart by the method's own options too (a sweep's lora.r, llrd.decay)
    assert run_hparams(out / "tensorboard" / "lora")["lora.r"] == 8
    assert run_hparams(out / "tensorboard" / "llrd")["llrd.decay"] == pytest.approx(0.9)
    assert "| full | success |" in result.stdout


def run_hparams(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder))
    events.Reload()
    data = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    return {key: value.number_value if value.HasField("number_value") else value.string_value
            for key, value in data.session_start_info.hparams.items()}


@pytest.mark.parametrize("method", ["lora", "prompt-tuning"])
def test_saved_adapter_reloads_with_peft_to_the_same_predictions(experiment, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tunelab import validate

    out, _ = experiment
    record = next(r for r in json.loads((out / "results.json").read_text())["methods"] if r["method"] == method)
    meta = json.loads((out / "artifacts" / method / "tunelab.json").read_text())
    torch.manual_seed(999)  # the head must come from the adapter folder, not from this initialisation
    base = AutoModelForSequenceClassification.from_pretrained(meta["base_model"], num_labels=len(meta["labels"]))
    model = PeftModel.from_pretrained(base, out / "artifacts" / method)
    job = validate(None, SMALL)
    # evaluate in the precision the run used (bf16 autocast on CPUs with fast bf16, else fp32)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if record["precision"] == "bf16"
                else contextlib.nullcontext)
    metrics = job.task.evaluate(model, job.test, job.eval_setup(torch.device("cpu"), autocast)).metrics
    assert metrics["accuracy"] == record["test"]["accuracy"]
    assert metrics["loss"] == pytest.approx(record["test"]["loss"], abs=1e-6)


def test_full_model_artifact_reloads_with_transformers(experiment):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = experiment
    folder = out / "artifacts" / "full"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "great", 1: "other"}
    assert model(**tokenizer(["tasty"], return_tensors="pt")).logits.shape == (1, 2)


def test_report_is_rebuilt_from_results_json_alone(experiment):
    from tunelab.cli import main

    out, _ = experiment
    before = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == before
