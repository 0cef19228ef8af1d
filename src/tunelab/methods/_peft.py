"""What all peft-backed methods share: wrapping, PEFT-format save/load, the head counted as trainable."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.structure import head_param_count
from .base import Method, MethodOptions, PrepareContext


class PeftMethod(Method):
    saves_adapter = True
    family = "adapter"

    def peft_config(self, model: nn.Module, opts: MethodOptions, ctx: PrepareContext):
        raise NotImplementedError

    def method_params(self, base_model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> int:
        """Trainable parameters the method adds, not counting the task's head."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> nn.Module:
        from peft import get_peft_model

        # The task's peft task type decides what peft wraps: SEQ_CLS trains and saves modules named classifier or
        # score; a head with other parts (DistilBERT's pre_classifier, BART's classification_head) must be named.
        config = self.peft_config(model, opts, ctx)
        if ctx.head_modules:
            config.modules_to_save = sorted(set(config.modules_to_save or ()) | set(ctx.head_modules))
        return pooled_at_last_real_token(get_peft_model(model, config))

    def expected_trainable_params(self, base_model: nn.Module, opts: MethodOptions,
                                  ctx: PrepareContext) -> int:
        return self.method_params(base_model, opts, ctx) + head_param_count(base_model, ctx.head_modules)

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def merged(self, model: nn.Module) -> nn.Module:
        from ..errors import TunelabInputError

        if model.active_peft_config.is_prompt_learning:
            raise TunelabInputError([f"export --merge: {self.name} cannot be merged: its virtual tokens are inputs "
                                     "to the model, not changes to its weights; export without --merge and load "
                                     "it with peft (PeftModel.from_pretrained)"])
        settle_trained_heads(model)
        return model.merge_and_unload()  # peft folds the adapter into the weights

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        from peft import PeftModel

        return pooled_at_last_real_token(PeftModel.from_pretrained(base_model, directory))


class VirtualTokenMethod(PeftMethod):
    """peft's prompt-learning methods: virtual tokens, or a prefix of keys and values, handed to the model with
    its input."""
    family = "prompt"

    def check(self, model: nn.Module, opts: MethodOptions, ctx: PrepareContext) -> list[str]:
        if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return []
        import peft

        # BART's and T5's classifiers take no inputs_embeds (peft's virtual tokens), and a prefix meets the
        # decoder's attention mask with the encoder's length
        return [f"{self.name}: peft {peft.__version__} cannot hand virtual tokens to an encoder-decoder model "
                f"({type(model).__name__}); use lora, ia3 or full"]


def pooled_at_last_real_token(model: nn.Module) -> nn.Module:
    """A decoder classifier (Llama, GPT-2, OPT: a `score` head over every position) classifies from its last
    real token, which it finds in `input_ids`. Prompt tuning and p-tuning hand it `inputs_embeds` instead
    (peft puts the virtual tokens in front), so it would read the last position, a padding token in every row
    shorter than its batch's longest: answers that change with the batch. Here the attention mask says where
    each row's last real token is, and that position's logits are the ones the classifier pools."""
    config = getattr(model, "active_peft_config", None)
    base = model.get_base_model()
    if not getattr(config, "is_prompt_learning", False) or config.task_type != "SEQ_CLS" \
            or not isinstance(getattr(base, "score", None), nn.Module):
        return model
    seen: dict = {}

    def remember_inputs(module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask") if kwargs.get("input_ids") is None else None

    def last_real_token_last(module, args, logits):
        mask = seen.get("mask")
        if mask is None or logits.dim() != 3 or mask.shape[1] != logits.shape[1]:
            return logits
        import torch

        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * (mask != 0)).argmax(-1).to(logits.device)
        chosen = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return torch.cat([logits[:, :-1], chosen[:, None]], dim=1)

    base.register_forward_pre_hook(remember_inputs, with_kwargs=True)
    base.score.register_forward_hook(last_real_token_last)
    return model


def settle_trained_heads(model: nn.Module) -> None:
    """Put each trained head module (peft's modules_to_save copy) in place of its wrapper. peft 0.21's IA3
    unload copies a `weight` from every wrapper it replaces and fails on a head that is a module of several
    layers (RoBERTa's RobertaClassificationHead, DeBERTa's pooler); with the heads settled first, every
    method's merge sees only its own adapter layers."""
    from peft.utils import ModulesToSaveWrapper

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    for name, wrapper in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper.modules_to_save[wrapper.active_adapters[0]])
