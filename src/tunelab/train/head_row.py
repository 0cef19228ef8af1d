"""The last block computes only the row the head reads, while training an encoder classifier.

A sequence classifier on an encoder (BERT, RoBERTa, DeBERTa, ELECTRA, MiniLM, ...) reads one row of the last
block's output: the first token's. Every other row of that block is computed, backpropagated and discarded.
Its keys and values need every row (the first token attends to all of them), but from the attention's output
on, a block works row by row: output projection, residual, LayerNorm, feed-forward, dropout. So from that
point the last block runs on the first row alone. For MiniLM (6 blocks) this is about 13 % of a step's matmul
work, with the same loss and the same gradients up to the rounding of differently shaped matmuls.

Nothing is assumed about an architecture; two checks decide, once per model, before training:
- which rows the head reads: the gradient of the model's output with respect to the last block's output,
  on a few tokens in eval mode, is exactly zero outside row 0 (a causal LM, mean pooling or a decoder
  classifier reading its last token fail this, and train as before);
- where the block can be cut: its modules are tried in the order a forward enters them, on a float64 copy of
  the block, each with its inputs cut to row 0; the first whose cut gives a one-row block output equal to row
  0 of the uncut block (to 1e-9 relative) is where training cuts. In float64 a wrong cut (e.g. attention over
  one key) cannot pass as rounding.
Only training-mode forwards are cut, so evaluation, prediction and saved models are exactly as before. Off
under torch.compile and FSDP (unchecked there), and where no cut passes.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

from ..models.structure import find_block_list

TRIAL_SHAPE = (2, 8)  # rows x tokens of the check's input; the second row ends in padding
EXACT = 1e-9  # float64: a correct cut differs by rounding only (~1e-15 relative)


class HeadRowOnly:
    """`active()` around training: the last block then runs on row 0 from `cut_at` on."""

    def __init__(self, cut_at: nn.Module | None = None, cut_name: str = ""):
        self.cut_at, self.cut_name = cut_at, cut_name

    @classmethod
    def for_model(cls, model: nn.Module, enabled: bool = True) -> "HeadRowOnly":
        if not enabled:
            return cls()
        try:
            found = find_cut(model)
        except Exception:  # noqa: BLE001 - a model the check cannot drive (other inputs needed): trains whole
            found = None
        return cls(*found) if found else cls()

    @contextlib.contextmanager
    def active(self):
        if self.cut_at is None:
            yield self
            return
        hook = self.cut_at.register_forward_pre_hook(_cut_while_training, with_kwargs=True)
        try:
            yield self
        finally:
            hook.remove()


def _cut_while_training(module: nn.Module, args: tuple, kwargs: dict):
    return cut_to_first_row(args, kwargs) if module.training else None


def cut_to_first_row(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Every (batch, tokens, features) input, tokens as long as the first such input's, cut to token 0."""
    tensors = [a for a in (*args, *kwargs.values()) if _rows(a)]
    if not tensors:
        return args, kwargs
    tokens = tensors[0].shape[1]

    def cut(value):
        return value[:, :1] if _rows(value) and value.shape[1] == tokens else value
    return tuple(cut(a) for a in args), {key: cut(value) for key, value in kwargs.items()}


def _rows(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() == 3 and value.is_floating_point()


def find_cut(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The module of the last block from which it may run on row 0 alone, with its name; None where the head
    reads other rows or no cut gives the same row."""
    _, blocks = find_block_list(model)
    last = blocks[-1]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        trial = _trial_forward(model, last)
    finally:
        for module, training in modes.items():
            module.training = training
    if trial is None or not _reads_first_row_only(trial["output"], trial["block_output"]):
        return None
    return _first_exact_cut(last, trial["args"], trial["kwargs"], trial["entered"])


def _trial_forward(model: nn.Module, last: nn.Module) -> dict | None:
    """One eval-mode forward of a few tokens: the last block's inputs, its output as a leaf (so the head's
    gradient can be read), the order its modules are entered in, and the model's output."""
    trial: dict[str, Any] = {"entered": [], "calls": {}}
    names = {module: name for name, module in last.named_modules() if name}

    def entering(module, _args):
        name = names[module]
        if name not in trial["calls"]:
            trial["entered"].append(name)
        trial["calls"][name] = trial["calls"].get(name, 0) + 1

    def block_in(_module, args, kwargs):
        trial["args"], trial["kwargs"] = args, kwargs
        trial["block_calls"] = trial.get("block_calls", 0) + 1

    def block_out(_module, _args, _kwargs, output):
        leaf = _first_output(output).detach().requires_grad_()
        trial["block_output"] = leaf
        return leaf if torch.is_tensor(output) else (leaf, *output[1:])
    hooks = [module.register_forward_pre_hook(entering) for module in names]
    hooks += [last.register_forward_pre_hook(block_in, with_kwargs=True),
              last.register_forward_hook(block_out, with_kwargs=True)]
    try:
        ids, mask = _trial_inputs(model)
        output = model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    if trial.get("block_calls") != 1:  # a block shared across depth (ALBERT) runs for every layer
        return None
    # a module entered twice in one forward (shared, or called again) would be cut at every call
    trial["entered"] = [name for name in trial["entered"] if trial["calls"][name] == 1]
    trial["output"] = getattr(output, "logits", None)
    if trial["output"] is None:
        trial["output"] = output[0]
    return trial


def _trial_inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    parameter = next(model.parameters())
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
    rows, tokens = TRIAL_SHAPE
    # distinct tokens, so no two rows of the block agree by accident
    ids = (torch.arange(rows * tokens).view(rows, tokens) * 7 + 3) % min(vocab, 1000)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    mask[1, -3:] = 0
    return ids.to(parameter.device), mask.to(parameter.device)


def _reads_first_row_only(output: torch.Tensor, block_output: torch.Tensor) -> bool:
    if not output.is_floating_point() or block_output.dim() != 3 or block_output.shape[1] < 2:
        return False
    (grad,) = torch.autograd.grad(output.float().sum(), block_output, allow_unused=True)
    if grad is None:
        return False
    per_row = grad.abs().sum(dim=(0, 2))
    return bool(per_row[0] > 0) and bool((per_row[1:] == 0).all())


def _first_exact_cut(last: nn.Module, args: tuple, kwargs: dict, entered: list[str]) -> tuple[nn.Module, str] | None:
    exact = copy.deepcopy(last).double().eval()
    args, kwargs = _as_float64(args), _as_float64(kwargs)
    device_type = next(exact.parameters()).device.type
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        whole = _first_output(exact(*args, **kwargs))
        for name in entered:
            hook = exact.get_submodule(name).register_forward_pre_hook(
                lambda _m, a, k: cut_to_first_row(a, k), with_kwargs=True)
            try:
                cut = _first_output(exact(*args, **kwargs))
            except Exception:  # noqa: BLE001 - a cut the block cannot run with (mismatched shapes) is no cut
                continue
            finally:
                hook.remove()
            if cut.shape[1] == 1 and cut.shape[0] == whole.shape[0] and \
                    (cut - whole[:, :1]).abs().max() <= EXACT * max(1.0, whole[:, :1].abs().max().item()):
                return last.get_submodule(name), name
    return None


def _first_output(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output[0]


def _as_float64(value):
    if torch.is_tensor(value):
        return value.detach().double() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_as_float64(v) for v in value)
    if isinstance(value, list):
        return [_as_float64(v) for v in value]
    if isinstance(value, dict):
        return {key: _as_float64(v) for key, v in value.items()}
    return value
