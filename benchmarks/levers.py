"""Measure single speed levers of tunelab's training step, A against B, on the packaged model.

    python benchmarks/levers.py [--steps 10] [--rounds 3] [--method full] [--only threads,dropout,head_row] [--compile]

Each lever is timed as the median step time over the same batches, alternating A and B in rounds so that
machine drift hits both; it prints one ratio per lever. Model loading and warm-up steps are not timed.
`--compile` adds torch.compile against eager; it is off by default because compiling takes minutes here.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import tunelab
from tunelab.experiment.runner import setup_method
from tunelab.train import fast_dropout
from tunelab.train.batches import collate, epoch_batches
from tunelab.train.head_row import HeadRowOnly
from tunelab.train.setup import build_optimizer


@dataclass
class Variant:
    batches: list
    pad_multiple: int = 8
    optimizer: torch.optim.Optimizer | None = None
    setting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    forward: Callable | None = None  # replaces model(**batch), e.g. a compiled model


def step_times(setup, job, variant: Variant, rows_list, steps: int) -> list[float]:
    model = setup.model
    # a compiled module has no truth value (it forwards len() to the model), so test for None
    forward = model if variant.forward is None else variant.forward
    optimizer = variant.optimizer or setup.optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    times = []
    with variant.setting():
        for rows in rows_list[:steps]:
            started = time.perf_counter()
            batch = collate(job.train, rows, setup.accelerator.device, variant.pad_multiple)
            loss = forward(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
    return times


def compare(name: str, variants: dict[str, Variant], setup, job, args) -> dict:
    samples = {label: [] for label in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for label in order:
            variant = variants[label]
            step_times(setup, job, variant, variant.batches, 2)  # warm-up: allocator and kernels
            samples[label] += step_times(setup, job, variant, variant.batches[2:], args.steps)
    medians = {label: statistics.median(values) for label, values in samples.items()}
    a, b = list(medians)
    print(f"{name:<34} {a}: {medians[a]:.3f} s/step   {b}: {medians[b]:.3f} s/step   "
          f"{a} is {medians[b] / medians[a]:.3f}x the speed of {b}", flush=True)
    return medians


def padded_tokens(job, batches, pad_multiple: int) -> float:
    widths = [-(-int(job.train.lengths[b].max()) // pad_multiple) * pad_multiple for b in batches]
    return sum(w * len(b) for w, b in zip(widths, batches)) / sum(len(b) for b in batches)


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module):
    # BERT's attention passes its nn.Dropout's p to SDPA, so this turns every dropout off.
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    before = [m.p for m in layers]
    for m in layers:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in zip(layers, before):
            m.p = p


@contextlib.contextmanager
def attention(model: torch.nn.Module, implementation: str):
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def lever_buckets(setup, job, args, bucketed, plain):
    compare("bucketed vs random batches", {"buckets": Variant(bucketed), "random": Variant(plain)},
            setup, job, args)


def lever_padding(setup, job, args, bucketed, plain):
    compare("pad to multiple of 8 vs exact", {"exact": Variant(bucketed, 1), "x8": Variant(bucketed, 8)},
            setup, job, args)


def lever_adamw(setup, job, args, bucketed, plain):
    params = [p for p in setup.model.parameters() if p.requires_grad]
    fused = build_optimizer([{"name": "all", "params": params, "lr": 1e-5}])  # torch keeps each group dict
    foreach = torch.optim.AdamW([{"params": params, "lr": 1e-5}], foreach=True)
    compare("fused vs foreach AdamW", {"fused": Variant(bucketed, optimizer=fused),
                                       "foreach": Variant(bucketed, optimizer=foreach)}, setup, job, args)


def lever_threads(setup, job, args, bucketed, plain):
    """One thread per step bounds what two single-threaded processes (data parallel) could reach:
    2 x t(2 threads) / t(1 thread) samples for each sample now, before any gradient all-reduce."""
    two = torch.get_num_threads()
    medians = compare(f"{two} threads vs 1 thread", {f"{two}thr": Variant(bucketed),
                                                     "1thr": Variant(bucketed, setting=lambda: threads(1))},
                      setup, job, args)
    print(f"{'':<34} bound for {two} processes x 1 thread: "
          f"{two * medians[f'{two}thr'] / medians['1thr']:.3f}x the throughput of 1 process", flush=True)


def lever_dropout(setup, job, args, bucketed, plain):
    compare("dropout off vs on (bound)", {"off": Variant(bucketed, setting=lambda: dropout_off(setup.model)),
                                          "on": Variant(bucketed)}, setup, job, args)


@contextlib.contextmanager
def cheaper_dropout(model: torch.nn.Module, device, positions: bool = True):
    """The training loop's CPU dropout; with positions=False every mask is the mask of 32-bit words."""
    before = fast_dropout.SPARSE_UP_TO
    fast_dropout.SPARSE_UP_TO = before if positions else -1.0
    try:
        with fast_dropout.cheaper_cpu_dropout(model, device):
            yield
    finally:
        fast_dropout.SPARSE_UP_TO = before


def lever_masks(setup, job, args, bucketed, plain):
    model, device = setup.model, setup.accelerator.device
    compare("dropout positions vs word masks",
            {"positions": Variant(bucketed, setting=lambda: cheaper_dropout(model, device)),
             "words": Variant(bucketed, setting=lambda: cheaper_dropout(model, device, positions=False))},
            setup, job, args)


def lever_attention(setup, job, args, bucketed, plain):
    model = setup.model
    compare("SDPA vs eager attention", {"sdpa": Variant(bucketed, setting=lambda: attention(model, "sdpa")),
                                        "eager": Variant(bucketed, setting=lambda: attention(model, "eager"))},
            setup, job, args)


def lever_head_row(setup, job, args, bucketed, plain):
    head_row = HeadRowOnly.for_model(setup.accelerator.unwrap_model(setup.model))
    print(f"{'':<34} the last block is cut at: {head_row.cut_name or 'nowhere (not applicable)'}", flush=True)
    model, device = setup.model, setup.accelerator.device

    @contextlib.contextmanager
    def cut():
        with cheaper_dropout(model, device), head_row.active():
            yield
    # both with the loop's CPU dropout, as training runs
    compare("last block on the head's row vs whole", {"cut": Variant(bucketed, setting=cut),
             "whole": Variant(bucketed, setting=lambda: cheaper_dropout(model, device))}, setup, job, args)


def lever_compile(setup, job, args, bucketed, plain):
    compiled = torch.compile(setup.model, dynamic=True)
    started = time.perf_counter()
    step_times(setup, job, Variant(bucketed, forward=compiled), bucketed, 6)  # compiles; a few shapes
    print(f"{'torch.compile':<34} compiling and the first 6 steps: {time.perf_counter() - started:.1f} s",
          flush=True)
    compare("torch.compile vs eager", {"compiled": Variant(bucketed, forward=compiled), "eager": Variant(bucketed)},
            setup, job, args)


def plain_eval_seconds(model, data, batch_size: int, device) -> float:
    """Evaluation as Trainer does it by default: batches of 8 in data order, padded to the longest row,
    under no_grad."""
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate(data, np.arange(start, min(start + batch_size, len(data))), device, 1)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    return time.perf_counter() - started


def lever_eval(setup, job, args, bucketed, plain):
    model, device, data = setup.model, setup.accelerator.device, job.validation
    eval_setup = job.eval_setup(device, contextlib.nullcontext)  # no autocast, as plain_eval
    tunelab_s, plain_s = [], []

    def tunelab_eval():
        started = time.perf_counter()
        job.task.evaluate(model, data, eval_setup)
        tunelab_s.append(time.perf_counter() - started)

    def plain_eval():
        plain_s.append(plain_eval_seconds(model, data, 8, device))

    for round_index in range(args.rounds):  # alternating order, as compare() does
        for run in ((tunelab_eval, plain_eval) if round_index % 2 == 0 else (plain_eval, tunelab_eval)):
            run()
    a, b = statistics.median(tunelab_s), statistics.median(plain_s)
    print(f"{'eval: sorted x64 vs data order x8':<34} sorted64: {a:.2f} s   order8: {b:.2f} s   "
          f"sorted64 is {b / a:.3f}x the speed of order8 ({len(data)} rows)", flush=True)


LEVERS = {"buckets": lever_buckets, "padding": lever_padding, "adamw": lever_adamw, "threads": lever_threads,
          "dropout": lever_dropout, "masks": lever_masks, "head_row": lever_head_row,
          "attention": lever_attention, "eval": lever_eval,
          "compile": lever_compile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="full")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(LEVERS)}")
    parser.add_argument("--compile", action="store_true", help="include torch.compile (minutes to compile)")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else [k for k in LEVERS if k != "compile" or args.compile]
    job = tunelab.validate(None, [f"methods={args.method}", "data.max_train_samples=2000"])
    setup = setup_method(job, args.method)
    setup.model.train()  # as the loop trains: a loaded model starts in eval mode (no dropout)
    cfg = job.config.train
    bucketed = epoch_batches(job.train.lengths, cfg.batch_size, cfg.seed, 0, cfg.bucket_size)
    plain = epoch_batches(job.train.lengths, cfg.batch_size, cfg.seed, 0, 1)
    print(f"padded tokens per row over an epoch: buckets {padded_tokens(job, bucketed, 8):.1f}, "
          f"buckets without rounding {padded_tokens(job, bucketed, 1):.1f}, random batches "
          f"{padded_tokens(job, plain, 8):.1f}; real {job.train.lengths.mean():.1f}")
    for name in chosen:
        LEVERS[name](setup, job, args, bucketed, plain)


if __name__ == "__main__":
    main()
