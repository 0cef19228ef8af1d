"""How much resident memory this device's allocator keeps beyond the tensors alive, measured once.

On CPU, glibc's malloc serves a step's activations from its heap and keeps the freed space; the next batch,
of another length, needs chunks of other sizes and the heap grows past the step's real peak before it
settles. `compare` reports the resident peak, so an estimate of it must add that kept memory. How much
depends on the allocator (glibc, or jemalloc/tcmalloc where a user preloads one), not on the model, so it is
measured here on a small stand-in job: a 4-layer BERT-shaped encoder trained for a few steps on batches of
varying length, its resident growth compared with the tensor peak a fake step predicts for it, at two batch
sizes: kept = fixed + per_churn_mb × churn. The churn is the step's heap-sized activations less its
gradients and optimizer state: those are allocated while activations are being freed and settle in the
space they leave (full fine-tuning of SmolLM2 keeps far less per MB of activations than LoRA does, because
its 1.3 GB of gradients and AdamW state fill the holes). The fit is cached with the device profile.

Run as `python -m tunelab.estimate.calibrate PRECISION ROWS` (or `overhead`) in a process started as a run's is
(a used heap would hide what a new one keeps); prints one JSON object.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

LONGEST = 128
LENGTHS = list(range(24, LONGEST + 1, 8))


def stand_in_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                      intermediate_size=1536, max_position_embeddings=LONGEST, num_labels=2)


def batch(rows: int, length: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {"input_ids": torch.ones(rows, length, dtype=torch.long, device=device),
            "attention_mask": torch.ones(rows, length, dtype=torch.long, device=device),
            "labels": torch.zeros(rows, dtype=torch.long, device=device)}


def resident_growth(precision: str, rows: int) -> float:
    """MB the resident set grows by over the stand-in's training, from the moment its weights exist."""
    from transformers import BertForSequenceClassification

    from ..train.embedding_grad import KeptEmbeddingGradient
    from ..train.fast_dropout import cheaper_cpu_dropout
    from ..train.setup import build_optimizer
    from ..train.tracking import MemoryMonitor

    torch.manual_seed(0)
    model = BertForSequenceClassification(stand_in_config()).train()
    optimizer = build_optimizer([{"params": list(model.parameters())}])
    lengths = np.random.default_rng(0).permutation(LENGTHS * 2)  # every length twice, the longest included
    # sampled every 2 ms: a stand-in step is short, and its peak is what is measured
    # with the dropout training uses, whose masks are part of what the allocator churns through, and its
    # kept embedding gradient
    cpu = torch.device("cpu")
    kept = KeptEmbeddingGradient.for_model(model, cpu, 1)
    with MemoryMonitor(cpu, interval_s=0.002) as memory, cheaper_cpu_dropout(model, cpu), kept.active():
        for length in lengths:
            kept.zero()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batch(rows, int(length))).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return memory.peak_mb - memory.start_mb


def predicted(precision: str, rows: int):
    from transformers import BertForSequenceClassification

    from .fake_step import measure_step

    with torch.device("meta"):
        model = BertForSequenceClassification(stand_in_config())
        inputs = batch(rows, LONGEST, "meta")
    return measure_step(model, inputs, precision, "cpu")


def allocator_point(precision: str, rows: int) -> dict[str, float]:
    growth = resident_growth(precision, rows)
    step = predicted(precision, rows)
    tensors = step.peak_mb - step.weights_mb  # what appears after the weights: state, gradients, activations
    churn = max(0.0, step.activations_mb - step.large_activations_mb - step.heap_state_mb)
    return {"kept_mb": round(growth - tensors, 1), "churn_mb": round(churn, 1)}


def runtime_overhead() -> dict[str, float]:
    """The resident size of a training process before its model: Python and the libraries a run imports
    (the current resident set, not ru_maxrss: Linux carries the parent's high-water mark across fork and exec)."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import tunelab.experiment.worker  # noqa: F401
    import tunelab.experiment.runner  # noqa: F401
    from tunelab.train.tracking import current_rss_mb

    return {"runtime_overhead_mb": round(current_rss_mb(), 1)}


def main(args: list[str]) -> int:
    """`overhead`, or `PRECISION ROWS`: prints one JSON object."""
    print(json.dumps(runtime_overhead() if args == ["overhead"] else allocator_point(args[0], int(args[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
