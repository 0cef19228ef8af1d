"""A deep model's step memory from fake steps of two shallow copies of it.

A fake step costs time per operator, so a 32-block model takes ten times as long as a 3-block one (about 9 s
per step for a 7B Llama on this project's CPUs; an estimate runs two steps per method). When every block is
the same (same modules, parameters, trainable flags, per-layer config), the bytes alive at any moment of a
step are exactly affine in the number of blocks and in the position of the block running:

- outside the blocks (the forward before and after them, the backward down to the top block, the optimizer
  step), what is alive grows by the same amount per block (weights, optimizer state, kept activations);
- inside block i of D, what is alive is what the segment itself allocates, plus a sum over the blocks below
  and above it: affine in i and D. Over the interior blocks the peak is then at the lowest or the highest of
  them. The lowest and the top block are segments of their own (the lowest one's backward also computes the
  embeddings' gradients; the top one's forward follows the last interior block).

So each segment's peak, and what it is made of, is measured at depths 3 and 4 (`measure_step(segmented=True)`)
and extrapolated; the largest extrapolated segment is the step's peak. Anything that would break the
premise refuses the shortcut and the caller runs the whole depth: blocks that differ (a method training the
top k, alternating layer types, dense and mixture-of-experts blocks), a config whose per-layer lists are not
uniform, parameter counts that do not grow by whole blocks.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Hashable

from torch import nn

from ..models.structure import find_block_list
from .fake_step import StepMemory

SHALLOW_DEPTHS = (3, 4)  # the least that separates the lowest, interior and top blocks and fits a slope each
WORTH_IT_FROM = 9  # blocks: tracing 3 + 4 of them must cost clearly less than tracing all
PEAK_PARTS = ("weights_mb", "gradients_mb", "optimizer_mb", "activations_mb", "large_activations_mb")


def shallow_configs(config, layers: int) -> dict[int, Any] | None:
    """The model's config at each shallow depth, or None when the blocks are not all configured alike."""
    if layers < WORTH_IT_FROM:
        return None
    per_layer = {key: value for key, value in config.to_dict().items()
                 if isinstance(value, (list, tuple)) and len(value) == layers}
    if any(len({repr(v) for v in value}) > 1 for value in per_layer.values()):  # e.g. sliding and full attention
        return None
    shallow = {}
    for depth in SHALLOW_DEPTHS:
        changed = copy.deepcopy(config)
        changed.num_hidden_layers = depth  # every config maps its own name for it (n_layer, num_layers) here
        for key, value in per_layer.items():
            setattr(changed, key, type(value)(value[:depth]))
        shallow[depth] = changed
    return shallow


def block_signature(block: nn.Module) -> tuple:
    return (tuple(type(m).__name__ for m in block.modules()),
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in block.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers()))


def counts(model: nn.Module) -> tuple[int, int, int]:
    return (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(b.numel() for b in model.buffers()))


def same_blocks_grown(full: nn.Module, shallow: dict[int, nn.Module]) -> bool:
    """Every block of the prepared full model and of the prepared shallow ones is the same, and the shallow
    models differ from the full one by whole blocks only."""
    _, blocks = find_block_list(full)
    signature = block_signature(blocks[0])
    if any(block_signature(b) != signature for b in blocks):
        return False
    for depth, model in shallow.items():
        _, shallow_blocks = find_block_list(model)
        if len(shallow_blocks) != depth or any(block_signature(b) != signature for b in shallow_blocks):
            return False
    (d1, m1), (d2, m2) = sorted(shallow.items())
    c1, c2 = counts(m1), counts(m2)
    return all(a * (d2 - d1) + (b - a) * (len(blocks) - d1) == whole * (d2 - d1)
               for a, b, whole in zip(c1, c2, counts(full)))


def extrapolated_step(full: nn.Module, prepare_at: Callable[[int], nn.Module],
                      measure: Callable[[nn.Module], StepMemory]) -> StepMemory | None:
    """The step of `full` (a prepared skeleton of `layers` blocks) from segmented fake steps of the models
    `prepare_at(depth)` returns, or None when those are not the same model with fewer blocks."""
    try:
        shallow = {depth: prepare_at(depth) for depth in SHALLOW_DEPTHS}
    except Exception:  # noqa: BLE001 - a config that cannot be built shallower: trace the whole depth instead
        return None
    if not same_blocks_grown(full, shallow):
        return None
    steps = {depth: measure(model) for depth, model in shallow.items()}
    return extrapolate(steps, len(find_block_list(full)[1]))


def extrapolate(steps: dict[int, StepMemory], layers: int) -> StepMemory | None:
    (d1, s1), (d2, s2) = sorted(steps.items())
    first, second = by_position(s1.segments, d1), by_position(s2.segments, d2)
    if set(second) != set(first) | {(*k[:-1], "interior+1") for k in first if k[-1] == "interior"}:
        return None  # a segment that one depth has and the other not: not the same step

    per_block = (layers - d1) / (d2 - d1)

    def affine(at_first: StepMemory, per_depth: StepMemory, per_index: StepMemory | None, index: int):
        """Parts of the segment at depth `layers` (index: interior block's, from the first interior one)."""
        return {k: max(0.0, getattr(at_first, k) + (getattr(per_depth, k) - getattr(at_first, k)) * per_block
                       + ((getattr(per_index, k) - getattr(per_depth, k)) * index if per_index else 0.0))
                for k in PEAK_PARTS}

    candidates = []
    for key, at_first in first.items():
        if key[-1] != "interior":
            candidates.append(affine(at_first, second[key], None, 0))
        else:  # interior block i of D, affine in both: measured at (1, d1), (1, d2) and (2, d2)
            next_one = second[(*key[:-1], "interior+1")]
            candidates += [affine(at_first, second[key], next_one, index) for index in (0, layers - 3)]
    peak = max(candidates, key=lambda parts: sum(v for k, v in parts.items() if k != "large_activations_mb"))
    heap = s1.heap_state_mb + (s2.heap_state_mb - s1.heap_state_mb) * per_block
    return StepMemory(**peak, heap_state_mb=heap)


def by_position(segments: dict[Hashable, StepMemory], depth: int) -> dict[tuple, StepMemory]:
    """Segments keyed by where they are: a block's by lowest, top or interior (the first interior block, and
    at the larger depth the second one as "interior+1"); the others by their name."""
    named = {}
    for key, step in segments.items():
        if not isinstance(key, tuple):
            named[(key,)] = step
            continue
        phase, index = key
        if index in (0, depth - 1):
            named[(phase, "lowest" if index == 0 else "top")] = step
        elif index in (1, 2):
            named[(phase, "interior" if index == 1 else "interior+1")] = step
    return named
