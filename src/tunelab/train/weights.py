"""Copying a model's trainable parameters out and back in (best checkpoint, resume).

Sharded parameters (train.fsdp) are gathered whole on the way out and cut to this process's shard on the way
in, so what is stored is the same with or without sharding."""
from __future__ import annotations

import torch
from torch import nn

from .sharding import resharded, shard_of, whole


def trainable_state(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable weights as CPU copies. Under sharding every process must call it (it gathers); only those
    with `keep` get the copies (the others an empty dict)."""
    out = {}
    for name, param in resharded(model).named_parameters():
        if param.requires_grad:
            value = whole(param)
            if keep:
                out[name] = value.detach().cpu().clone()
    return out


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(resharded(model).named_parameters())
    mismatch = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if mismatch:
        raise RuntimeError(f"saved weights do not match the model's trainable parameters: {sorted(mismatch)[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(shard_of(value, params[name]))
