"""Time freeze's epochs with the frozen-bottom cache on and off, on the packaged encoder (all-MiniLM-L6-v2).

    python benchmarks/freeze_cache.py [--train-samples 2000] [--ks 0,1,2] [--precision auto] [--threads N]

For each k it builds two fresh, identical setups, freeze.cache=true and freeze.cache=false, and trains both
for two epochs through the loop's own step (collate, autocast forward, backward, clip, AdamW, schedule) in
the loop's batch order. The two take their steps in turn (which one goes first alternates), so load from
other processes hits both alike. It prints every epoch's time (the sum of its steps) and the ratio epoch-2
uncached / epoch-2 cached (the issue's target: at least 3x for k <= 2). Evaluation and model loading are not
timed. It also prints what the cache holds, and what it would hold for the whole packaged job.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import tunelab
from tunelab.experiment.runner import setup_method
from tunelab.methods.freeze import FrozenBottomModel
from tunelab.models.structure import hidden_size
from tunelab.train.batches import collate, epoch_batches
from tunelab.train.setup import cpu_has_fast_bf16


def cpu_case() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ("+".join(found) if found else "no avx512_bf16/amx_bf16") + f", {torch.get_num_threads()} threads"


def step_time(job, setup, rows) -> float:
    model, cfg = setup.model, job.config.train
    started = time.perf_counter()
    batch = collate(job.train, rows, setup.accelerator.device)
    with setup.accelerator.autocast():
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def interleaved_epochs(job, setups: dict[bool, object]) -> dict[bool, list[float]]:
    """Two epochs of every setup, one step of each in turn; the time of each epoch per setup."""
    cfg = job.config.train
    times = {cache: [0.0, 0.0] for cache in setups}
    for epoch in (0, 1):
        for i, rows in enumerate(epoch_batches(job.train.lengths, cfg.batch_size, cfg.seed, epoch, cfg.bucket_size)):
            for cache in (sorted(setups) if i % 2 else sorted(setups, reverse=True)):
                times[cache][epoch] += step_time(job, setups[cache], rows)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-samples", type=int, default=2000, help="data.max_train_samples (packaged: 2000)")
    parser.add_argument("--ks", default="0,1,2", help="comma-separated freeze.k values")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = [f"data.max_train_samples={args.train_samples}", "methods=freeze", "train.epochs=2",
            f"train.precision={args.precision}"]
    results = {}
    load_before = os.getloadavg()[0]
    for k in [int(x) for x in args.ks.split(",")]:
        setups = {}
        for cache in (True, False):
            job = tunelab.validate(None, [*base, f"freeze.k={k}", f"freeze.cache={str(cache).lower()}"])
            setups[cache] = setup_method(job, "freeze")
            setups[cache].model.train()
        times = interleaved_epochs(job, setups)
        model: FrozenBottomModel = setups[True].accelerator.unwrap_model(setups[True].model)
        stored = model.cache_nbytes
        element = next(iter(model.cache.values())).element_size() if model.cache else 4
        for cache in (True, False):
            results[k, cache] = times[cache]
            print(f"k={k} cache={'on ' if cache else 'off'} epoch 1 {times[cache][0]:7.1f} s  epoch 2 "
                  f"{times[cache][1]:7.1f} s", flush=True)
        print(f"     cache: {model.cache_status}; {len(model.cache)} rows, {stored / 2**20:.1f} MiB", flush=True)
        setup = setups[True]
    cfg = job.config.train
    precision = setup.accelerator.mixed_precision
    print(f"\nall-MiniLM-L6-v2, {len(job.train)} train rows (mean {job.train.lengths.mean():.1f} tokens), batch "
          f"{cfg.batch_size}, precision {'bf16' if precision == 'bf16' else 'fp32'} "
          f"(fast bf16 CPU: {cpu_has_fast_bf16()}); CPU: {cpu_case()}; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'k':>2} | {'cached e1':>9} | {'cached e2':>9} | {'plain e1':>9} | {'plain e2':>9} | "
          f"{'e2 plain/cached':>15} | {'e1 cached/plain':>15}")
    for k in sorted({k for k, _ in results}):
        (c1, c2), (p1, p2) = results[k, True], results[k, False]
        print(f"{k:>2} | {c1:8.1f}s | {c2:8.1f}s | {p1:8.1f}s | {p2:8.1f}s | {p2 / c2:14.2f}x | {c1 / p1:14.2f}x")
    full = tunelab.validate(None, ["methods=freeze"])  # the packaged job: what the cache costs there
    tokens = int(full.train.lengths.sum())
    width = hidden_size(full.load_base_model().config)
    print(f"\ncache here: {stored / 2**20:.1f} MiB ({element} bytes per value). Packaged job: {len(full.train)} rows, "
          f"{tokens} real tokens (mean {np.mean(full.train.lengths):.1f}) x hidden {width} x {element} B = "
          f"{tokens * width * element / 2**20:.0f} MiB ({tokens * width * element / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
