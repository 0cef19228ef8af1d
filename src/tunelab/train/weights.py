"""Copying a model's trainable parameters out and back in (best checkpoint, resume)."""
from __future__ import annotations

import torch
from torch import nn


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    mismatch = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if mismatch:
        raise RuntimeError(f"saved weights do not match the model's trainable parameters: {sorted(mismatch)[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
