"""The packaged causal-LM job, shrunk: SmolLM2-135M (converted from GGUF) on chatterbot pairs, the default methods."""
from __future__ import annotations

import json

import pytest

from tunelab.cli import main

pytestmark = pytest.mark.slow

SMALL = ["task=causal-lm", "data.max_train_samples=32", "data.max_eval_samples=8", "data.max_length=64",
         "train.batch_size=8", "train.max_steps=1", "train.eval_every_steps=1", "causal-lm.generation_samples=2",
         "causal-lm.max_new_tokens=8", "causal-lm.report_examples=2",
         "train.precision=fp32"]  # auto would time fp32 against bf16 for each method (20-30 s each on some CPUs)


def test_every_method_runs_on_the_packaged_causal_lm(tmp_path):
    out = tmp_path / "exp"
    # in one process: a process per method (tested in test_isolation.py) would add a minute of start-ups here
    assert main(["compare", *SMALL, "--output", str(out), "--no-progress", "--in-process"]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["job"]["task"] == "causal-lm" and payload["job"]["baseline"]["name"] == "untrained model"
    for record in payload["methods"]:
        assert record["status"] == "success", record.get("error")
        assert record["trainable_params"] == record["trainable_params_expected"]
        assert set(record["test"]) == {"loss", "perplexity", "exact_match", "token_f1"}
        assert len(record["examples"]) == 2
    assert "## Sample generations" in (out / "report.md").read_text()
