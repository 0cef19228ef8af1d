"""LoRA+ (Hayou, Ghosh & Yu, ICML 2024, arXiv:2402.12354): LoRA whose B matrices learn `ratio` times
faster than its A matrices. Same adapters, same saved format as the lora method; only the optimizer differs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import decay_split, register, trainable_named
from .lora import Lora, LoraOptions


@dataclass
class LoraPlusOptions(LoraOptions):
    # 16 = 2^4, the paper's recommended default ratio lr_B / lr_A
    ratio: float = dataclasses.field(default=16.0, metadata={"gt": 0, "help": "learning rate of B over that of A"})


@register
class LoraPlus(Lora):
    name = "lora-plus"
    description = "LoRA+ (peft LoRA): B matrices at ratio × the learning rate of A; head trained"
    Options = LoraPlusOptions
    # 5e-4 = the lora method's 1e-3 halved: the LoRA+ authors advise an lr_A "slightly smaller (e.g. by a
    # factor of 2) than typical vanilla LoRA learning rates" (github.com/nikhil-ghosh-berkeley/loraplus)
    default_lr = 5e-4

    def param_groups(self, model: nn.Module, opts: LoraPlusOptions, lr: float,
                     weight_decay: float) -> list[dict[str, Any]]:
        named = trainable_named(model)
        # Only B gets the higher rate. The authors' code (and peft's create_loraplus_optimizer) also give it to
        # every 1-D parameter; here the head and any trained biases keep the base rate, as in the lora method,
        # so that the two methods differ in the adapters alone.
        b = [(n, p) for n, p in named if "lora_B" in n]
        a = [(n, p) for n, p in named if "lora_A" in n]
        rest = [(n, p) for n, p in named if "lora_A" not in n and "lora_B" not in n]
        return [*decay_split(a, lr, weight_decay, prefix="lora_A"),
                *decay_split(b, lr * opts.ratio, weight_decay, prefix="lora_B"),
                *decay_split(rest, lr, weight_decay, prefix="other")]
