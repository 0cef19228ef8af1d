"""`tunelab estimate`: per method, parameters, peak memory in parts, FLOPs and time, from the model's config
alone (a skeleton on the meta device: no weights are read, so it works for models far larger than this
machine; a folder holding only config.json is enough)."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..config import ExperimentConfig
from ..errors import TunelabInputError
from .device import device_profile
from .memory import Workload, memory_parts, train_flops_per_token
from .structure import MethodFootprint, Shape, footprint, meta_copy, skeleton_shape


def estimate(cfg: ExperimentConfig, train_rows: int | None = None, skip_inapplicable: bool = False) -> dict[str, Any]:
    """One entry per configured method, plus what the estimate assumed (device, precision, workload). A method
    that does not apply to the model raises, or with `skip_inapplicable` is listed in `not_applicable`."""
    from ..models.loading import quiet_transformers, read_model_config, resolve_model_path
    from ..train.setup import resolve_precision

    quiet_transformers()
    task = cfg.task_spec
    model_path = resolve_model_path(cfg.model_name, cfg.model.revision)
    config = read_model_config(model_path)
    for key, value in task.model_kwargs({}).items():
        setattr(config, key, value)
    build = lambda: task.auto_class().from_config(config)  # noqa: E731
    precision = resolve_precision(cfg.train)
    rows = train_rows or cfg.data.max_train_samples
    common = {"cfg": cfg, "model_path": model_path, "build": build, "shape": skeleton_shape(meta_copy(build)),
              "precision": precision, "device": device_profile(cfg.train, precision),
              "steps": math.ceil(rows / cfg.train.batch_size) if rows else None}
    methods, skipped = [], {}
    for name in cfg.methods:
        try:
            methods.append(method_estimate(name, **common))
        except TunelabInputError as exc:
            if not skip_inapplicable:
                raise
            skipped[name] = exc.problems[0]
    return {"model": cfg.model_name, "model_path": model_path, "task": task.name, "precision": precision,
            "batch_size": cfg.train.batch_size, "seq_len": cfg.data.max_length, "train_rows": rows,
            "device": common["device"], "methods": methods, "not_applicable": skipped}


def method_estimate(name: str, cfg: ExperimentConfig, model_path: str, build, shape: Shape, precision: str,
                    device: dict[str, Any], steps: int | None) -> dict[str, Any]:
    from ..methods.base import PrepareContext, get_method

    task = cfg.task_spec
    method, opts = get_method(name), cfg.options(name)
    model = meta_copy(build)
    ctx = PrepareContext(model_path, model_path, task, task.head_modules(model), steps or 1000, {})
    expected = method.expected_trainable_params(model, opts, ctx)
    fp = method_footprint(method, model, opts, ctx, shape)
    work = Workload(cfg.train.batch_size, cfg.data.max_length, precision,
                    shape.vocab if task.peft_task_type == "CAUSAL_LM" else 0,
                    method.saves_adapter and method.bf16_frozen_weights)
    parts = memory_parts(shape, fp, work, device["runtime_overhead_mb"])
    checkpointed = memory_parts(shape, fp, work, device["runtime_overhead_mb"], checkpointing=True)
    step_flops = (flops_per_token(model, fp, shape, cfg.data.max_length)
                  * cfg.train.batch_size * (cfg.data.max_length + fp.virtual_tokens))
    return {"method": name, "total_params": shape.total_params + fp.added_params,
            "trainable_params": expected, "added_params": fp.added_params,
            **parts, "peak_memory_checkpointing_mb": checkpointed["peak_memory_mb"],
            "activations_checkpointing_mb": checkpointed["activations_mb"],
            "train_flops_per_step": step_flops, "train_flops_per_epoch": step_flops * steps if steps else None,
            "step_time_s": round(step_flops / device["effective_flops"], 4),
            "epoch_time_s": round(step_flops * steps / device["effective_flops"], 1) if steps else None}


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
