"""(IA)³ (Liu et al., NeurIPS 2022, arXiv:2205.05638) through peft: learned vectors that rescale the outputs of
chosen linear layers (attention keys/values) or, for feedforward ones, their inputs; head trained in full.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..errors import did_you_mean
from .base import MethodOptions, PrepareContext, register
from ._peft import PeftMethod
from .lora import features, linear_layers, matches, targeted_layers


@dataclass
class IA3Options(MethodOptions):
    target_modules: list[str] | None = dataclasses.field(
        default=None,
        metadata={"min_items": 1, "help": "module name suffixes; default: peft's per-architecture choice"})
    feedforward_modules: list[str] | None = dataclasses.field(default=None, metadata={
        "help": "those of target_modules scaled at their input; default: peft's per-architecture choice"})


def peft_defaults(model: nn.Module) -> tuple[list[str] | None, list[str] | None]:
    from peft.utils import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as feedforward,
                            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as targets)

    model_type = getattr(model.config, "model_type", None)
    return targets.get(model_type), feedforward.get(model_type)


def is_feedforward(module_name: str, feedforward: list[str]) -> bool:
    return any(module_name.endswith(f) for f in feedforward)  # peft's own test: a plain suffix, no dot


@register
class IA3(PeftMethod):
    name = "ia3"
    description = "(IA)3 (peft): learned scaling vectors on attention k/v and feedforward inputs; head trained"
    Options = IA3Options
    # 3e-3: the (IA)3 paper's rate (T-Few recipe, §3.3 / appendix); peft's method-comparison suite reaches its best
    # IA3 result at a similar 5e-3 (MetaMathQA experiments/ia3/llama-3.2-3B-all-attn-5k-lr0.005), far above
    # LoRA's because every vector starts at 1 and must move multiplicatively.
    default_lr = 3e-3

    def modules(self, model: nn.Module, opts: IA3Options) -> tuple[list[str], list[str]]:
        default_targets, default_feedforward = peft_defaults(model)
        targets = list(opts.target_modules or default_targets or [])
        if opts.feedforward_modules is not None:
            return targets, list(opts.feedforward_modules)
        # peft's feedforward choice, as far as the targets include it (peft wants a subset of the targets)
        return targets, [f for f in default_feedforward or [] if f in targets]

    def check(self, model: nn.Module, opts: IA3Options, ctx: PrepareContext) -> list[str]:
        linears = linear_layers(model, ctx.head_modules)
        candidates = sorted({name.split(".")[-1] for name in linears})
        targets, feedforward = self.modules(model, opts)
        if not targets:
            return [f"ia3.target_modules: no default for model type {model.config.model_type!r}; "
                    f"choose from the linear layers: {', '.join(candidates)}"]
        problems = [f"ia3.target_modules: {t!r} matches no linear layer{did_you_mean(t, candidates)}; "
                    f"linear layers are: {', '.join(candidates)}"
                    for t in targets if not any(matches(name, t) for name in linears)]
        # peft refuses feedforward modules that are not also targets
        return problems + [f"ia3.feedforward_modules: {f!r} is not in ia3.target_modules ({', '.join(targets)})"
                           for f in feedforward if f not in targets]

    def peft_config(self, model: nn.Module, opts: IA3Options, ctx: PrepareContext):
        from peft import IA3Config

        targets, feedforward = self.modules(model, opts)
        return IA3Config(task_type=ctx.task.peft_task_type, target_modules=targets,
                         feedforward_modules=feedforward, base_model_name_or_path=ctx.model_path)

    def method_params(self, base_model: nn.Module, opts: IA3Options, ctx: PrepareContext) -> int:
        # one vector per adapted layer: over its inputs for a feedforward layer, else over its outputs
        targets, feedforward = self.modules(base_model, opts)
        hit = targeted_layers(base_model, ctx.head_modules, targets)
        return sum(features(m)[0] if is_feedforward(n, feedforward) else features(m)[1] for n, m in hit.items())
