"""DoRA (Liu et al., ICML 2024, arXiv:2402.09353) through peft: LoRA with use_dora=True. Each adapted
weight is split into a magnitude (one trainable scale per output row) and a direction that LoRA updates.
Same options and PEFT format as the lora method.
"""
from __future__ import annotations

from torch import nn

from .base import PrepareContext, register
from .lora import Lora, LoraOptions, features, targeted_layers


@register
class Dora(Lora):
    name = "dora"
    description = "DoRA (peft LoRA, use_dora): LoRA direction + trainable per-row magnitude; head trained"
    # 1e-3 = the lora method's rate: DoRA only adds the magnitude to LoRA, and peft's method-comparison suite runs
    # its DoRA experiment (MetaMathQA experiments/lora/llama-3.2-3B-rank32-dora) at the very rate of its LoRA one
    # (the suite's default_training_params lr, as lora/llama-3.2-3B-rank32).
    default_lr = 1e-3
    # peft derives DoRA's weight norm from the stored base weight: rounded to bf16 it no longer matches the
    # magnitude initialised from fp32, and the adapter would not start as a no-op
    bf16_frozen_weights = False

    def extra_config(self, opts: LoraOptions) -> dict:
        return {"use_dora": True}

    def method_params(self, base_model: nn.Module, opts: LoraOptions, ctx: PrepareContext) -> int:
        # LoRA's A and B (and any trained biases), plus the magnitude vector: one entry per output feature
        targets = self.targets(base_model, opts, ctx.head_modules)
        hit = targeted_layers(base_model, ctx.head_modules, targets).values()
        return super().method_params(base_model, opts, ctx) + sum(features(m)[1] for m in hit)
