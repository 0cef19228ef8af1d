"""BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022, arXiv:2106.10199): train only the bias terms (of linear
layers and layer norms alike) and the task's head; every weight matrix stays frozen.

No peft method does this, so it is done here. What trains is all that is saved (`bitfit.safetensors`, the
tensors named as in the base model): BitFit's point is a per-task artifact of biases and head only. Loading puts
them back into a fresh copy of the base model, so the frozen base is never written out (hence saves_adapter).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.structure import head_param_count, in_modules
from .base import Method, MethodOptions, PrepareContext, register

FILE = "bitfit.safetensors"


def is_bias(name: str, head_modules: tuple[str, ...]) -> bool:
    return name.split(".")[-1] == "bias" and not in_modules(name, head_modules)


@register
class BitFit(Method):
    artifact_format = "bitfit"  # its own safetensors of biases and head, not a peft adapter
    name = "bitfit"
    description = "BitFit: only bias terms (linear layers and layer norms) and the head trained"
    # 1e-3: the default of the BitFit authors' GLUE script (github.com/benzakenelad/BitFit, run_glue.py
    # --learning-rate); biases need far larger steps than full fine-tuning's weights
    default_lr = 1e-3
    saves_adapter = True

    def check(self, model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> list[str]:
        if any(is_bias(n, ctx.head_modules) for n, _ in model.named_parameters()):
            return []
        # e.g. Llama, Mistral, Gemma: their linear layers and RMSNorms have no bias
        return [f"bitfit: model type {model.config.model_type!r} has no bias parameters outside the task's head, "
                "so BitFit would train nothing of the model"]

    def prepare(self, model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> nn.Module:
        head = ctx.head_modules
        for name, param in model.named_parameters():
            param.requires_grad_(is_bias(name, head) or in_modules(name, head))
        return model

    def expected_trainable_params(self, base_model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> int:
        head = ctx.head_modules
        biases = sum(p.numel() for n, p in base_model.named_parameters() if is_bias(n, head))
        return biases + head_param_count(base_model, head)

    def save(self, model: nn.Module, directory: Path) -> None:
        from safetensors.torch import save_file

        trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, Path(directory) / FILE, metadata={"format": "pt", "method": self.name})

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        from safetensors.torch import load_file

        trained = load_file(Path(directory) / FILE)
        params = dict(base_model.named_parameters())
        unknown = sorted(set(trained) - set(params))
        if unknown:
            raise ValueError(f"{directory / FILE} does not fit this base model: {', '.join(unknown[:5])}")
        base_model.load_state_dict(trained, strict=False)
        return base_model
