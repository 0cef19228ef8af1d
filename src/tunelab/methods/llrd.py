"""Layer-wise learning-rate decay: a parameter-group policy over full fine-tuning.

The head trains at the base rate, the top transformer block at lr*decay, the one below at lr*decay^2,
and the embeddings (everything before the first block) lowest, at lr*decay^(num_blocks+1).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..models.structure import find_block_list, in_head, modules_run_after, stack_problems
from .base import MethodOptions, decay_split, register
from .full import WholeModelMethod


@dataclass
class LLRDOptions(MethodOptions):
    decay: float = dataclasses.field(default=0.9, metadata={"gt": 0, "le": 1, "help": "lr multiplier per layer"})


def layer_depths(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth: 0 = embeddings, 1..L = blocks bottom-up, L+1 = everything after (head).

    Parameters before the block stack are the embeddings; after it come final norms, poolers and heads,
    which all train at the base rate (the head wherever it is registered). "After" is where a forward runs
    them (OPT registers its final norm before its blocks), else where they are registered. An embedding
    table outside the stack and the head is an input to every block wherever it is registered (DeBERTa's
    relative positions, `encoder.rel_embeddings`, come after its blocks), so it is an embedding.
    """
    stack_name, blocks = find_block_list(model)
    num_blocks = len(blocks)
    run_after = modules_run_after(model, stack_name)
    prefix = f"{stack_name}."
    tables = {f"{module_name}.{name}" for module_name, module in model.named_modules()
              if isinstance(module, nn.Embedding) for name, _ in module.named_parameters(recurse=False)}
    depths: dict[str, int] = {}
    seen_blocks = False
    for name, _ in model.named_parameters():
        if name.startswith(prefix):
            depths[name] = int(name[len(prefix):].split(".")[0]) + 1
            seen_blocks = True
        elif in_head(model, stack_name, name) or name.rpartition(".")[0] in run_after:
            depths[name] = num_blocks + 1
        else:
            depths[name] = 0 if name in tables or not seen_blocks else num_blocks + 1
    return depths, num_blocks


def depth_label(depth: int, num_blocks: int) -> str:
    if depth == 0:
        return "embeddings"
    if depth == num_blocks + 1:
        return "head"
    return f"layer_{depth - 1}"


@register
class LayerwiseLRDecay(WholeModelMethod):
    name = "llrd"
    family = "full"
    description = "Layer-wise LR decay: full fine-tuning with lr*decay^k, k = distance of the layer from the head"
    Options = LLRDOptions

    def search_space(self) -> dict:
        return {**super().search_space(), "decay": {"low": 0.7, "high": 1.0}}

    def check(self, model: nn.Module, opts: LLRDOptions, ctx) -> list[str]:
        try:
            stack_name, _ = find_block_list(model)
        except ValueError as exc:
            return [f"llrd: {exc}"]
        return super().check(model, opts, ctx) + stack_problems(model, stack_name, self.name)

    def param_groups(self, model: nn.Module, opts: LLRDOptions, lr: float,
                     weight_decay: float) -> list[dict[str, Any]]:
        depths, num_blocks = layer_depths(model)
        by_depth: dict[int, list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                by_depth.setdefault(depths[name], []).append((name, param))
        groups = []
        for depth in sorted(by_depth, reverse=True):
            scaled = lr * opts.decay ** (num_blocks + 1 - depth)
            groups += decay_split(by_depth[depth], scaled, weight_decay, depth_label(depth, num_blocks))
        return groups
