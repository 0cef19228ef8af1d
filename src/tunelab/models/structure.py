"""Reading a model's structure generically: block stack, head size, hidden size, position limit."""
from __future__ import annotations

import weakref

from torch import nn


# Models whose position ids start after the padding index (RoBERTa's embeddings and their copies): a row of n
# tokens uses positions up to pad_token_id + n, so pad_token_id + 1 entries of the table are never a row's.
PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                            "roberta-prelayernorm", "longformer", "ibert", "mpnet", "luke", "markuplm", "layoutlmv3",
                            "xmod", "esm"}


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") not in PADDING_OFFSET_POSITIONS:
                return value
            pad = getattr(config, "pad_token_id", None)
            return value - ((pad if isinstance(pad, int) else 1) + 1)
    return None


def in_head(model: nn.Module, stack_name: str, name: str) -> bool:
    """Whether parameter or module `name` belongs to the task's head: outside the backbone
    (`base_model_prefix`) that holds the block stack. Decided by name, not by registration order: XLM-RoBERTa
    and CamemBERT create their `classifier` before the backbone."""
    backbone = getattr(model, "base_model_prefix", "")
    if not backbone or not stack_name.startswith(backbone + "."):
        return False
    return name != backbone and not name.startswith(backbone + ".")


ROTARY_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base")


def positions_are_a_table(config) -> bool:
    """Whether positions are looked up in a learned table (GPT-2, OPT, BERT), so a sequence longer than it fails
    with an index error; rotary models (Llama, Mistral, GPT-NeoX, Phi) run past their nominal length."""
    return not any(getattr(config, key, None) is not None for key in ROTARY_KEYS)


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the longest ModuleList whose children share one class.

    Works for BERT (`bert.encoder.layer`), Llama (`model.layers`), GPT-2 (`transformer.h`) and the like
    without naming any of them.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"no stack of transformer blocks found in {type(model).__name__}")
    return best


def stack_problems(model: nn.Module, stack_name: str, method: str) -> list[str]:
    """A model whose blocks are not one stack, which a method ordering blocks by depth cannot order: one list
    among several (Funnel's `encoder.blocks.N.M`, where the longest list found is a part of the blocks, or
    the list of those lists), or an encoder and a decoder (BART, T5: the encoder's blocks are found, and the
    whole decoder would count as the head)."""
    remedy = "use full or an adapter method"
    parent = stack_name.rpartition(".")[0]
    in_a_list = bool(parent) and isinstance(model.get_submodule(parent), nn.ModuleList)
    if in_a_list or any(isinstance(child, nn.ModuleList) for child in model.get_submodule(stack_name)):
        return [f"{method}: the transformer blocks of {type(model).__name__} are nested lists "
                f"({parent if in_a_list else stack_name}.N.M), whose order by depth {method} cannot tell; {remedy}"]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return [f"{method}: {type(model).__name__} has an encoder and a decoder, two stacks of blocks, whose "
                f"order by depth {method} cannot tell (the decoder would count as the head); {remedy}"]
    return []


def modules_run_after(model: nn.Module, stack_name: str) -> set[str]:
    """Modules a forward first enters after the stack's last block returns (final norms, poolers, heads),
    whatever order they were registered in: OPT registers its `final_layer_norm` before its layers. Found by
    one forward of a few tokens (in eval mode: no dropout draws; on meta tensors for a skeleton); where that
    forward does not run, the set is empty and the callers fall back to registration order."""
    cached = _RUN_AFTER.get(model)
    if cached is None or cached[0] != stack_name:
        cached = _RUN_AFTER[model] = (stack_name, _trace_run_after(model, stack_name))
    return cached[1]


# per model: freeze asks at its check, its prepare and its frozen bottom's set-up; one forward answers all
_RUN_AFTER: "weakref.WeakKeyDictionary[nn.Module, tuple[str, set[str]]]" = weakref.WeakKeyDictionary()


def _trace_run_after(model: nn.Module, stack_name: str) -> set[str]:
    import torch

    blocks = model.get_submodule(stack_name)
    clock, entered, last_block_done = [0], {}, []

    def entering(name):
        def hook(*_):
            clock[0] += 1
            entered.setdefault(name, clock[0])
        return hook
    hooks = [module.register_forward_pre_hook(entering(name)) for name, module in model.named_modules()]
    hooks.append(blocks[-1].register_forward_hook(lambda *_: last_block_done.append(clock[0])))
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.ones(1, 4, dtype=torch.long, device=next(model.parameters()).device))
    except Exception:  # noqa: BLE001 - a model this forward cannot drive (other inputs needed): no trace
        return set()
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return {name for name, at in entered.items() if last_block_done and at > last_block_done[-1]}


def head_param_count(model: nn.Module, head_modules: tuple[str, ...]) -> int:
    """Parameters of the task's head (modules by dotted name)."""
    return sum(p.numel() for n, p in model.named_parameters() if in_modules(n, head_modules))


def in_modules(name: str, modules: tuple[str, ...]) -> bool:
    """Whether parameter or module `name` is one of `modules` (dotted names: `classifier`, `bert.pooler`) or
    inside one."""
    return any(name == module or name.startswith(module + ".") for module in modules)


def hidden_size(config) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):  # dim: DistilBERT
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError("model config has no hidden size")


def attention_heads(config) -> int:
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):  # n_heads: DistilBERT
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError("model config has no number of attention heads")


def prompt_learning_dims(model: nn.Module) -> dict[str, int]:
    """The sizes peft's prompt-learning configs need, read generically: peft looks for a few config names only
    (hidden_size/d_model/n_embd, ...) and refuses models that call them otherwise (DistilBERT: dim, n_heads)."""
    return {"token_dim": embedding_width(model), "num_layers": len(find_block_list(model)[1]),
            "num_attention_heads": attention_heads(model.config)}


def embedding_width(model: nn.Module) -> int:
    """The width of the input embeddings, which virtual tokens join: the hidden size in most models, narrower
    in ALBERT and ELECTRA (their embeddings are projected up to the hidden size)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    return int(embedding.weight.shape[1]) if isinstance(embedding, nn.Embedding) else hidden_size(model.config)
