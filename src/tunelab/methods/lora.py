"""LoRA through peft: low-rank updates on chosen linear layers, classification head trained in full."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..errors import did_you_mean
from ..models.structure import in_modules
from .base import MethodOptions, PrepareContext, register
from ._peft import PeftMethod

INITS = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal", "pissa": "pissa", "olora": "olora"}


@dataclass
class LoraOptions(MethodOptions):
    r: int = dataclasses.field(default=8, metadata={"gt": 0})
    alpha: float = dataclasses.field(default=16.0, metadata={"gt": 0})
    # 1 would zero every adapter input: the adapter would get no gradient and train nothing
    dropout: float = dataclasses.field(default=0.1, metadata={"ge": 0, "lt": 1})
    target_modules: list[str] | None = dataclasses.field(
        default=None,
        metadata={"min_items": 1, "help": "module name suffixes, or [all-linear] (every linear layer but the "
                                          "head); default: peft's per-architecture choice"})
    bias: str = dataclasses.field(default="none", metadata={"choices": ["none", "all", "lora_only"]})
    use_rslora: bool = dataclasses.field(
        default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r (rsLoRA)"})
    # peft's initialisations that need no data. pissa and olora move the adapter's initial value out of the base
    # weights; peft re-runs that (deterministic) step when it loads the adapter, so the saved adapter still reloads
    # onto the untouched base. Left out: eva/corda/lora_ga (need data), loftq (quantisation), pissa_niter_* (random,
    # so not repeatable on load), mica (freezes B: another parameter count), False (debugging only).
    init: str = dataclasses.field(default="default", metadata={
        "choices": list(INITS), "help": "adapter initialisation (peft init_lora_weights); default: B = 0"})


def linear_layers(model: nn.Module, head_modules: tuple[str, ...]) -> dict[str, nn.Module]:
    """Linear layers LoRA may adapt: nn.Linear, and transformers' Conv1D (GPT-2's linear layers, weight stored
    transposed; peft adapts both); not the task's head, which trains in full; not the output embedding."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and not in_modules(name, head_modules) and m is not output}


def targeted_layers(model: nn.Module, head_modules: tuple[str, ...], targets: list[str]) -> dict[str, nn.Module]:
    """The linear layers an adapter with `targets` (module name suffixes) attaches to."""
    return {name: m for name, m in linear_layers(model, head_modules).items() if any(matches(name, t) for t in targets)}


def features(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a linear layer: nn.Linear's weight is out × in, Conv1D's in × out."""
    rows, columns = layer.weight.shape
    return (rows, columns) if not isinstance(layer, nn.Linear) else (columns, rows)


def matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


ALL_LINEAR = "all-linear"


def chosen_targets(model: nn.Module, targets: list[str] | None, head_modules: tuple[str, ...]) -> list[str]:
    """The target modules asked for, else peft's default for the architecture. peft's shorthand `all-linear`
    is expanded here into the linear layers' names (not the head's, nor the output embedding), so the checks,
    the expected count and peft see the same modules."""
    if targets == [ALL_LINEAR]:
        return sorted(linear_layers(model, head_modules))
    return list(targets or default_targets(model) or [])


def default_targets(model: nn.Module) -> list[str] | None:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    default = defaults.get(getattr(model.config, "model_type", None))
    # a few of peft's defaults (e.g. gemma4's) are one regex string, not module-name suffixes: the user then
    # names the targets (list() of a string would split it into characters)
    return list(default) if isinstance(default, (list, tuple, set)) else None


def target_problems(method: str, model: nn.Module, targets: list[str], head_modules: tuple[str, ...]) -> list[str]:
    """Target module names that match no linear layer (or no default for the architecture), with the choices."""
    linears = linear_layers(model, head_modules)
    candidates = sorted({name.split(".")[-1] for name in linears})
    if not targets:
        return [f"{method}.target_modules: no default for model type {model.config.model_type!r}; "
                f"choose from the linear layers: {', '.join(candidates)}"]
    return [f"{method}.target_modules: {t!r} matches no linear layer{did_you_mean(t, candidates)}; "
            f"linear layers are: {', '.join(candidates)}"
            for t in targets if not any(matches(name, t) for name in linears)]


@register
class Lora(PeftMethod):
    name = "lora"
    description = "LoRA (peft): rank-r adapters on attention projections; head trained"
    Options = LoraOptions
    default_lr = 1e-3

    def search_space(self) -> dict:
        return {**super().search_space(), "r": {"choices": [4, 8, 16]}}

    def targets(self, model: nn.Module, opts: LoraOptions, head_modules: tuple[str, ...]) -> list[str]:
        return chosen_targets(model, opts.target_modules, head_modules)

    def check(self, model: nn.Module, opts: LoraOptions, ctx: PrepareContext) -> list[str]:
        problems = []
        if opts.init == "orthogonal" and opts.r % 2:  # peft splits an orthogonal matrix into two halves
            problems.append(f"{self.name}.init: 'orthogonal' needs an even {self.name}.r, got {opts.r}")
        if opts.target_modules and ALL_LINEAR in opts.target_modules and len(opts.target_modules) > 1:
            return problems + [f"{self.name}.target_modules: {ALL_LINEAR!r} stands alone (it names every linear "
                               f"layer already); give [{ALL_LINEAR}] or a list of module names"]
        targets = self.targets(model, opts, ctx.head_modules)
        return problems + target_problems(self.name, model, targets, ctx.head_modules)

    def peft_config(self, model: nn.Module, opts: LoraOptions, ctx: PrepareContext):
        from peft import LoraConfig

        return LoraConfig(task_type=ctx.task.peft_task_type, r=opts.r, lora_alpha=opts.alpha,
                          lora_dropout=opts.dropout, target_modules=self.targets(model, opts, ctx.head_modules),
                          bias=opts.bias, use_rslora=opts.use_rslora, init_lora_weights=INITS[opts.init],
                          base_model_name_or_path=ctx.model_path, **self.extra_config(opts))

    def extra_config(self, opts: LoraOptions) -> dict:
        """Further LoraConfig arguments of a LoRA variant (e.g. DoRA's use_dora)."""
        return {}

    def method_params(self, base_model: nn.Module, opts: LoraOptions, ctx: PrepareContext) -> int:
        targets = self.targets(base_model, opts, ctx.head_modules)
        hit = targeted_layers(base_model, ctx.head_modules, targets)
        count = sum(opts.r * sum(features(m)) for m in hit.values())
        if opts.bias == "lora_only":
            count += sum(m.bias.numel() for m in hit.values() if m.bias is not None)
        elif opts.bias == "all":
            # what peft marks: names ending in ".bias", not other tables named so (Funnel's r_w_bias)
            count += sum(p.numel() for n, p in base_model.named_parameters()
                         if n.endswith(".bias") and not in_modules(n, ctx.head_modules))
        return count
