"""P-tuning (Liu et al., 2021, arXiv:2103.10385) through peft: virtual-token embeddings produced by a small
trainable MLP (the prompt encoder) and prepended to the input; head trained.

peft saves the encoder's output, the virtual tokens themselves, not the MLP: the artifact is as small as prompt
tuning's and reloads to the same prompts. Checkpoints keep every trainable tensor, the MLP's too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..models.structure import embedding_width, prompt_learning_dims
from .base import MethodOptions, PrepareContext, register
from ._peft import VirtualTokenMethod


@dataclass
class PTuningOptions(MethodOptions):
    num_virtual_tokens: int = dataclasses.field(default=20, metadata={"gt": 0})
    # 128: peft's P-tuning example (examples/sequence_classification/P_Tuning.ipynb)
    encoder_hidden_size: int = dataclasses.field(
        default=128, metadata={"gt": 0, "help": "width of the prompt encoder's MLP"})


@register
class PTuning(VirtualTokenMethod):
    name = "p-tuning"
    description = "P-tuning (peft): virtual tokens from a trainable MLP prompt encoder, before the input; head trained"
    Options = PTuningOptions
    # 1e-3: peft's P-tuning example (examples/sequence_classification/P_Tuning.ipynb), also the rate of peft's
    # method-comparison run MetaMathQA experiments/ptuning/llama-3.2-3B-vt50-MLP-lr1e-3
    default_lr = 1e-3

    def extra_positions(self, opts: PTuningOptions) -> int:
        return opts.num_virtual_tokens

    def peft_config(self, model: nn.Module, opts: PTuningOptions, ctx: PrepareContext):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type=ctx.task.peft_task_type, num_virtual_tokens=opts.num_virtual_tokens,
                                   **prompt_learning_dims(model), encoder_hidden_size=opts.encoder_hidden_size,
                                   base_model_name_or_path=ctx.model_path)

    def method_params(self, base_model: nn.Module, opts: PTuningOptions, ctx: PrepareContext) -> int:
        # the input embeddings of the virtual tokens, then peft's MLP d → h → h → d (weights and biases)
        d, h = embedding_width(base_model), opts.encoder_hidden_size
        return opts.num_virtual_tokens * d + (d * h + h) + (h * h + h) + (h * d + d)
