"""What an estimate needs to know about a model and a method, read from modules on the meta device.

The method is applied to a weightless skeleton exactly as training applies it (its own `prepare`), so the
estimate learns generically, without a per-method table, which parameters train and therefore which blocks
must keep activations for the backward pass and which of their linear layers must keep their inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.structure import find_block_list, hidden_size


@dataclass
class Shape:
    """The sizes the memory and compute formulas use."""

    layers: int
    hidden: int
    ffn: int
    vocab: int
    total_params: int


@dataclass
class MethodFootprint:
    """How a prepared method trains: its trainable parameters, the extra tokens it adds to every sequence,
    and per token the activation elements its backward pass keeps."""

    trainable_params: int
    added_params: int
    frozen_matmul_params: int      # weights of frozen Linear layers (stored bf16 by adapter methods under bf16)
    blocks_with_grad: int          # blocks from the lowest trainable one up: they keep activations
    saved_elements_per_token: float
    virtual_tokens: int
    total_params: int              # all of the prepared model's, a head's trainable copy included (as compare counts)


def skeleton_shape(model: nn.Module) -> Shape:
    config = model.config
    embeddings = model.get_input_embeddings()
    hidden = hidden_size(config)
    ffn = next((int(getattr(config, k)) for k in ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim")
                if getattr(config, k, None)), 4 * hidden)
    return Shape(layers=len(find_block_list(model)[1]), hidden=hidden, ffn=ffn,
                 vocab=embeddings.num_embeddings, total_params=sum(p.numel() for p in model.parameters()))


def footprint(prepared: nn.Module, shape: Shape, base_total: int, virtual_tokens: int) -> MethodFootprint:
    """Read the prepared (meta) model: trainable tensors, frozen matmul weights, which blocks need grads."""
    params = list(prepared.named_parameters())
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    stack_name, blocks = find_block_list(prepared)
    lowest = lowest_block_needing_grad(prepared, stack_name, blocks, virtual_tokens)
    saved = sum(saved_per_token(block, shape) for block in list(blocks)[lowest:])
    frozen = sum(m.weight.numel() for m in prepared.modules()
                 if isinstance(m, nn.Linear) and not m.weight.requires_grad)
    # peft keeps a trainable copy of the head beside the original (modules_to_save): not an added parameter
    copies = sum(p.numel() for n, p in params if ".modules_to_save." in n)
    total = sum(p.numel() for _, p in params)
    return MethodFootprint(trainable, total - base_total - copies, frozen, len(blocks) - lowest, saved,
                           virtual_tokens, total)


def lowest_block_needing_grad(model: nn.Module, stack_name: str, blocks: nn.ModuleList, virtual_tokens: int) -> int:
    """Index of the lowest block the backward pass runs through: 0 when anything below the stack trains
    (embeddings, virtual tokens), else the lowest block holding a trainable parameter (len: head only)."""
    if virtual_tokens:
        return 0
    stack_prefix = stack_name.split(".")[-1]
    for index, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return index
    below = [p for n, p in model.named_parameters() if stack_prefix not in n.split(".") and "embed" in n]
    return 0 if any(p.requires_grad for p in below) else len(blocks)


def saved_per_token(block: nn.Module, shape: Shape) -> float:
    """Activation elements one token leaves in one block for the backward pass.

    Every block keeps its norm inputs, attention inputs and the feed-forward activation's input whatever
    trains (the gradient must pass through them); a Linear layer's input is kept only when its own weight
    trains (a frozen layer needs just its weight to pass the gradient on). LoRA-style branches are Linear
    layers of their own and are counted by the same rule.
    """
    # two norms' inputs, q/k/v for the attention product, the attention output; the feed-forward activation's
    # input and output
    pass_through = 6 * shape.hidden + 2 * shape.ffn
    kept_inputs = sum(m.in_features for m in block.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad)
    return float(pass_through + kept_inputs)


def meta_copy(build) -> nn.Module:
    with torch.device("meta"):
        return build()
