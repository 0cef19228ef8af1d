"""Full fine-tuning: every parameter is trained at one learning rate."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.loading import LOAD_OPTIONS
from .base import Method, MethodOptions, PrepareContext, register


class WholeModelMethod(Method):
    """Shared by methods that train and save the whole model (full, llrd)."""

    def prepare(self, model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> nn.Module:
        model.requires_grad_(True)
        return model

    def expected_trainable_params(self, base_model: nn.Module, opts: MethodOptions,
                                  ctx: PrepareContext) -> int:
        return sum(p.numel() for p in base_model.parameters())

    def search_space(self) -> dict:
        # the usual range for fine-tuning a whole pretrained transformer (BERT paper: 2e-5..5e-5, widened)
        return {"lr": {"low": 1e-5, "high": 1e-4, "log": True}}

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        return type(base_model).from_pretrained(directory, **LOAD_OPTIONS)


@register
class FullFineTuning(WholeModelMethod):
    name = "full"
    family = "full"
    description = "Full fine-tuning: all parameters trained at train.lr"
