"""Device, precision, optimizer, schedule and seeds: the parts of training set up once per method."""
from __future__ import annotations

import math
import os
import random
from functools import lru_cache

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import TunelabInputError


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast only with AMX or AVX512-BF16; elsewhere (e.g. AVX2) they are emulated and
    run tens of times slower than fp32, so 'auto' precision must not pick them."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_precision(cfg: TrainConfig) -> str:
    return precision_choice(cfg)[0]


def precision_choice(cfg: TrainConfig) -> tuple[str, str]:
    """The precision a run trains in, and why (recorded with every result)."""
    if cfg.precision != "auto":
        return cfg.precision, "set by train.precision"
    if resolve_device(cfg) == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the CUDA device supports bf16"
        return "fp32", "auto: the CUDA device has no bf16"
    if cpu_has_fast_bf16():
        return "bf16", "auto: the CPU has AMX or AVX512-BF16, so bf16 matmuls run natively"
    return "fp32", "auto: the CPU has neither AMX nor AVX512-BF16; bf16 would be emulated, far slower than fp32"


def apply_threads(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def device_problems(device: str, field: str) -> list[str]:
    """Training and prediction need the device here (estimate and recommend may plan for one elsewhere)."""
    if device == "cuda" and not torch.cuda.is_available():
        return [f"{field}: 'cuda', but torch finds no CUDA device on this machine; allowed here: auto, cpu"]
    return []


def thread_problems(threads: int | None) -> list[str]:
    """More torch threads than cores only slows a step down (and many thousands fail to start at all)."""
    cores = os.cpu_count() or 1
    if threads and threads > cores:
        return [f"train.threads: {threads} is more than this machine's {cores} CPU cores; allowed: 1..{cores}"]
    return []


def make_accelerator(cfg: TrainConfig, precision: str | None = None):
    """accelerate's Accelerator for `cfg`, in `precision` (default: the device's rule for train.precision)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    apply_threads(cfg)
    device = resolve_device(cfg)
    problems = device_problems(device, "train.device")
    if problems:
        raise TunelabInputError(problems)
    # train.batch_size is the global batch, split over processes: the schedule advances once per optimizer
    # step (accelerate would otherwise step it once per process, assuming a batch per process)
    precision = precision or resolve_precision(cfg)
    options = {"cpu": device == "cpu", "mixed_precision": "bf16" if precision == "bf16" else "no",
               "step_scheduler_with_optimizer": False, "kwargs_handlers": [collective_timeout()]}
    try:
        return Accelerator(**options)
    except ValueError:
        # accelerate keeps one process-wide state; a second job in the same process (a sweep, a test)
        # with another precision has to start it afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**options)


def formed_group(cfg: TrainConfig):
    """This process's place in the group the launcher started, the group formed now as accelerate forms it
    (the Accelerator made later joins it): a choice every process must agree on can be made before training."""
    from accelerate import PartialState

    from .distributed import Ranks

    state = PartialState(cpu=resolve_device(cfg) == "cpu", **collective_timeout().to_kwargs())
    return Ranks(state.process_index, state.num_processes)


def collective_timeout():
    """The process group's wait for a collective: the main process alone evaluates, tests and saves while the
    others wait in one, and generating a causal LM's answers on a CPU can take longer than torch's default 30
    minutes. A process that fails is stopped by the parent (or the launcher) long before this runs out."""
    import datetime

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=datetime.timedelta(hours=6))


def store_frozen_matmul_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep the weights of frozen nn.Linear layers in `dtype` (bf16 under bf16 autocast).

    Autocast re-casts a weight that does not require grad on every call, so an adapter method would pay
    one cast of the whole frozen base per forward and hold the fp32 original besides. Stored in bf16, the
    matmuls see the very same values (autocast rounds the same way) with no casts and half the memory.
    Only Linear layers: autocast runs LayerNorm and embeddings in fp32, so those stay fp32, and so does a
    Linear whose weight is shared with one of them (an output layer tied to the input embedding).
    Returns the number of parameters converted."""
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False)}
    converted = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for param in module.parameters(recurse=False):  # each on its own: BitFit trains a frozen layer's bias
            if not param.requires_grad and id(param) not in shared and param.dtype != dtype:
                param.data = param.data.to(dtype)
                converted += param.numel()
    return converted


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing of every block, non-reentrant: it needs no input that requires grad,
    so a frozen embedding (LoRA, prompt tuning) needs no workaround."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    # The fused kernel updates all tensors in one pass; it needs every parameter on one floating device.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    try:
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    from transformers import get_linear_schedule_with_warmup

    # ceil, as transformers' Trainer rounds warmup_ratio * steps, so both take the same schedule
    return get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * steps), steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def seed_rank_streams(seed: int, rank: int) -> None:
    """Random streams of their own for every process but the main one, once the model is built (from one seed
    on every process, so heads and adapters start alike). Each process draws dropout masks for its own rows:
    from one stream, row k of every process's micro-batch got the same mask wherever their shapes agreed."""
    if rank:
        seed_everything(int(np.random.SeedSequence([seed % 2**32, rank]).generate_state(1)[0]))
