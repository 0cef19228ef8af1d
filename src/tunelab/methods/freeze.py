"""Freeze the bottom: train only the top `k` transformer blocks and the head (k = 0: a linear probe).

What trains: the top `k` blocks of the stack `find_block_list` finds, plus every parameter registered after
the stack — the final norm, BERT's pooler, the task's head (`classifier`/`score`) and an untied LM output
layer. An output layer tied to the input embedding belongs to the embeddings and stays frozen. Everything
below the first trainable block (embeddings and the bottom `L - k` blocks) is frozen, is not
back-propagated through, and is **always in eval mode**, also while training: dropout there is off
(`model.train()` on the returned model leaves those modules in eval). This holds with and without the cache,
so `freeze.cache` never changes what is computed, only how often.

The cache (`freeze.cache=true`, the default). With the bottom frozen and in eval mode, a training row's
hidden states entering the first trainable block never change, so they are computed once and kept:
`prepare` returns `FrozenBottomModel`, an nn.Module around the transformers model whose training forward
looks each row up (keyed by its token ids, and token type ids, up to its real length), computes only the
missing rows, and runs the model's own forward with the bottom blocks swapped for stubs that hand the
cached states to the first trainable block. The model's own code therefore still builds the attention mask,
the rotary position embeddings (Llama) and the head/loss, so the top runs exactly as in a plain forward.

- Only the real-token positions are stored (fp32 for an fp32 bottom: `tokens x hidden x 4` bytes; the
  packaged classification job, 2,000 rows x ~75 tokens x 384, holds about 230 MB after the first epoch).
- A missing row is computed alone (at its length rounded up to a multiple of 8, the padding masked), never
  inside its batch. Its cached states are then a function of the row only, not of which rows it shared a
  batch with or of when it was computed: a run resumed mid-epoch (whose cache starts empty) computes
  bit-identically to one that never stopped.
- Evaluation (eval mode) never reads or fills the cache: it always computes the whole model.
- The first cached step of each process is checked against a plain forward of the same batch with the
  same dropout masks; if they disagree (an architecture whose blocks do more than map hidden states to
  hidden states, e.g. one passing a position bias from block to block), caching is switched off with a
  warning and the reason in `FrozenBottomModel.cache_status`, and training computes normally.
- Before that, caching is switched off if a trainable parameter feeds the bottom (MPNet's relative attention
  bias and DeBERTa's relative embeddings sit after the stack, so they train, but every block reads them).
- Caching is also off when k equals the number of blocks (only the embeddings are frozen) or for a batch
  that is not right-padded or carries inputs other than input_ids/attention_mask/token_type_ids/labels.

The model is saved whole in transformers format (the frozen bottom in full precision: bf16 storage of
frozen weights is for adapter methods only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch import nn

from ..models.loading import LOAD_OPTIONS
from ..models.structure import find_block_list, in_head, modules_run_after, stack_problems
from ..train.batches import PAD_MULTIPLE
from .base import Method, MethodOptions, PrepareContext, register

# What the training loop passes; anything else (position_ids, inputs_embeds, ...) computes normally.
CACHEABLE_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "labels"}
# The first-step check: largest |cached - plain| over the logits, relative to max(1, largest |plain|).
CHECK_TOLERANCE = {"fp32": 1e-3, "autocast": 5e-2}


@dataclass
class FreezeOptions(MethodOptions):
    k: int = dataclasses.field(default=2, metadata={
        "ge": 0, "help": "top transformer blocks trained with the head; 0 = linear probe (head only)"})
    cache: bool = dataclasses.field(default=True, metadata={
        "help": "keep each training row's frozen-bottom output after its first pass; later epochs run only the top"})


def split_model(model: nn.Module, k: int) -> tuple[str, nn.ModuleList, int]:
    """The block stack, and the index of the first trainable block (`len(blocks) - k`)."""
    stack_name, blocks = find_block_list(model)
    return stack_name, blocks, len(blocks) - k


def after_stack(model: nn.Module, stack_name: str) -> list[tuple[str, nn.Parameter]]:
    """Parameters after the block stack: final norm, pooler, head (a tied output layer is not among them:
    named_parameters lists a shared tensor once, under its first name, the input embedding). After where a
    forward runs them (OPT registers its final norm before its blocks), else where they are registered."""
    prefix, seen, out = f"{stack_name}.", False, []
    run_after = modules_run_after(model, stack_name)
    for name, param in model.named_parameters():
        if name.startswith(prefix):
            seen = True
        # a head registered before the backbone is above it too
        elif seen or in_head(model, stack_name, name) or name.rpartition(".")[0] in run_after:
            out.append((name, param))
    return out


def bottom_modules(model: nn.Module, stack_name: str, blocks: nn.ModuleList, split: int) -> list[nn.Module]:
    """Modules below the first trainable block: those registered before the stack (embeddings; not the
    stack's ancestors, nor what a forward runs after the stack) and the bottom blocks."""
    before, run_after = [], modules_run_after(model, stack_name)
    for name, module in model.named_modules():
        if name == stack_name:
            break
        if name and not stack_name.startswith(name + ".") and not in_head(model, stack_name, name) \
                and name not in run_after:
            before.append(module)
    return before + list(blocks[:split])


class _BottomDone(Exception):
    """Raised by a hook on the last frozen block: the rest of the forward is not needed."""


class _Cached(nn.Module):
    """Stands in for a frozen block during a cached forward: returns the cached hidden states, shaped as the
    block's own output. Attributes the model's forward reads off its blocks come from the real block."""

    def __init__(self, block: nn.Module, value: torch.Tensor, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: no parameters, no state_dict entries
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_as_tuple", as_tuple)

    def forward(self, *args, **kwargs):
        return (self._value,) if self._as_tuple else self._value

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class FrozenBottomModel(nn.Module):
    """A transformers model with a frozen bottom kept in eval mode, and (optionally) that bottom's output
    cached per training row. Attributes it lacks (config, generate, save_pretrained, ...) are the model's."""

    def __init__(self, model: nn.Module, stack_name: str, blocks: nn.ModuleList, split: int, cache: bool):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_blocks", blocks)  # the stack inside self.model, not a second registration
        object.__setattr__(self, "_bottom", bottom_modules(model, stack_name, blocks, split))
        self.split = split
        self.cache: dict[bytes, torch.Tensor] = {}
        self.cache_hits = self.cache_misses = 0
        self._checked = False
        self._as_tuple: bool | None = None
        if not cache:
            self.cache_status = "off (freeze.cache=false)"
        elif split == 0:
            self.cache_status = "off: every block trains, only the embeddings are frozen"
        else:
            self.cache_status = "on"
        self.train(model.training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def caching(self) -> bool:
        return self.cache_status == "on"

    @property
    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._bottom:  # dropout below the trainable top stays off
            module.eval()
        return self

    def disable_cache(self, reason: str) -> None:
        self.cache_status = f"off: {reason}"
        self.cache.clear()
        warnings.warn(f"freeze: caching switched off, computing normally ({reason})", RuntimeWarning, stacklevel=3)

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if args or not self.training or not self.caching or not set(kwargs) <= CACHEABLE_INPUTS \
                or kwargs.get("input_ids") is None or is_fake(kwargs["input_ids"]):
            # a fake tensor (tunelab estimate runs the step on them) has no token ids to cache by
            return self.model(*args, **kwargs)
        lengths = right_padded_lengths(kwargs["input_ids"], kwargs.get("attention_mask"))
        if lengths is None:
            return self.model(**kwargs)
        if not self._checked:
            return self._checked_forward(kwargs, lengths)
        return self._cached_forward(kwargs, lengths)

    def _cached_forward(self, kwargs: dict[str, Any], lengths: list[int]):
        ids = kwargs["input_ids"]
        types = kwargs.get("token_type_ids")
        host_ids = ids.cpu().numpy()
        host_types = types.cpu().numpy() if types is not None else None
        states = []
        for i, n in enumerate(lengths):
            key = host_ids[i, :n].tobytes() + (host_types[i, :n].tobytes() if host_types is not None else b"")
            state = self.cache.get(key)
            if state is None:
                # alone, at its length rounded up as collate rounds (fewer kernel shapes), padding masked
                width = min(-(-n // PAD_MULTIPLE) * PAD_MULTIPLE, ids.shape[1])
                state = self._bottom_output(ids[i:i + 1, :width], None if types is None else types[i:i + 1, :width], n)
                self.cache[key] = state
                self.cache_misses += 1
            else:
                self.cache_hits += 1
            states.append(state)
        hidden = states[0].new_zeros((len(states), ids.shape[1], states[0].shape[-1]))
        for i, state in enumerate(states):  # padding positions stay zero: they are masked for real tokens
            hidden[i, :state.shape[0]] = state
        with self._stubbed_bottom(hidden):
            return self.model(**kwargs)

    def _bottom_output(self, ids: torch.Tensor, types: torch.Tensor | None, length: int) -> torch.Tensor:
        """One row's hidden states entering the first trainable block (its `length` real tokens), computed
        alone: a function of the row only (its padding is masked, whatever it holds)."""
        with torch.no_grad():
            mask = (torch.arange(ids.shape[1], device=ids.device) < length).long()[None, :]
            output = self._through_the_bottom(input_ids=ids, attention_mask=mask,
                                              **({} if types is None else {"token_type_ids": types}))
        if self._as_tuple is None:
            self._as_tuple = isinstance(output, (tuple, list))
        if isinstance(output, (tuple, list)):
            if len(output) != 1:
                raise _Unsupported(f"a block returns {len(output)} values, not just its hidden states")
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            raise _Unsupported(f"a block returns {type(output).__name__}, not a (batch, tokens, hidden) tensor")
        return output[0, :length].detach().clone()

    def _trainable_feeding_bottom(self, kwargs: dict[str, Any], length: int) -> list[str]:
        """Trainable parameters the frozen bottom's output depends on: one shared by every block (MPNet's
        relative attention bias, DeBERTa's relative embeddings) trains above the stack but feeds the bottom
        too, so no output of the bottom stays valid once it has been cached."""
        trainable = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        types = kwargs.get("token_type_ids")
        output = self._through_the_bottom(input_ids=kwargs["input_ids"][:1, :length],
                                          **({} if types is None else {"token_type_ids": types[:1, :length]}))
        output = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return []
        grads = torch.autograd.grad(output.float().sum(), [p for _, p in trainable], allow_unused=True)
        return [name for (name, _), grad in zip(trainable, grads) if grad is not None]

    def _through_the_bottom(self, **inputs):
        """The model's forward on `inputs`, stopped where the last frozen block returns; its output."""
        captured: dict[str, Any] = {}

        def stop(module, args, output):
            captured["output"] = output
            raise _BottomDone

        handle = self._blocks[self.split - 1].register_forward_hook(stop)
        try:
            self.model(**inputs)
        except _BottomDone:
            pass
        finally:
            handle.remove()
        return captured.get("output")

    @contextlib.contextmanager
    def _stubbed_bottom(self, hidden: torch.Tensor):
        blocks = self._blocks
        originals = [blocks[i] for i in range(self.split)]
        try:
            for i, block in enumerate(originals):
                blocks[i] = _Cached(block, hidden, bool(self._as_tuple))
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block

    def _checked_forward(self, kwargs: dict[str, Any], lengths: list[int]):
        """The first cached step of this process, checked against a plain forward with the same dropout
        masks (the frozen bottom draws no random numbers, so both draw the same ones in the same order)."""
        device = kwargs["input_ids"].device
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            feeding = self._trainable_feeding_bottom(kwargs, lengths[0])
        if feeding:  # the first step would agree (warmup starts at lr 0), the later ones not
            self._checked = True
            self.disable_cache(f"trainable parameters feed the frozen bottom of {type(self.model).__name__} "
                               f"({', '.join(feeding[:3])}): its output changes as they train")
            return self.model(**kwargs)
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            plain = self.model(**kwargs)
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if cuda else None)
        try:
            out = self._cached_forward(kwargs, lengths)
            problem = disagreement(out, plain)
        except _Unsupported as exc:
            out, problem = None, str(exc)
        self._checked = True
        if problem is None:
            return out
        self.disable_cache(f"the cached forward does not reproduce the plain one for "
                           f"{type(self.model).__name__}: {problem}")
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state(rng[1], device)
        return self.model(**kwargs)


class _Unsupported(Exception):
    pass


def right_padded_lengths(ids: torch.Tensor, mask: torch.Tensor | None) -> list[int] | None:
    """Each row's real length, or None when the mask is not ones followed by zeros."""
    if ids.dim() != 2:
        return None
    if mask is None:
        return [ids.shape[1]] * ids.shape[0]
    lengths = mask.sum(dim=1)
    expected = torch.arange(ids.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask.bool(), expected) or bool((lengths == 0).any()):
        return None
    return lengths.tolist()


def disagreement(cached, plain) -> str | None:
    """Why the cached and plain outputs differ beyond rounding, or None when they agree."""
    tolerance = CHECK_TOLERANCE["autocast" if torch.is_autocast_enabled(
        plain.logits.device.type if getattr(plain, "logits", None) is not None else "cpu") else "fp32"]
    for field in ("logits", "loss"):
        a, b = getattr(cached, field, None), getattr(plain, field, None)
        if a is None or b is None:
            continue
        a, b = a.detach().float(), b.float()
        if a.shape != b.shape:
            return f"{field} shape {tuple(a.shape)} != {tuple(b.shape)}"
        error = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
        if not error <= tolerance:
            return f"{field} differ by {error:.3g} (relative), more than {tolerance}"
    return None


@register
class Freeze(Method):
    name = "freeze"
    description = "Freeze the bottom: top freeze.k blocks + head trained; the frozen bottom's output cached per row"
    Options = FreezeOptions
    precision_probe = False  # a trial forward would fill the cache

    def check(self, model: nn.Module, opts: FreezeOptions, ctx: PrepareContext) -> list[str]:
        try:
            stack_name, blocks = find_block_list(model)
        except ValueError as exc:
            return [f"freeze: {exc}"]
        if opts.k > len(blocks):
            return [f"freeze.k: {opts.k} is more than the {len(blocks)} transformer blocks of "
                    f"{type(model).__name__}; allowed: 0..{len(blocks)}"]
        nested = stack_problems(model, stack_name, self.name)
        if not nested and self.expected_trainable_params(model, opts, ctx) == 0:
            return [f"freeze.k: 0 leaves nothing to train in {type(model).__name__} (no head of its own, no norm "
                    "after the blocks); use k >= 1"]
        return nested

    def prepare(self, model: nn.Module, opts: FreezeOptions, ctx: PrepareContext) -> nn.Module:
        stack_name, blocks, split = split_model(model, opts.k)
        model.requires_grad_(False)
        for block in blocks[split:]:
            block.requires_grad_(True)
        for _, param in after_stack(model, stack_name):
            param.requires_grad_(True)
        return FrozenBottomModel(model, stack_name, blocks, split, opts.cache)

    def expected_trainable_params(self, base_model: nn.Module, opts: FreezeOptions,
                                  ctx: PrepareContext) -> int:
        # the top k blocks (not k of one size: T5's first block holds the relative position table, ModernBERT's
        # has no attention norm), plus what sits above the stack
        stack_name, blocks = find_block_list(base_model)
        top = blocks[len(blocks) - opts.k:] if opts.k else []
        return sum(p.numel() for block in top for p in block.parameters()) + \
            sum(p.numel() for _, p in after_stack(base_model, stack_name))

    def save(self, model: nn.Module, directory: Path) -> None:
        unwrap(model).save_pretrained(directory)

    def load(self, directory: Path, base_model: nn.Module) -> nn.Module:
        return type(base_model).from_pretrained(directory, **LOAD_OPTIONS)


def unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, FrozenBottomModel) else model
