"""Measure single speed levers of tunelab's training step, A against B, on the packaged model.

    python benchmarks/levers.py [--steps 10] [--rounds 3] [--method full]

Each lever is timed as the median step time over the same batches, alternating A and B in rounds so that
machine drift hits both; it prints one ratio per lever. Model loading and warm-up steps are not timed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tunelab
from tunelab.runner import setup_method
from tunelab.train.batches import collate, epoch_batches
from tunelab.train.setup import build_optimizer


def step_times(setup, job, batches, steps: int, pad_multiple: int) -> list[float]:
    model, optimizer = setup.model, setup.optimizer
    times = []
    for rows in batches[:steps]:
        started = time.perf_counter()
        batch = collate(job.train, rows, setup.accelerator.device, pad_multiple)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def compare(name: str, variants: dict, setup, job, args) -> dict:
    """variants: label → (batches, pad_multiple, optimizer or None)."""
    samples = {label: [] for label in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for label in order:
            batches, pad_multiple, optimizer = variants[label]
            if optimizer is not None:
                setup.optimizer = optimizer
            step_times(setup, job, batches, 2, pad_multiple)  # warm-up: allocator and kernels
            samples[label] += step_times(setup, job, batches[2:], args.steps, pad_multiple)
    medians = {label: statistics.median(values) for label, values in samples.items()}
    a, b = list(medians)
    print(f"{name:<34} {a}: {medians[a]:.3f} s/step   {b}: {medians[b]:.3f} s/step   "
          f"{a} is {medians[b] / medians[a]:.3f}x the speed of {b}", flush=True)
    return medians


def padded_tokens(job, batches, pad_multiple: int) -> float:
    widths = [-(-int(job.train.lengths[b].max()) // pad_multiple) * pad_multiple for b in batches]
    return sum(w * len(b) for w, b in zip(widths, batches)) / sum(len(b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="full")
    args = parser.parse_args()
    job = tunelab.validate(None, [f"methods={args.method}", "data.max_train_samples=2000"])
    setup = setup_method(job, args.method)
    cfg = job.config.train
    bucketed = epoch_batches(job.train.lengths, cfg.batch_size, cfg.seed, 0, cfg.bucket_size)
    plain = epoch_batches(job.train.lengths, cfg.batch_size, cfg.seed, 0, 1)
    print(f"padded tokens per row over an epoch: buckets {padded_tokens(job, bucketed, 8):.1f}, "
          f"buckets without rounding {padded_tokens(job, bucketed, 1):.1f}, random batches "
          f"{padded_tokens(job, plain, 8):.1f}; real {job.train.lengths.mean():.1f}")
    compare("bucketed vs random batches", {"buckets": (bucketed, 8, None), "random": (plain, 8, None)},
            setup, job, args)
    compare("pad to multiple of 8 vs exact", {"exact": (bucketed, 1, None), "x8": (bucketed, 8, None)},
            setup, job, args)
    params = [p for p in setup.model.parameters() if p.requires_grad]
    fused = build_optimizer([{"name": "all", "params": params, "lr": 1e-5}])  # torch keeps each group dict
    foreach = torch.optim.AdamW([{"params": params, "lr": 1e-5}], foreach=True)
    compare("fused vs foreach AdamW", {"fused": (bucketed, 8, fused), "foreach": (bucketed, 8, foreach)},
            setup, job, args)


if __name__ == "__main__":
    main()
