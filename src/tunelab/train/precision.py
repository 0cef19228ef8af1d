"""`train.precision: auto`: the faster of fp32 and bf16 for this model and method on this device, measured.

bf16 is not always faster. Where the CPU lacks AMX and AVX512-BF16 its matmuls are emulated, 50-100×
slower than fp32 (measured with benchmarks/vs_trainer.py), so there fp32 is chosen without measuring. Where
bf16 is native, a small model's steps can still be slower in bf16 (an H200 trained the packaged MiniLM in
12.7 s in bf16 against 8.2 s in fp32: the casts and launches outweigh the matmuls). So there a few
forward+backward passes of the prepared model on a typical batch are timed in both, before training, and
bf16 must win by a clear margin (fp32 is exact and the default when they are close). The passes run as the
loop trains: every module in training mode and the loop's dropout. A freshly loaded base is in eval mode, and
with dropout off there a 2-core AMX Xeon timed LoRA at fp32 296 ms against bf16 310 ms, where training in bf16
is 1.5× faster. An adapter method's frozen weights are still fp32 then, so bf16 pays their casts (190 against
184 ms there): the probe leans slightly towards fp32. A clear decision is cached per device, model, method
options, gradient checkpointing, batch shape, thread count and library versions, so seeds and repeated runs
measure once; a near tie is not cached (it may be noise of a busy machine) and is measured again by the next
run.
"""
from __future__ import annotations

import contextlib
import hashlib
import time

import torch
import transformers
from torch import nn

from ..machine import cpu_name, keep_measurement, read_measurements
from ..config import TrainConfig
from .distributed import Ranks
from .fast_dropout import cheaper_cpu_dropout
from .setup import precision_choice

PROBE_STEPS = 2  # timed, after one warm-up; the smallest counts (noise only ever adds time)
BF16_MARGIN = 0.9  # bf16 is chosen when its step takes under 90 % of fp32's
CACHE = "precision.json"  # in the machine's cache folder
# part of the cache key, so decisions of an earlier probe are measured again: 2 measures in training mode (1 did
# not); 3 trains short bf16 attention without dropout through the math path, which made bf16 faster (Llama)
PROBE_VERSION = 3


def choose_precision(cfg: TrainConfig, model: nn.Module, batch: dict[str, torch.Tensor], key: str,
                     can_measure: bool = True, ranks: Ranks = Ranks()) -> tuple[str, str]:
    """`train.precision` resolved for this model: (fp32 | bf16, the reason recorded with the result). Under
    several processes (`ranks`) every one of them measures at once, as they will train, the slowest counts,
    and all of them decide alike: the main process alone reads and writes the cache."""
    chosen, reason = precision_choice(cfg)  # the device's rule
    if cfg.precision != "auto" or chosen == "fp32":
        return chosen, reason
    device = batch["input_ids"].device.type
    key = cache_key(key, device, batch, ranks.world)
    cached = ranks.broadcast(read_measurements(CACHE).get(key) if ranks.is_main else None)
    if cached:
        return cached["precision"], cached["reason"] + " (measured earlier for the same model, method and batch)"
    if not can_measure:
        return chosen, reason + " (not measured: a method a trial step would change, or a sharded model)"
    fp32_s, bf16_s = (max(times) for times in zip(*ranks.gather(
        [measured_together(ranks, model, batch, bf16) for bf16 in (False, True)])))
    chosen = "bf16" if bf16_s < BF16_MARGIN * fp32_s else "fp32"
    shape = "×".join(str(n) for n in batch["input_ids"].shape)
    reason = (f"auto: measured {PROBE_STEPS} forward+backward steps of a {shape} batch"
              + (f" in each of {ranks.world} processes (the slowest counts)" if ranks.world > 1 else "")
              + f": fp32 {fp32_s * 1e3:.0f} ms, bf16 {bf16_s * 1e3:.0f} ms per step")
    # a near tie (or a busy machine) is measured again
    if ranks.is_main and not BF16_MARGIN <= bf16_s / fp32_s <= 1 / BF16_MARGIN:
        keep_measurement(CACHE, key, {"precision": chosen, "reason": reason, "fp32_s": fp32_s, "bf16_s": bf16_s})
    return chosen, reason


def measured_together(ranks: Ranks, model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> float:
    """`step_seconds` with every process starting together: processes sharing a CPU's cores must be timed
    while the others run too, not while one of them is still loading its model."""
    ranks.barrier()
    return step_seconds(model, batch, bf16=bf16)


def step_seconds(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> float:
    """Fastest of PROBE_STEPS forward+backward passes; leaves weights, gradients and random state as they were."""
    device = batch["input_ids"].device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    times = []
    with training_mode(model), cheaper_cpu_dropout(model, device):
        for _ in range(PROBE_STEPS + 1):  # the first warms caches and kernels up
            start = sync_time(device)
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            times.append(sync_time(device) - start)
    for param in model.parameters():
        param.grad = None
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return min(times[1:])


@contextlib.contextmanager
def training_mode(model: nn.Module):
    """`model.train()` as the loop calls it, then every module back in the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cache_key(key: str, device: str, batch: dict[str, torch.Tensor], processes: int = 1) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    parts = [f"probe {PROBE_VERSION}", key, device, name, str(tuple(batch["input_ids"].shape)),
             str(torch.get_num_threads()), torch.__version__, transformers.__version__]  # (its attention paths)
    if processes > 1:  # processes sharing a CPU (or one host's memory bandwidth) run at another pace
        parts.append(f"{processes} processes")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

