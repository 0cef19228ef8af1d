"""This device's side of an estimate: what the runtime itself occupies, what its allocator keeps beyond the
tensors alive and how fast it multiplies, measured once (~15 s) and cached per device, precision, library
versions and preloaded allocator in tunelab's cache folder."""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import torch

from ..experiment.forkserver import run_captured, start_mode
from ..machine import cpu_name, keep_measurement, read_measurements, threads_per_process

PROFILES = "device-profiles.json"  # in the machine's cache folder
# what the allocator calibration trains (calibrate.py); a new version measures afresh instead of using a cache
STAND_IN = ("stand-in 4: 4-layer BERT, the loop's CPU dropout, bf16 softmax in its attention, its kept "
            "embedding gradient")
# Measured training throughput over this device's peak matmul rate, for small transformer steps on CPU
# (the packaged MiniLM job: 0.41 TFLOP/s achieved against 0.80 peak bf16, 2 cores of an AMD EPYC Zen 5).
CPU_EFFICIENCY = 0.5
GPU_EFFICIENCY = 0.4


@contextlib.contextmanager
def one_process_threads(train_cfg, nproc: int):
    """The threads one of `nproc` processes on this CPU trains with (cores / N, as `--nproc` shares them out,
    unless train.threads or OMP_NUM_THREADS says otherwise): the rate and what the allocator keeps are that
    process's. The calibration child inherits them through OMP_NUM_THREADS."""
    if nproc == 1 or train_cfg.threads or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    before = torch.get_num_threads()
    threads = threads_per_process(nproc)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        del os.environ["OMP_NUM_THREADS"]


def device_profile(train_cfg, precision: str) -> dict[str, Any]:
    from ..train.setup import resolve_device

    kind = resolve_device(train_cfg)
    if kind == "cuda" and not torch.cuda.is_available():
        return absent_gpu_profile(precision)
    name = torch.cuda.get_device_name(0) if kind == "cuda" else cpu_name()
    # a preloaded allocator (jemalloc, tcmalloc) keeps memory differently from glibc's
    # and a process forked from one that imported the libraries has touched fewer of their pages
    key = (f"{kind}|{name}|{precision}|torch {torch.__version__}|threads {torch.get_num_threads()}"
           f"|preload {os.environ.get('LD_PRELOAD', '')}|{STAND_IN}|{start_mode()}")
    profile = read_measurements(PROFILES).get(key)
    if profile is None:
        profile = {"peak_flops": matmul_flops(kind, precision), "runtime_overhead_mb": runtime_overhead_mb(kind),
                   **allocator_keeping(kind, precision)}
        keep_measurement(PROFILES, key, profile)
    efficiency = GPU_EFFICIENCY if kind == "cuda" else CPU_EFFICIENCY
    return {"kind": kind, "name": name, "present": True, "precision": precision, **profile,
            "efficiency": efficiency, "effective_flops": profile["peak_flops"] * efficiency}


def absent_gpu_profile(precision: str) -> dict[str, Any]:
    """train.device=cuda on a machine without one: planning a GPU job from a laptop. Memory as the CUDA
    allocator counts it (tensors only: no runtime part, nothing kept), the step run on the CPU's fake tensors
    (the attention kernel can differ where dropout is on); no time, since there is no GPU to measure."""
    return {"kind": "cuda", "name": "a CUDA device (not on this machine: memory only)", "present": False,
            "precision": precision, "peak_flops": None, "runtime_overhead_mb": 0.0, "allocator_fixed_mb": 0.0,
            "allocator_per_churn_mb": 0.0, "efficiency": GPU_EFFICIENCY, "effective_flops": None}


def matmul_flops(kind: str, precision: str, size: int = 1024, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of square matmuls in the training precision."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=kind)
    b = torch.randn(size, size, dtype=dtype, device=kind)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if kind == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start)


def runtime_overhead_mb(kind: str) -> float:
    """What a new training process holds before the model: Python, torch, transformers, peft (on CUDA: the
    allocator starts empty, so nothing)."""
    if kind == "cuda":
        return 0.0
    return calibrated(run_captured, ["overhead"], "runtime overhead probe")["runtime_overhead_mb"]


def allocator_keeping(kind: str, precision: str, run_module=run_captured) -> dict[str, float]:
    """What the allocator keeps beyond the tensors alive: a fixed part and a part per MB of churn (heap-sized
    activations less the gradients and optimizer state that settle in their space), fitted through the
    stand-in job at two batch sizes (see calibrate.py). CUDA's measured peak is the caching allocator's own
    count of tensors, so nothing is added there."""
    if kind == "cuda":
        return {"allocator_fixed_mb": 0.0, "allocator_per_churn_mb": 0.0}
    stand_in = calibration_precision(precision)
    small, large = (calibration_point(stand_in, rows, run_module) for rows in (8, 32))
    slope = max(0.0, (large["kept_mb"] - small["kept_mb"]) / (large["churn_mb"] - small["churn_mb"]))
    return {"allocator_fixed_mb": round(max(0.0, small["kept_mb"] - slope * small["churn_mb"]), 1),
            "allocator_per_churn_mb": round(slope, 3),
            **({} if stand_in == precision else {"allocator_note": EMULATED_BF16_NOTE})}


# measured on the Zen 3 VM (AVX2): the 8-row bf16 stand-in took 203 s against 10 s in fp32, and the 32-row
# one would pass the 600 s a calibration process is given
EMULATED_BF16_NOTE = ("calibrated with the fp32 stand-in, whose kept memory may differ from bf16's: this CPU "
                      "emulates bf16 (no AMX or AVX512-BF16), so the bf16 stand-in would take over 10 minutes "
                      "(20x fp32), and bf16 training here is slower by as much")


def calibration_precision(precision: str) -> str:
    from ..train.setup import cpu_has_fast_bf16

    return "fp32" if precision == "bf16" and not cpu_has_fast_bf16() else precision


def calibration_point(precision: str, rows: int, run_module) -> dict[str, float]:
    return calibrated(run_module, [precision, str(rows)], "allocator calibration")


def calibrated(run_module, args: list[str], what: str) -> dict[str, float]:
    code, out, err = run_module("tunelab.estimate.calibrate", args, 600)
    if code:
        raise RuntimeError(f"{what} failed: {err.strip().splitlines()[-1:]}")
    return json.loads(out.strip().splitlines()[-1])
