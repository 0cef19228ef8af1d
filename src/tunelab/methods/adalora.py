"""AdaLoRA through peft: SVD-shaped adapters (B·diag(E)·A) whose ranks are pruned during training,
giving rank to the weight matrices that matter most; head trained in full.

The rank allocator runs in `after_step` (after the optimizer step, before gradients are cleared, as peft
requires) and its importance averages go into checkpoints, so a resumed run prunes exactly as an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import MethodOptions, PrepareContext, register
from ._peft import PeftMethod
from .lora import chosen_targets, features, target_problems, targeted_layers

# all three: peft resets the averages of a parameter missing from ipt
ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


@dataclass
class AdaLoraOptions(MethodOptions):
    init_r: int = dataclasses.field(default=12, metadata={"gt": 0, "help": "rank every adapter starts with"})
    target_r: int = dataclasses.field(
        default=8, metadata={"gt": 0, "help": "average rank left after pruning (default: the lora method's r)"})
    alpha: float = dataclasses.field(default=16.0, metadata={"gt": 0})
    # 1 would zero every adapter input: the adapter would get no gradient and train nothing
    dropout: float = dataclasses.field(default=0.1, metadata={"ge": 0, "lt": 1})
    # 0.1: the AdaLoRA authors' GLUE scripts (peft's default is 0.5)
    orth_reg_weight: float = dataclasses.field(default=0.1, metadata={"ge": 0})
    target_modules: list[str] | None = dataclasses.field(
        default=None, metadata={"min_items": 1, "help": "module name suffixes; default: the lora method's choice"})


def schedule(total_steps: int) -> dict[str, int]:
    """tinit/tfinal/deltaT from the run's length, shaped like the AdaLoRA authors' GLUE scripts: keep all
    ranks for the first ~10% of steps, prune towards target_r until ~60%, train the final ranks after.
    peft's last allocation reads importance gathered at earlier steps, so a 1-step run is scheduled as 2."""
    total = max(total_steps, 2)
    tinit, tfinal = total // 10, total * 2 // 5
    # about 100 allocations over the pruning phase; every step on short runs
    return {"total_step": total, "tinit": tinit, "tfinal": tfinal, "deltaT": max(1, (total - tinit - tfinal) // 100)}


def tuner(model: nn.Module):
    """The AdaLoraModel inside whatever wraps it (PeftModel, accelerate)."""
    from peft.tuners.adalora import AdaLoraModel

    return next(m for m in model.modules() if isinstance(m, AdaLoraModel))


def task_loss_when_measuring(ada) -> None:
    """peft adds the orthogonal regulariser to every loss, an evaluation's too (the causal-LM task reads
    its validation loss from the model): keep it where gradients are taken, so losses compare with others'.
    A loaded adapter (no allocator) is never trained; peft's regularised forward would fail on it."""
    regularised = ada.forward

    def forward(*args, **kwargs):
        if torch.is_grad_enabled() and hasattr(ada, "rankallocator"):
            return regularised(*args, **kwargs)
        return ada.model.forward(*args, **kwargs)

    ada.forward = forward


@register
class AdaLora(PeftMethod):
    name = "adalora"
    description = "AdaLoRA (peft): SVD adapters, ranks pruned init_r → target_r by importance; head trained"
    Options = AdaLoraOptions
    # 1e-3: mid-range of the AdaLoRA authors' DeBERTaV3 GLUE scripts (5e-4 MNLI … 1.2e-3 RTE;
    # github.com/QingruZhang/AdaLoRA NLU/scripts), and the lora method's default
    default_lr = 1e-3
    # measured: peft's allocator combines each adapter's E, A and B importances, which sharding cuts differently
    cannot_shard = "peft's rank allocator scores whole adapter matrices after each step, and FSDP holds shards"

    def targets(self, model: nn.Module, opts: AdaLoraOptions, head_modules: tuple[str, ...]) -> list[str]:
        return chosen_targets(model, opts.target_modules, head_modules)

    def check(self, model: nn.Module, opts: AdaLoraOptions, ctx: PrepareContext) -> list[str]:
        problems = []
        if opts.target_r >= opts.init_r:  # peft's allocator then has nothing to prune and fails
            problems.append(f"{self.name}.target_r: {opts.target_r} must be below "
                            f"{self.name}.init_r ({opts.init_r})")
        targets = self.targets(model, opts, ctx.head_modules)
        return problems + target_problems(self.name, model, targets, ctx.head_modules)

    def peft_config(self, model: nn.Module, opts: AdaLoraOptions, ctx: PrepareContext):
        from peft import AdaLoraConfig

        return AdaLoraConfig(task_type=ctx.task.peft_task_type, init_r=opts.init_r, target_r=opts.target_r,
                             lora_alpha=opts.alpha, lora_dropout=opts.dropout, orth_reg_weight=opts.orth_reg_weight,
                             target_modules=self.targets(model, opts, ctx.head_modules),
                             base_model_name_or_path=ctx.model_path,
                             **schedule(ctx.total_steps))

    def prepare(self, model: nn.Module, opts: AdaLoraOptions, ctx: PrepareContext) -> nn.Module:
        peft_model = super().prepare(model, opts, ctx)
        task_loss_when_measuring(tuner(peft_model))
        return peft_model

    def method_params(self, base_model: nn.Module, opts: AdaLoraOptions, ctx: PrepareContext) -> int:
        # before any pruning: A (init_r × in), B (out × init_r) and the singular values E (init_r) per layer
        targets = self.targets(base_model, opts, ctx.head_modules)
        hit = targeted_layers(base_model, ctx.head_modules, targets).values()
        return sum(opts.init_r * (sum(features(m)) + 1) for m in hit)

    def after_step(self, model: nn.Module, opts: AdaLoraOptions, step: int) -> None:
        tuner(model).update_and_allocate(step)

    def extra_state(self, model: nn.Module) -> dict[str, Any]:
        ada = tuner(model)
        state = {key: dict(getattr(ada.rankallocator, key)) for key in ALLOCATOR_STATE}
        return {**state, "rank_pattern": ada.peft_config[ada.trainable_adapter_name].rank_pattern}

    def load_extra_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        ada = tuner(model)
        device = next(ada.parameters()).device
        for key in ALLOCATOR_STATE:
            setattr(ada.rankallocator, key, {n: t.to(device) for n, t in state[key].items()})
        ada.peft_config[ada.trainable_adapter_name].rank_pattern = state["rank_pattern"]

    def save(self, model: nn.Module, directory: Path) -> None:
        # peft would cut the pruned triplets out of the saved tensors (config.rank_pattern); the smaller
        # matmuls then sum in another order and the reloaded logits differ in the last bits. Saved at init_r,
        # a pruned triplet is stored with E = 0 and contributes exactly nothing, so reloading is exact (and
        # needs no rank pattern, so the runner's best-step weights cannot disagree with the allocator's last one).
        ada = tuner(model)
        config = ada.peft_config[ada.trainable_adapter_name]
        kept, config.rank_pattern = config.rank_pattern, None
        try:
            model.save_pretrained(directory)
        finally:
            config.rank_pattern = kept
        ranks = {n.rsplit(".lora_E.", 1)[0]: int((p != 0).sum()) for n, p in ada.model.named_parameters()
                 if ".lora_E." in n}  # the ranks training kept, for the reader: E = 0 is a pruned triplet
        (directory / "adalora_ranks.json").write_text(json.dumps(ranks, indent=1))

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        model = super().load(directory, base_model)
        task_loss_when_measuring(tuner(model))
        return model
