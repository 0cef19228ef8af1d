"""tunelab's training loop against transformers' Trainer, on the same job, method by method.

    python benchmarks/vs_trainer.py                      # 4 methods x 3 systems, ~15 min on a 2-core CPU
    python benchmarks/vs_trainer.py --steps 2 --train-samples 64 --eval-samples 32 --methods full,lora

Systems: B1 = Trainer as a plain user writes it (fp32, random order, DataCollatorWithPadding); B1-bf16 = the
same in bf16; B2 = Trainer with its best flags for this machine (length-grouped sampling, bf16 only where bf16
is fast); tunelab = tunelab's own loop with its defaults; tunelab-2p = the same as two DDP processes of one
thread each (torchrun); tunelab-compiled = tunelab with train.compile (reduce-overhead on CUDA, default on a
CPU), its time including the compiling. Which of them run, and the targets checked, follow the hardware case detected
(benchmarks/cases.py). Each (method, system) pair runs in a fresh subprocess
(benchmarks/_children.py) that prints one JSON line; this script measures the machine's matmul peak,
derives throughput and MFU, prints a table and writes benchmarks/results/vs_trainer-<timestamp>.json.
See benchmarks/README.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean, median

import torch

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_children.py"
sys.path.insert(0, str(HERE))
from cases import (SYSTEMS, TRAINERS, CASES, check_targets, hardware_case, round_key, targets_text,  # noqa: E402
                   wanted)

DEFAULT_STEPS, LARGE_STEPS = 30, 200  # 200 > one epoch of 2000 rows at batch 16: covers the epoch rollover
FULL_BACKWARD = {"full", "llrd"}  # methods whose backward also computes weight gradients of every layer


# Settings both sides must share: the benchmark sets them for tunelab and Trainer alike (the flag in brackets),
# so an --override of one would change tunelab's run alone
OWNED = {"methods": "--methods", "train.batch_size": "--batch-size", "train.max_steps": "--steps",
         "train.seed": "--seed/--seeds", "train.device": "--device", "train.threads": "--threads",
         "data.max_length": "--max-length", "data.max_train_samples": "--train-samples",
         "data.max_eval_samples": "--eval-samples", "train.weight_decay": "", "train.max_grad_norm": "",
         "train.warmup_ratio": "", "train.gradient_accumulation_steps": "", "train.precision": "--systems",
         "train.gradient_checkpointing": "", "train.fsdp": "", "train.eval_every_steps": "",
         "train.early_stopping_patience": ""}


def owned_overrides(overrides: list[str]) -> list[str]:
    keys = [item.partition("=")[0].strip() for item in overrides]
    return [f"{key} (the benchmark sets it for every system{': use ' + OWNED[key] if OWNED[key] else ''})"
            for key in keys if key in OWNED]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per run (default {DEFAULT_STEPS}, or {LARGE_STEPS} with --large)")
    p.add_argument("--large", action="store_true", help="a bigger run: more steps unless --steps is given")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=400)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, one full set of runs each (replaces --seed); with more than one, "
                        "a paired accuracy summary (tunelab minus each Trainer system, seed by seed) is printed")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each (method, seed) set this many times back to back, the system order alternating; "
                        "targets then use the median of the per-round time ratios (a shared VM's speed drifts)")
    p.add_argument("--systems", default=None, help=f"comma-separated subset of {','.join(SYSTEMS)} "
                   "(default: what the detected hardware case's targets need)")
    p.add_argument("--methods", default="full,llrd,lora,prompt-tuning")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a tunelab config override for every run, e.g. model.name_or_path=DIR or data.train_file=F "
                        "(repeatable; keys the benchmark sets for every system, such as train.batch_size, are "
                        "refused: an override reaches tunelab's runs only)")
    args = p.parse_args(argv)
    if owned_overrides(args.override):
        p.error("--override: " + "; ".join(owned_overrides(args.override)))
    args.steps = args.steps or (LARGE_STEPS if args.large else DEFAULT_STEPS)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch finds no CUDA device on this machine")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    args.case = hardware_case(args.device)
    args.systems = ([s.strip() for s in args.systems.split(",") if s.strip()] if args.systems
                    else [s for s in CASES[args.case]["systems"] if s != "B1-bf16" or bf16_runs(args.device)])
    if "B1-bf16" in args.systems and not bf16_runs(args.device):
        p.error("--systems: B1-bf16 needs a GPU with bf16; this one has none")
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown or "tunelab" not in args.systems:
        p.error(f"--systems: {','.join(unknown) or 'tunelab missing'}; choose from {','.join(SYSTEMS)}, "
                "tunelab included (ratios are against it)")
    return args


def bf16_runs(device: str) -> bool:
    """Trainer refuses bf16=True on a GPU without it (a V100); on a CPU it runs, emulated where it must be."""
    return device != "cuda" or torch.cuda.is_bf16_supported()


def plan(methods: list[str], seeds: list[int], systems: list[str],
         repeats: int = 1) -> list[tuple[str, str, int, int]]:
    """Every (method, system, seed, repeat), the system order reversed every other run set, so that machine
    drift hits every system alike and each round's systems run minutes apart."""
    ordered = [s for s in SYSTEMS if s in systems]
    sets = [(m, seed, rep) for seed in seeds for m in methods for rep in range(repeats)]
    return [(m, s, seed, rep) for i, (m, seed, rep) in enumerate(sets)
            for s in (ordered if i % 2 == 0 else ordered[::-1]) if wanted(m, s)]


# ---------------------------------------------------------------- machine peak and model FLOPs

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, min_s: float = 0.3) -> float:
    """Best FLOP/s over a few matmuls of the model's own shapes (and a large square one on GPUs)."""
    shapes = [(2048, 384, 1536), (1024, 1024, 1024)] + ([(8192, 8192, 8192)] if device == "cuda" else [])
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b  # warm-up: kernel selection and first-touch allocation are not the steady state
        sync(device)
        reps, started = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - started < min_s:  # >= 2 reps: emulated bf16 is ~1 s each
            a @ b
            reps += 1
            sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - started))
    return best


def encoder_matmul_params(model_path: str) -> int:
    """Weights of every nn.Linear inside the transformer blocks: the matmuls each token goes through.

    Embeddings are lookups, not matmuls; the pooler and classifier run once per sequence, not per token.
    """
    from tunelab.models.loading import skeleton
    from tunelab.models.structure import find_block_list
    from tunelab.tasks.base import get_task

    # meta device: no weights loaded; two labels, as the head is outside the blocks anyway
    structure, _ = skeleton(model_path, get_task("classification"), {"labels": ["0", "1"]})
    _, blocks = find_block_list(structure)
    return sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))


# ---------------------------------------------------------------- runs

def child_env(threads: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")  # tokenizer threads would compete with torch's
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(args, method: str, system: str, seed: int, repeat: int) -> dict:
    # tunelab-2p is two processes of one thread each, whatever --threads gives the one-process systems
    threads = 1 if system == "tunelab-2p" else args.threads
    spec = {"method": method, "system": system, "steps": args.steps, "batch_size": args.batch_size,
            "max_length": args.max_length, "train_samples": args.train_samples,
            "eval_samples": args.eval_samples, "seed": seed, "device": args.device, "threads": threads,
            "overrides": args.override}
    # tunelab-2p: torchrun's two workers (one thread each, its default); rank 0 prints the result
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
        if system == "tunelab-2p" else [sys.executable]
    proc = subprocess.run([*launcher, str(CHILD), json.dumps(spec)], capture_output=True, text=True,
                          env=child_env(threads), cwd=HERE.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"method": method, "system": system, "seed": seed, "repeat": repeat,
                "error": f"exit code {proc.returncode}", "log_tail": tail}
    return {**json.loads(lines[-1][len("RESULT "):]), "seed": seed, "repeat": repeat}


def derive(r: dict, peaks: dict, matmul_params: int, steps: int, bf16_native: bool) -> None:
    """Throughput and MFU from a child's raw counts (see README for the formula). MFU against the bf16 peak
    only where bf16 is native: against an emulated peak it would read in the thousands of percent."""
    if "error" in r:
        return
    t = r["train_s"]
    factor = 6 if r["method"] in FULL_BACKWARD else 4
    flop_tokens = r["tokens"] + r["samples"] * r["virtual_tokens_per_sample"]
    achieved = factor * matmul_params * flop_tokens / t
    r.update(samples_per_s=r["samples"] / t, tokens_per_s=r["tokens"] / t, flops_per_token_factor=factor,
             train_flops=factor * matmul_params * flop_tokens, achieved_flops_per_s=achieved,
             mfu_pct=100 * achieved / peaks[r["flags"]["precision"]],
             mfu_vs_bf16_pct=100 * achieved / peaks["bf16"] if bf16_native else None,
             steps_ok=r["steps_done"] == steps)


def add_ratios(results: list[dict]) -> dict:
    """time(system) / time(tunelab) for the same method, seed and round: > 1 means tunelab was faster."""
    ratios = {}
    for key in dict.fromkeys(round_key(r) for r in results):
        method, seed, repeat = key
        same = [r for r in results if round_key(r) == key]
        times = {r["system"]: r.get("train_s") for r in same}
        base = times.get("tunelab")
        ratio = {s: times[s] / base if base and times.get(s) else None for s in times}
        label = f"{method} seed {seed}" + (f" round {repeat + 1}" if repeat else "")
        ratios[label] = {f"{s}/tunelab": ratio[s] for s in SYSTEMS if s in ratio and s != "tunelab"}
        for r in same:
            r["time_ratio_vs_tunelab"] = ratio[r["system"]]
    return ratios


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, (variance / len(values)) ** 0.5


def t_interval(mean: float, se: float, n: int) -> tuple[float, float]:
    """The 95 % interval of a mean over n paired seeds (Student's t, n - 1 degrees of freedom); NaN for n < 2."""
    if n < 2 or se != se:
        return float("nan"), float("nan")
    from scipy import stats

    half = stats.t.ppf(0.975, n - 1) * se
    return mean - half, mean + half


def paired_summary(results: list[dict]) -> list[dict]:
    """Per method and Trainer system, over the seeds where both it and tunelab finished: mean accuracy of
    each, the mean of the per-seed differences (tunelab minus Trainer) with its standard error, and the
    median time ratio over every seed and round. Pairing by seed removes the data-split variance the two share."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        # accuracy is the same in every round (seeded), so the first round stands for the seed
        ok = {(r["system"], r["seed"]): r for r in results
              if r["method"] == method and "error" not in r and round_key(r)[2] == 0}
        for system in (*TRAINERS, "tunelab-2p"):
            seeds = sorted(seed for (s, seed) in ok if s == system and ("tunelab", seed) in ok)
            if not seeds:
                continue
            acc = lambda s, seed: ok[(s, seed)]["val"]["accuracy"]
            diff_mean, diff_se = mean_se([acc("tunelab", seed) - acc(system, seed) for seed in seeds])
            low, high = t_interval(diff_mean, diff_se, len(seeds))
            rows.append({"method": method, "vs": system, "seeds": seeds,
                         "acc_tunelab": fmean(acc("tunelab", seed) for seed in seeds),
                         "acc_other": fmean(acc(system, seed) for seed in seeds),
                         "acc_diff": diff_mean, "acc_diff_se": diff_se, "acc_diff_ci95": [low, high],
                         # the issue's bar, "accuracy >= Trainer's - 1 point", is shown only where the whole
                         # interval clears it; a mean above it with a wide interval shows nothing yet
                         "within_one_point": None if low != low else low >= -0.01,
                         "time_ratio": median(r["time_ratio_vs_tunelab"] for r in results
                                              if (r["method"], r["system"]) == (method, system)
                                              and r.get("time_ratio_vs_tunelab")),
                         "rss_diff_mb": fmean(ok[("tunelab", seed)]["train_peak_rss_mb"]
                                              - ok[(system, seed)]["train_peak_rss_mb"] for seed in seeds)})
    return rows


def summary_table(rows: list[dict]) -> str:
    lines = ["method        vs  seeds  acc(tunelab)  acc(other)  diff (tunelab-other) ± SE  95 % interval, points"
             "  >= -1 point  time ratio  RSS diff MB"]
    for r in rows:
        low, high = r["acc_diff_ci95"]
        bar = {None: "n/a", True: "shown", False: "not shown"}[r["within_one_point"]]
        lines.append(f"{r['method']:<13} {r['vs']:<3} {len(r['seeds']):>5}  {r['acc_tunelab']:>12.4f}  "
                     f"{r['acc_other']:>10.4f}  {r['acc_diff']:>+14.4f} ± {r['acc_diff_se']:.4f}  "
                     f"[{100 * low:+6.1f}, {100 * high:+6.1f}]       {bar:>11}  "
                     f"{r['time_ratio']:>9.2f}x  {r['rss_diff_mb']:>+11.0f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- output

# (header, width, format): numbers right-aligned, text left-aligned
# steady ms: per step after the first fifth of the steps (compiling done), tunelab systems only
COLUMNS = [("method", 13, "<"), ("system", 16, "<"), ("seed", 4, "d"), ("flags", 20, "<"), ("time s", 7, ".1f"),
           ("samples/s", 9, ".2f"), ("tokens/s", 8, ".0f"), ("RSS MB", 6, ".0f"), ("val acc", 7, ".3f"),
           ("MFU %", 6, ".1f"), ("MFU%bf16", 8, ".1f"), ("t/t(tl)", 7, ".2f"), ("steady ms", 9, ".1f")]


def row(r: dict) -> list:
    if "error" in r:
        return [r["method"], r["system"], r["seed"], "FAILED: " + r["error"]]
    ratio = r["time_ratio_vs_tunelab"]
    flags = f"{r['flags']['precision']} {r['flags']['sampler'].replace('tunelab buckets of ', 'buckets')}"
    return [r["method"], r["system"], r["seed"], flags, r["train_s"], r["samples_per_s"], r["tokens_per_s"],
            r["train_peak_rss_mb"], r["val"]["accuracy"], r["mfu_pct"], nan_if_none(r["mfu_vs_bf16_pct"]),
            nan_if_none(ratio), nan_if_none(r.get("steady_step_s") and 1e3 * r["steady_step_s"])]


def nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def table(results: list[dict]) -> str:
    head = " ".join(f"{name:{'<' if fmt == '<' else '>'}{width}}" for name, width, fmt in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in results:
        cells = zip(COLUMNS, row(r))  # a failed run has only four cells
        lines.append(" ".join(f"{v:{'<' if fmt == '<' else '>'}{width}{'' if fmt == '<' else fmt}}"
                              for (_, width, fmt), v in cells))
    return "\n".join(lines)


def machine(args, peaks: dict) -> dict:
    from tunelab.train.setup import cpu_has_fast_bf16

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": args.device, "python": platform.python_version(), "torch": torch.__version__,
            "matmul_peak_flops_per_s": peaks, "cpu_fast_bf16": cpu_has_fast_bf16()}
    if args.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), gpu_bf16=torch.cuda.is_bf16_supported())
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tunelab.config import load_config
    from tunelab.models.loading import resolve_model_path

    model_name = load_config(None, args.override).model_name  # the task's default model when not set
    matmul_params = encoder_matmul_params(resolve_model_path(model_name))
    peaks = {"fp32": matmul_peak(args.device, torch.float32), "bf16": matmul_peak(args.device, torch.bfloat16)}
    print(f"hardware case: {args.case} ({CASES[args.case]['about']}); systems: {', '.join(args.systems)}",
          file=sys.stderr)
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; "
          f"encoder matmul params {matmul_params:,}", file=sys.stderr)
    runs = plan(args.methods, args.seeds, args.systems, args.repeats)
    results, bf16_native = [], args.case != "cpu-no-fast-bf16"
    for i, (method, system, seed, repeat) in enumerate(runs, 1):
        started = time.perf_counter()
        results.append(run_child(args, method, system, seed, repeat))
        derive(results[-1], peaks, matmul_params, args.steps, bf16_native)
        round_text = f" round {repeat + 1}" if args.repeats > 1 else ""
        print(f"[{i}/{len(runs)}] {method} {system} seed {seed}{round_text}: {results[-1].get('error', 'ok')} "
              f"({time.perf_counter() - started:.0f} s with loading and evaluation)", file=sys.stderr)
    ratios = add_ratios(results)
    print(table(results))
    targets = check_targets(results, args.case)
    print(f"\nhardware case: {args.case}\n" + targets_text(targets, args.case))
    summary = paired_summary(results)
    if len(args.seeds) > 1:
        print("\nValidation accuracy over seeds, paired by seed:\n" + summary_table(summary))
    out = HERE / "results" / dt.datetime.now().strftime("vs_trainer-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "machine": machine(args, peaks), "encoder_matmul_params": matmul_params,
               "case": args.case, "targets": targets, "ratios": ratios, "paired_summary": summary, "runs": results}
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwritten: {out.relative_to(HERE.parent)}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
