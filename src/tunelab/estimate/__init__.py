"""`tunelab estimate`: per method, parameters, peak memory in parts, FLOPs and time, from the model's config
alone (a skeleton on the meta device: no weights are read, so it works for models far larger than this
machine; a folder holding only config.json is enough)."""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from ..config import ExperimentConfig
from ..errors import TunelabInputError
from ..models.loading import TRAINING_DTYPE
from .depth import extrapolated_step, shallow_configs
from .device import device_profile, one_process_threads
from .processes import Layout, micro_batch_rows
from .rows import epoch_rows
from .memory import Workload, memory_parts, train_flops_per_token
from .structure import MethodFootprint, Shape, footprint, meta_copy, skeleton_shape


def estimate(cfg: ExperimentConfig, train_rows: int | None = None, skip_inapplicable: bool = False,
             peak_tflops: float | None = None, nproc: int = 1) -> dict[str, Any]:
    """One entry per configured method, plus what the estimate assumed (device, precision, workload). A method
    that does not apply to the model raises, or with `skip_inapplicable` is listed in `not_applicable`.
    `peak_tflops` (the training device's, in its precision) replaces this machine's measured matmul rate.

    Memory is one process's of `nproc`: its micro-batch (train.batch_size split over the processes and
    train.gradient_accumulation_steps), and under train.fsdp its shards. Times are for one step of the global
    batch, the processes working in parallel at the rate measured for one of them (on a CPU, with its share of
    the cores)."""
    from ..experiment.job import length_problems
    from ..models.loading import (checkpoint_lacks_poolers, first_line, quiet_transformers, read_model_config,
                                  resolve_model_path)
    from ..train.setup import resolve_precision

    quiet_transformers()
    task = cfg.task_spec
    model_path = resolve_model_path(cfg.model_name, cfg.model.revision, config_only=True)  # weights unread
    config = read_model_config(model_path)
    too_long = length_problems(cfg, config)  # positions, virtual tokens and generated answers, as validate
    if too_long:  # as validate says it: no step of that length runs
        raise TunelabInputError(too_long)
    for key, value in task.model_kwargs({}).items():
        setattr(config, key, value)
    lacks_poolers = checkpoint_lacks_poolers(model_path)  # a masked-LM checkpoint's: they train with the head
    build = builder(task, config, lacks_poolers)
    try:
        shape = skeleton_shape(meta_copy(build))
    except TunelabInputError:
        raise
    except Exception as exc:  # an architecture the task's model class does not take (a ViT, T5 as a causal LM)
        raise TunelabInputError([f"model.name_or_path: could not build a model from {model_path!r} for task "
                                 f"{task.name!r} ({type(exc).__name__}: {first_line(exc)})"]) from None
    precision = resolve_precision(cfg.train)
    if cfg.train.device == "cuda" and cfg.train.precision == "auto" and not torch.cuda.is_available():
        precision = "bf16"  # planning for a GPU not here: assume a bf16 one (train.precision=fp32 says otherwise)
    rows, rows_source = epoch_rows(cfg, train_rows)
    with one_process_threads(cfg.train, nproc):
        device = with_peak(device_profile(cfg.train, precision), peak_tflops)
    shallow = {depth: builder(task, shallow_config, lacks_poolers)
               for depth, shallow_config in (shallow_configs(config, shape.layers) or {}).items()}
    common = {"cfg": cfg, "model_path": model_path, "build": build, "shallow_builds": shallow, "shape": shape,
              "precision": precision, "device": device,
              "steps": math.ceil(rows / cfg.train.batch_size) if rows else None, "processes": nproc}
    if not skip_inapplicable:  # every method's fit to the model first, all at once: not after the others' estimates
        problems = []
        for name in cfg.methods:
            method, opts, model, ctx = on_skeleton(name, cfg, model_path, build)
            problems += method.check(model, opts, ctx)
        if problems:
            raise TunelabInputError(problems)
    methods, skipped = [], {}
    for name in cfg.methods:
        try:
            methods.append(method_estimate(name, **common))
        except TunelabInputError as exc:
            if not skip_inapplicable:
                raise
            skipped[name] = exc.problems[0]
    # a run's `auto` times both precisions per method on its first steps, where the device has fast bf16
    auto = "train.precision=auto: estimated in " + precision + "; a run on this device decides per method " \
        "(measuring both on its first steps where bf16 is fast here) and may train in the other" \
        if cfg.train.precision == "auto" and cfg.train.device != "cuda" else None
    return {"model": cfg.model_name, "model_path": model_path, "task": task.name, "precision": precision,
            **({"precision_note": auto} if auto else {}), "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.max_length, "train_rows": rows,
            "train_rows_source": rows_source,
            "processes": nproc, "micro_batch_rows": micro_batch_rows(cfg, nproc), "fsdp": cfg.train.fsdp,
            "device": common["device"], "methods": methods, "not_applicable": skipped}


# a forward is about a third of a full fine-tuning step's compute (2 of 6 FLOPs per parameter and token);
# gradient checkpointing runs it twice (adapters, with no weight gradients, pay a little more)
CHECKPOINTING_COMPUTE = 4 / 3


def builder(task, config, lacks_poolers: bool = False):
    """As training loads and prepares it: a decoder classifier's pad id, which its forward needs, and the
    poolers a masked-LM checkpoint lacks, which train with the head."""
    from ..models.loading import fresh_poolers

    def build():
        model = task.auto_class().from_config(config, dtype=TRAINING_DTYPE)
        model.tunelab_fresh_modules = fresh_poolers(model, [n for n, _ in model.named_parameters()]) \
            if lacks_poolers else ()
        return task.prepare_model(model, None)
    return build


def method_estimate(name: str, cfg: ExperimentConfig, model_path: str, build, shallow_builds: dict, shape: Shape,
                    precision: str, device: dict[str, Any], steps: int | None, processes: int = 1) -> dict[str, Any]:
    task = cfg.task_spec
    method, opts, model, ctx = on_skeleton(name, cfg, model_path, build, steps)
    expected = method.expected_trainable_params(model, opts, ctx)
    fp = method_footprint(method, model, opts, ctx, shape)
    # as training does it: sharded weights stay fp32 (see the runner)
    frozen_bf16 = precision == "bf16" and method.saves_adapter and method.bf16_frozen_weights and not cfg.train.fsdp
    work = Workload(micro_batch_rows(cfg, processes), cfg.data.max_length, precision,
                    task.logits_per_token(shape.vocab), frozen_bf16)
    layout = Layout(processes, cfg.train.fsdp)
    builds = {"full": build, **shallow_builds}
    parts = step_memory(method, opts, ctx, builds, task, work, device, False, shape, fp, layout)
    # a method that cannot train with checkpointing says why (validate refuses it); its fake step fails obscurely
    checkpointed = {"note": f"cannot train with it: {method.cannot_checkpoint}"} if method.cannot_checkpoint else \
        step_memory(method, opts, ctx, builds, task, work, device, True, shape, fp, layout,
                    kept_mb=parts["allocator_kept_mb"])
    plain_flops = (flops_per_token(model, fp, shape, cfg.data.max_length)
                   * cfg.train.batch_size * (cfg.data.max_length + fp.virtual_tokens))
    # with checkpointing every block's forward runs again in the backward pass; the configured step is timed
    checkpointed_flops = plain_flops * CHECKPOINTING_COMPUTE
    step_flops = checkpointed_flops if cfg.train.gradient_checkpointing else plain_flops
    return {"method": name, "total_params": fp.total_params,
            "trainable_params": expected, "added_params": fp.added_params,
            **parts, "peak_memory_checkpointing_mb": checkpointed.get("peak_memory_mb"),
            "activations_checkpointing_mb": checkpointed.get("activations_mb"),
            "allocator_kept_checkpointing_mb": checkpointed.get("allocator_kept_mb"),
            **({"checkpointing_note": checkpointed["note"]} if "note" in checkpointed else {}),
            "train_flops_per_step": step_flops, "train_flops_per_step_checkpointing": checkpointed_flops,
            "train_flops_per_epoch": step_flops * steps if steps else None,
            **step_times(step_flops, steps, device["effective_flops"] and device["effective_flops"] * processes)}


def with_peak(device: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    if not peak_tflops:
        return device
    named = {} if device.get("present", True) else {"name": "a CUDA device (not on this machine: timed at the "
                                                            "given --peak-tflops)"}
    return {**device, **named, "peak_flops": peak_tflops * 1e12, "peak_flops_from": "given (--peak-tflops)",
            "effective_flops": peak_tflops * 1e12 * device["efficiency"]}


def step_times(step_flops: float, steps: int | None, flops_per_s: float | None) -> dict[str, float | None]:
    if not flops_per_s:  # a device that is not here was not measured
        return {"step_time_s": None, "epoch_time_s": None}
    return {"step_time_s": round(step_flops / flops_per_s, 4),
            "epoch_time_s": round(step_flops * steps / flops_per_s, 1) if steps else None}


def on_skeleton(name: str, cfg: ExperimentConfig, model_path: str, build, steps: int | None = None) -> tuple:
    """The method, its options, a meta-device copy of the model and the context it is prepared in."""
    from ..methods.base import PrepareContext, get_method

    method, task, model = get_method(name), cfg.task_spec, meta_copy(build)
    ctx = PrepareContext(model_path, model_path, task, task.head_modules(model), steps or 1000, {})
    return method, method.skeleton_options(cfg.options(name)), model, ctx


def method_footprint(method, model: nn.Module, opts, ctx, shape: Shape) -> MethodFootprint:
    problems = method.check(model, opts, ctx)
    if problems:  # e.g. BitFit on a model without biases
        raise TunelabInputError(problems)
    base_total = sum(p.numel() for p in model.parameters())
    virtual = method.extra_positions(opts)
    try:
        prepared = method.prepare(model, opts, ctx)
    except Exception as exc:  # e.g. a text-initialised prompt without a tokenizer in a config-only folder
        raise TunelabInputError([f"{method.name}: cannot be applied to the model's skeleton for an estimate "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"]) from None
    return footprint(prepared, shape, base_total, virtual)


def flops_per_token(prepared: nn.Module, fp: MethodFootprint, shape: Shape, seq_len: int) -> float:
    from ..models.structure import find_block_list

    def linear_weights(module: nn.Module, trainable_only: bool = False) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear)
                   and (m.weight.requires_grad or not trainable_only))

    matmul = linear_weights(prepared)
    _, blocks = find_block_list(prepared)
    grad_path = sum(linear_weights(b) for b in list(blocks)[len(blocks) - fp.blocks_with_grad:])
    return train_flops_per_token(shape, fp, matmul, linear_weights(prepared, True), grad_path, seq_len)


def step_memory(method, opts, ctx, builds: dict, task, work: Workload, device: dict[str, Any], checkpointing: bool,
                shape: Shape, fp: MethodFootprint, layout: Layout = Layout(),
                kept_mb: float | None = None) -> dict[str, Any]:
    """Memory parts of one step on the longest batch: the tensors a fake step keeps alive at its peak, what
    the allocator keeps beside them on this device, and the runtime itself.

    Where the model cannot run on fake tensors the structural formula stands in for the plain step; with
    gradient checkpointing a failure is reported instead (some methods cannot checkpoint: prefix tuning's
    past key values are dropped when transformers turns the cache off for it).

    `builds` has the model at full depth ("full") and, for a deep model, at the depths whose fake steps are
    extrapolated to the full one (see depth.py). `kept_mb`: what the allocator keeps, where known (the plain
    step's, for a checkpointed one: recomputing every block allocates its activations again, and the heap
    keeps them as it does the plain step's; a checkpointed step's own churn put MiniLM 28-41 % under its
    resident peak at fp32 × 32 rows on an AVX2 Zen 3, the plain step's within 17 %)."""
    from . import fake_step

    with torch.device("meta"):
        ids = torch.zeros(work.batch_size, work.seq_len, dtype=torch.long)
        labels = task.example_labels(ids)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    prepared = method.prepare(meta_copy(builds["full"]), opts, ctx)
    groups = layout.groups(prepared)
    measure = functools.partial(fake_step.measure_step, inputs=inputs, precision=work.precision,
                                device=device["kind"] if device["present"] else "cpu", target=device["kind"],
                                checkpointing=checkpointing,
                                frozen_matmul_bf16=work.adapter_bf16_weights, processes=layout.processes)
    try:
        with fake_step.quiet_fake_tensor_errors():
            step, source = fake_step_of(prepared, lambda depth: method.prepare(meta_copy(builds[depth]), opts, ctx),
                                        measure, [d for d in builds if d != "full"], shape.layers)
        parts = step.parts()
    except Exception as exc:  # noqa: BLE001 - any failure of the fake run is reported with its reason
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
        if checkpointing:
            return {"note": f"with gradient checkpointing the step did not run ({reason})"}
        parts = memory_parts(shape, fp, work, 0.0)
        parts = {"weights_mb": parts["weights_mb"], "gradients_mb": parts["gradients_mb"],
                 "optimizer_mb": parts["optimizer_mb"], "activations_mb": parts["activations_mb"] + parts["logits_mb"],
                 "large_activations_mb": 0.0, "heap_state_mb": parts["gradients_mb"] + parts["optimizer_mb"]}
        source = f"formula (the fake step failed: {reason})"
    parts = layout.per_process(parts, groups)
    heap_sized = parts["activations_mb"] - parts.pop("large_activations_mb")
    heap_state = parts.pop("heap_state_mb")
    if kept_mb is None:
        # what the heap keeps is the churn that gradients and optimizer state do not move into (see calibrate.py)
        churn = max(0.0, heap_sized - heap_state)
        kept_mb = device["allocator_fixed_mb"] + device["allocator_per_churn_mb"] * churn
    parts["allocator_kept_mb"] = kept_mb
    parts["runtime_overhead_mb"] = device["runtime_overhead_mb"]
    parts["peak_memory_mb"] = sum(parts.values())
    return {**{k: round(v, 1) for k, v in parts.items()}, "memory_from": source}


def fake_step_of(prepared: nn.Module, prepare_at, measure, depths: list[int], layers: int) -> tuple[Any, str]:
    """The fake step of `prepared` (`layers` blocks), extrapolated from shallower copies where they are the
    same model."""
    if depths:
        step = extrapolated_step(prepared, prepare_at, functools.partial(measure, segmented=True))
        if step is not None:
            return step, (f"fake steps of {' and '.join(map(str, depths))} blocks, extrapolated to "
                          f"{layers} identical ones")
    return measure(prepared), "fake step"


# `tunelab.estimate(...)` runs the estimate command (`tunelab.api_plan.estimate`), this package being that name too
from .._commands import make_callable  # noqa: E402

make_callable(__name__, "tunelab.api_plan", "estimate")
