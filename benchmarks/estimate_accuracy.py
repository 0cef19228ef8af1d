"""`tunelab estimate` against what `compare` measures, for the seed methods on both packaged models.

For each model and method: the estimate's peak (from the config alone), then one `compare` run of that method
alone (its own process, as compare always trains), whose reported peak is the resident set's high-water mark
on CPU (the CUDA allocator's peak on a GPU). Prints both, their ratio, and whether it is within 20 %.

    python benchmarks/estimate_accuracy.py [--steps-causal-lm 60] [--methods full,llrd,lora,prompt-tuning]
                                           [--checkpointing]   # train.gradient_checkpointing=true for both
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TUNELAB = [sys.executable, "-m", "tunelab"]
JOBS = {"MiniLM-L6 (classification)": [], "SmolLM2-135M (causal-lm)": ["task=causal-lm"]}


def estimated(overrides: list[str]) -> dict[str, dict]:
    out = subprocess.run([*TUNELAB, "estimate", *overrides, "--json"], capture_output=True, text=True, check=True)
    return {m["method"]: m for m in json.loads(out.stdout)["methods"]}


def measured(overrides: list[str], method: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([*TUNELAB, "compare", *overrides, f"methods={method}", "--output", folder, "--overwrite"],
                       check=True, capture_output=True, text=True)
        records = json.loads((Path(folder) / "results.json").read_text())["methods"]
        return records[0]["peak_memory_mb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="full,llrd,lora,prompt-tuning")
    parser.add_argument("--checkpointing", action="store_true",
                        help="train with gradient checkpointing; compare with the estimate's checkpointed peak")
    parser.add_argument("--steps-causal-lm", type=int, default=60,
                        help="training steps of the causal-LM runs (the resident peak settles within ~10)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    key = "peak_memory_checkpointing_mb" if args.checkpointing else "peak_memory_mb"
    flags = ["train.gradient_checkpointing=true"] if args.checkpointing else []
    print("| model | method | estimate (MB) | compare's peak (MB) | estimate / measured | within 20 % |")
    print("|---|---|---:|---:|---:|---|")
    for job, overrides in JOBS.items():
        overrides = [*overrides, *flags]
        if "task=causal-lm" in overrides:
            overrides = [*overrides, f"train.max_steps={args.steps_causal_lm}"]
        estimates = estimated([*overrides, f"methods={','.join(methods)}"])
        for method in methods:
            guess, peak = estimates[method][key], measured(overrides, method)
            ratio = guess / peak
            print(f"| {job} | {method} | {guess:,.0f} | {peak:,.0f} | {ratio:.2f} | "
                  f"{'yes' if abs(ratio - 1) <= 0.2 else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
