"""The method protocol and the registry of fine-tuning methods.

A method is one module in `tunelab.methods` that subclasses `Method` and decorates it with
`@register`. The training loop only ever talks to this protocol, so adding a method never touches
the loop, the CLI or the report.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

if TYPE_CHECKING:
    from ..tasks.base import Task

_REGISTRY: dict[str, "Method"] = {}


@dataclass
class MethodOptions:
    """Options every method has; a method's own options subclass this."""

    lr: float | None = dataclasses.field(
        default=None, metadata={"gt": 0, "help": "learning rate; default: the method's own, else train.lr"})


@dataclass
class PrepareContext:
    """What a method may need to know about the job besides the model itself."""

    model_path: str
    tokenizer_path: str
    task: "Task"
    head_modules: tuple[str, ...]  # the task's fresh head in this model (dotted module names)
    total_steps: int = 0  # optimizer steps the run will take (0 where unknown, e.g. a check before training)
    task_info: dict = dataclasses.field(default_factory=dict)  # what the task learned from the data (labels)


class Method(abc.ABC):
    """Subclasses must define `prepare`, `expected_trainable_params` and `load`: registering one without
    them fails at once, naming what is missing, instead of when a run or `predict` first calls it."""

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # Adapter methods want much larger rates than full fine-tuning; None means use train.lr.
    default_lr: ClassVar[float | None] = None
    saves_adapter: ClassVar[bool] = False
    # Under bf16, adapter methods keep the frozen base's Linear weights in bf16 (exact, and no per-step casts);
    # a method whose adapter reads those weights directly (DoRA's weight norm) must keep them in fp32.
    bf16_frozen_weights: ClassVar[bool] = True
    # precision auto times a few forward+backward passes of the prepared model; a method whose forward in train
    # mode changes its own state (freeze's cache) must not be probed, and gets the device's rule instead
    precision_probe: ClassVar[bool] = True
    # why the method cannot train under train.fsdp (its parameters are then shards of the whole); '' where it can
    cannot_shard: ClassVar[str] = ""
    # why the method cannot train with train.gradient_checkpointing; '' where it can
    cannot_checkpoint: ClassVar[str] = ""
    artifact_format: ClassVar[str | None] = None  # default: "peft" for adapters, else "transformers"
    # for `recommend`'s rules of thumb: "full" (every weight), "adapter" (added low-rank/scaling weights),
    # "prompt" (virtual tokens), "selective" (a chosen subset of the model's own weights)
    family: ClassVar[str] = "selective"

    def check(self, model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> list[str]:
        """Problems with `opts` for this model (a skeleton on the meta device is enough)."""
        return []

    @abc.abstractmethod
    def prepare(self, model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> nn.Module:
        """Freeze parameters or inject adapters; returns the model to train."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, opts: MethodOptions, lr: float,
                     weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with a readable `name`."""
        return decay_split(trainable_named(model), lr, weight_decay, prefix="trainable")

    @abc.abstractmethod
    def expected_trainable_params(self, base_model: nn.Module, opts: MethodOptions,
                                  ctx: PrepareContext) -> int:
        """The method's own formula for its trainable-parameter count, from the untouched base model."""
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    @abc.abstractmethod
    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        """Rebuild the trained model from `directory`; `base_model` is a fresh copy of the base."""
        raise NotImplementedError

    def merged(self, model: nn.Module) -> nn.Module:
        """The loaded model as one plain transformers model (`tunelab export --merge`); raise
        TunelabInputError saying why where the method's result cannot be folded into the weights."""
        return model  # full-model methods: already plain (bitfit's biases are loaded into the base)

    def after_step(self, model: nn.Module, opts: MethodOptions, step: int) -> None:
        """Called after every optimizer step, before gradients are cleared (e.g. AdaLoRA's rank update)."""

    def extra_state(self, model: nn.Module) -> dict[str, Any] | None:
        """State beyond trainable weights and optimizer that an exact resume needs (saved in checkpoints)."""
        return None

    def load_extra_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def skeleton_options(self, opts: MethodOptions) -> MethodOptions:
        """The options an estimate applies to a weightless skeleton: the same shapes, without what needs the
        model's files beyond its config (a tokenizer for a text-initialised prompt)."""
        return opts

    def extra_positions(self, opts: MethodOptions) -> int:
        """Positions the method adds to every sequence (virtual tokens), for the max_length check."""
        return 0

    def search_space(self) -> dict[str, dict[str, Any]]:
        """Default ranges for sweeps, keyed by this method's own options: a log-uniform learning rate a
        decade either side of the method's default (train.lr's default for methods without one)."""
        base = self.default_lr or 3e-5
        return {"lr": {"low": base / 10, "high": base * 10, "log": True}}

    def resolve_lr(self, opts: MethodOptions, train_lr: float) -> float:
        return opts.lr or self.default_lr or train_lr


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def registry() -> dict[str, Method]:
    from . import discover

    discover()

    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    return registry()[name]


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# peft's learned scaling vectors, stored 2-D: IA3's (d, 1) or (1, d) factors and AdaLoRA's (r, 1) singular
# values start at 1 (or hold the adapter's scale); decay would pull them towards 0, switching the layer off
SCALING_VECTORS = ("ia3_l", "lora_E")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # Biases and normalisation weights are 1-D; decaying them hurts and HF Trainer skips them too.
    return param.ndim < 2 or "norm" in name.lower() or any(part in name for part in SCALING_VECTORS)


def decay_split(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                prefix: str) -> list[dict[str, Any]]:
    decay = [p for n, p in named if not no_weight_decay(n, p)]
    plain = [p for n, p in named if no_weight_decay(n, p)]
    groups = []
    if decay:
        groups.append({"name": prefix, "params": decay, "lr": lr, "weight_decay": weight_decay})
    if plain:
        groups.append({"name": f"{prefix}.no_decay", "params": plain, "lr": lr, "weight_decay": 0.0})
    return groups
