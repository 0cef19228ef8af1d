"""Prefix tuning (Li & Liang, ACL 2021, arXiv:2101.00190) through peft: trainable key/value vectors for
num_virtual_tokens positions in every attention layer, handed to the model as a past key/value cache; head trained.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..models.structure import hidden_size, prompt_learning_dims
from .base import MethodOptions, PrepareContext, register
from ._peft import VirtualTokenMethod


@dataclass
class PrefixTuningOptions(MethodOptions):
    num_virtual_tokens: int = dataclasses.field(default=20, metadata={"gt": 0})


def _forward_params(module: nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


def reaches_model(model: nn.Module, task_type: str) -> bool:
    """Whether peft 0.21 can hand this model the prefix (a past key/value cache), directly or through
    `accept_prefix_as_cache`."""
    from transformers import PreTrainedModel

    if task_type == "CAUSAL_LM":
        # peft passes past_key_values= to the model's forward; transformers 5 renamed it `cache` and still takes
        # the old name (a deprecation shim until 5.40)
        return bool(_forward_params(model) & {"past_key_values", "cache"})
    backbones = [m for m in model.children() if isinstance(m, PreTrainedModel)][:1]
    return any(_forward_params(m) & {"past_key_values", "cache"} for m in [model, *backbones])


def accept_prefix_as_cache(model: nn.Module) -> None:
    """Let peft hand the prefix to a transformers-5 model as its `cache` (BERT; a decoder classifier such as
    Llama's; a causal LM).

    peft (0.21) passes the prefix as a keyword named past_key_values, and its classification path only does so
    if the model's forward has a parameter of that name; transformers 5 renamed it `cache`. A causal LM's forward
    still takes the old name, with a FutureWarning at every step, until transformers 5.40 removes it (then the
    prefix would go unread). A classifier's forward passes extra keywords on to its backbone, whose attention
    prepends the cached keys/values; peft extends the attention mask by the prefix. This wrapper only renames
    the argument, so the model computes exactly what it would with a cache. Tested: the prefix gets gradients,
    padding leaves logits unchanged.
    """
    signature = inspect.signature(model.forward)
    if "past_key_values" in signature.parameters:
        return  # renamed already, or a forward of the old naming: peft's argument reaches it as it is
    original = model.forward

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)
    # what peft and transformers (generate) read of it: the model's own parameters, and past_key_values
    forward.__signature__ = with_keyword(signature, "past_key_values")
    model.forward = forward


def with_keyword(signature: inspect.Signature, name: str) -> inspect.Signature:
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    return signature.replace(parameters=params)


def kv_width(config) -> int:
    """Width of one layer's keys (= values): all heads, or the key/value heads under grouped-query attention."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is None:
        return hidden_size(config)
    return (getattr(config, "head_dim", None) or hidden_size(config) // heads) * kv_heads


@register
class PrefixTuning(VirtualTokenMethod):
    name = "prefix-tuning"
    description = "Prefix tuning (peft): trainable key/value prefixes in every attention layer; head trained"
    Options = PrefixTuningOptions
    # 5e-3: the rate of most of peft's method-comparison prefix-tuning runs (MetaMathQA experiments/prefixtuning/
    # llama-3.2-3B-lr_0.005_zero_init, -tokens3-sos_prefix-lr_0.005, -tokens50-init_prefix-lr_0.005; one at 1e-3)
    default_lr = 5e-3
    cannot_checkpoint = ("transformers turns the key/value cache off under gradient checkpointing, and the prefix "
                         "is that cache (the shapes then disagree)")

    def extra_positions(self, opts: PrefixTuningOptions) -> int:
        # the prefix is a cache of that many earlier positions: the input's positions start after it
        return opts.num_virtual_tokens

    def check(self, model: nn.Module, opts: PrefixTuningOptions, ctx: PrepareContext) -> list[str]:
        problems = super().check(model, opts, ctx)
        if problems or reaches_model(model, ctx.task.peft_task_type):
            return problems
        import peft
        import transformers

        # e.g. BERT classification: transformers 5 renamed the forward's past_key_values to cache
        return [f"prefix-tuning: peft {peft.__version__} hands the prefix to {type(model).__name__} ({ctx.task.name}) "
                f"only as a past_key_values argument, which its forward lacks in transformers "
                f"{transformers.__version__}; use p-tuning or prompt-tuning"]

    def prepare(self, model: nn.Module, opts: PrefixTuningOptions, ctx: PrepareContext) -> nn.Module:
        accept_prefix_as_cache(model)
        return super().prepare(model, opts, ctx)

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        accept_prefix_as_cache(base_model)
        return super().load(directory, base_model)

    def peft_config(self, model: nn.Module, opts: PrefixTuningOptions, ctx: PrepareContext):
        from peft import PrefixTuningConfig

        # the sizes read generically: peft reads them from a few config names only, which MPT's are not; a prefix
        # is keys and values, as wide as attention (ELECTRA's and ALBERT's embeddings are narrower)
        dims = {**prompt_learning_dims(model), "token_dim": hidden_size(model.config)}
        return PrefixTuningConfig(task_type=ctx.task.peft_task_type, num_virtual_tokens=opts.num_virtual_tokens,
                                  **dims, base_model_name_or_path=ctx.model_path)

    def method_params(self, base_model: nn.Module, opts: PrefixTuningOptions, ctx: PrepareContext) -> int:
        # one key and one value vector per virtual token and layer (no reparameterisation MLP)
        config = base_model.config
        return opts.num_virtual_tokens * config.num_hidden_layers * 2 * kv_width(config)
