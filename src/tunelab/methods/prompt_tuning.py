"""Prompt tuning through peft: trainable virtual-token embeddings prepended to the input; head trained."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..models.structure import embedding_width, prompt_learning_dims
from .base import MethodOptions, PrepareContext, register
from ._peft import VirtualTokenMethod


@dataclass
class PromptTuningOptions(MethodOptions):
    num_virtual_tokens: int = dataclasses.field(default=20, metadata={"gt": 0})
    init: str = dataclasses.field(default="text", metadata={"choices": ["random", "text"]})
    init_text: str | None = dataclasses.field(default=None, metadata={
        "help": "text whose token embeddings start the prompt; default: the task's, from the data (for "
                "classification the label names)"})


@register
class PromptTuning(VirtualTokenMethod):
    name = "prompt-tuning"
    description = "Prompt tuning (peft): trainable virtual tokens before the input; head trained"
    Options = PromptTuningOptions
    default_lr = 3e-2

    def search_space(self) -> dict:
        # soft prompts want rates up to ~0.3 (Lester et al. 2021 used 0.3 with Adafactor)
        return {"lr": {"low": 3e-3, "high": 3e-1, "log": True}, "num_virtual_tokens": {"choices": [10, 20, 50]}}

    def skeleton_options(self, opts: PromptTuningOptions) -> PromptTuningOptions:
        return dataclasses.replace(opts, init="random")  # the same table of virtual tokens, no tokenizer needed

    def extra_positions(self, opts: PromptTuningOptions) -> int:
        return opts.num_virtual_tokens

    def peft_config(self, model: nn.Module, opts: PromptTuningOptions, ctx: PrepareContext):
        from peft import PromptTuningConfig, PromptTuningInit

        text_init = opts.init == "text"
        init_text = opts.init_text or ctx.task.prompt_init_text(ctx.task_info)
        return PromptTuningConfig(
            task_type=ctx.task.peft_task_type, num_virtual_tokens=opts.num_virtual_tokens,
            **prompt_learning_dims(model),
            prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=init_text if text_init else None,
            tokenizer_name_or_path=ctx.tokenizer_path if text_init else None,
            base_model_name_or_path=ctx.model_path)

    def method_params(self, base_model: nn.Module, opts: PromptTuningOptions, ctx: PrepareContext) -> int:
        return opts.num_virtual_tokens * embedding_width(base_model)
