"""The memory of one training step, found by running it on fake tensors.

A fake tensor (torch's FakeTensorMode) has a shape, a dtype and a device but no data: every operator of the
real step runs (autocast, the attention kernel torch would choose, dropout masks, the method's own modules,
AdamW's state) at no cost in memory or time, so the bytes alive at each moment can be counted exactly for a
model far larger than this machine. What a formula would have to guess (which dtype autocast keeps a norm's
input in; whether attention with dropout falls back to the kernel that keeps its probabilities; how many
copies of a language model's logits the loss makes) is simply what happens.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Hashable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 2**20
# glibc's malloc serves a request this big or bigger by mmap and unmaps it when freed (its adaptive threshold
# stops growing at 32 MiB on 64-bit systems), so such tensors never stay in the heap after they are freed
LARGE = 32 * MB


@dataclass
class StepMemory:
    """Megabytes of tensors alive at the step's peak, by what they are; they sum to `peak_mb`."""

    weights_mb: float        # parameters and buffers
    gradients_mb: float      # parameter gradients alive at the peak (none yet when it falls in the forward pass)
    optimizer_mb: float      # AdamW state
    activations_mb: float    # everything else: what the forward pass keeps, logits, the backward's temporaries
    large_activations_mb: float = 0.0  # the part of activations in storages of LARGE bytes or more
    # gradients and optimizer state in heap-sized storages, alive at the peak or not: allocated while a step's
    # activations are being freed, they settle in the space those leave in the allocator's heap
    heap_state_mb: float = 0.0
    # the same, at each segment's own peak, when the step was measured by segment
    segments: dict[Hashable, "StepMemory"] = field(default_factory=dict, repr=False)

    def parts(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if k != "segments"}

    @property
    def peak_mb(self) -> float:
        return self.weights_mb + self.gradients_mb + self.optimizer_mb + self.activations_mb


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive as operators create them and Python frees them."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        # storage key → (serial, bytes); a freed storage's key can come back for a new one, its serial not
        self.alive: dict[int, tuple[int, int]] = {}
        self.at_peak: dict[int, int] = {}  # serial → bytes of what was alive when `peak` was reached
        self._serials = itertools.count()
        # the same per segment of the step, when the step is cut into segments (see `step_segments`)
        self.segment: Hashable | None = None
        self.segment_peaks: dict[Hashable, tuple[int, dict[int, int]]] = {}

    def enter(self, segment: Hashable) -> None:
        """What is alive from now on counts toward `segment`'s peak, from what is alive on entering it."""
        self.segment = segment
        if self.live > self.segment_peaks.get(segment, (-1, None))[0]:
            self.segment_peaks[segment] = (self.live, dict(self.alive.values()))

    def track(self, tensor: torch.Tensor) -> None:
        if tensor.layout == torch.sparse_coo:  # a sparse embedding gradient: its two parts hold the bytes
            self.track(tensor._indices())
            self.track(tensor._values())
            return
        storage = tensor.untyped_storage()
        key = storage_key(tensor)
        if key in self.alive:
            return
        self.alive[key] = (next(self._serials), storage.nbytes())
        self.live += storage.nbytes()
        new_peak = self.live > self.peak
        new_segment_peak = self.segment is not None and self.live > self.segment_peaks[self.segment][0]
        if new_peak or new_segment_peak:
            snapshot = dict(self.alive.values())  # one copy serves both
            if new_peak:
                self.peak, self.at_peak = self.live, snapshot
            if new_segment_peak:
                self.segment_peaks[self.segment] = (self.live, snapshot)
        weakref.finalize(storage, self._release, key)

    def serial(self, tensor: torch.Tensor) -> int:
        self.track(tensor)
        return self.alive[storage_key(tensor)][0]

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.live, dict(self.alive.values())

    def _release(self, key: int) -> None:
        self.live -= self.alive.pop(key, (0, 0))[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


@contextlib.contextmanager
def quiet_fake_tensor_errors():
    """FakeTensorMode logs a traceback before it raises; the caller reports the error itself."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata  # one StorageImpl however many views share it


def fake_parameters(model: nn.Module, mode: FakeTensorMode, device: str) -> None:
    """Replace the meta parameters and buffers of a prepared skeleton by fake tensors on `device`; a tensor
    shared by several modules (an output layer tied to the input embedding) stays one tensor."""
    converted: dict[int, torch.Tensor] = {}

    def convert(tensor: torch.Tensor, as_parameter: bool) -> torch.Tensor:
        if id(tensor) not in converted:
            fake = mode.fake_tensor_converter.from_meta_and_device(mode, tensor.detach(), torch.device(device))
            converted[id(tensor)] = nn.Parameter(fake, requires_grad=tensor.requires_grad) if as_parameter else fake
        return converted[id(tensor)]

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = convert(param, True)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = convert(buffer, False)


def create_optimizer_state(optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter]) -> None:
    """AdamW creates its state on its first step, from whatever gradients it is given: zero gradients do it
    without a forward and backward pass, which is most of a fake step's time (minutes for a 7B model)."""
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def padding_row_kept(embedding: nn.Embedding | None):
    """A sparse embedding gradient drops the padding row's entries through `nonzero`, whose output shape a fake
    tensor cannot know; keeping them changes the step's bytes by one small index and value row per padding
    token, and leaves the gradient buffer (the part that matters) as it is."""
    padding = embedding.padding_idx if embedding is not None else None
    if padding is not None:
        embedding.padding_idx = None
    try:
        yield
    finally:
        if padding is not None:
            embedding.padding_idx = padding


def measure_step(model: nn.Module, inputs: dict[str, torch.Tensor], precision: str, device: str,
                 checkpointing: bool = False, frozen_matmul_bf16: bool = False,
                 segmented: bool = False, processes: int = 1, target: str | None = None) -> StepMemory:
    """One AdamW step of `model` (a prepared skeleton on the meta device, changed in place) on `inputs`
    (meta tensors), with the optimizer state a first step creates, as every later step has. `segmented` also
    gives the peak of each segment of the step (see `step_segments`) in `StepMemory.segments`. `processes`:
    how many train together (the loop keeps a CPU embedding gradient only in a process of its own). `target`:
    the device training will run on, where it is not `device` (a GPU planned on a CPU's fake tensors): the
    loop's CPU-only ways (its dropout, the kept embedding gradient) apply only where training is on a CPU."""
    target_device = torch.device(target or device)
    from ..train.embedding_grad import KeptEmbeddingGradient
    from ..train.fast_dropout import cheaper_cpu_dropout
    from ..train.setup import build_optimizer, enable_checkpointing, store_frozen_matmul_weights

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # peft builds small index tensors on the fly
    fake_parameters(model, mode, device)
    if frozen_matmul_bf16:  # as training stores them (see store_frozen_matmul_weights)
        with mode:
            store_frozen_matmul_weights(model, torch.bfloat16)
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    counter = LiveTensorBytes()
    weights = {counter.serial(t) for t in [*model.parameters(), *model.buffers()]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads: set[int] = set()
    grad_bytes: dict[int, int] = {}  # per parameter

    kept = KeptEmbeddingGradient.for_model(model, target_device, processes)

    def on_gradient(param: torch.Tensor) -> None:
        grads.add(counter.serial(param.grad))
        if param.grad is not kept.buffer:  # allocated once, it never moves into a step's freed space
            grad_bytes[id(param)] = param.grad.untyped_storage().nbytes()

    for param in trainable:
        param.register_post_accumulate_grad_hook(on_gradient)
    segments = step_segments(model, counter) if segmented else contextlib.nullcontext(lambda _: None)
    with mode, segments as enter:
        batch = {k: mode.fake_tensor_converter.from_meta_and_device(mode, v, torch.device(device))
                 for k, v in inputs.items()}
        optimizer = build_optimizer([{"params": trainable}])
        autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with counter, cheaper_cpu_dropout(model, target_device), kept.active(), \
                padding_row_kept(kept.embedding):  # as training runs it
            create_optimizer_state(optimizer, trainable)
            kept.zero()  # a kept gradient exists from the first step on
            counter.reset_peak()  # the measured step is every later one: the optimizer state exists
            enter("forward")
            with autocast:
                loss = model(**batch).loss
            enter("backward")
            loss.backward()
            enter("optimizer")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
            state_tensors = [v for state in optimizer.state.values() for v in state.values()
                             if isinstance(v, torch.Tensor)]
            states = {counter.serial(v) for v in state_tensors}

    def classified(at_peak: dict[int, int]) -> dict[str, float]:
        parts = {"weights": 0, "gradients": 0, "optimizer": 0, "activations": 0, "large_activations": 0}
        for serial, size in at_peak.items():
            kind = ("weights" if serial in weights else "gradients" if serial in grads
                    else "optimizer" if serial in states else "activations")
            parts[kind] += size
            parts["large_activations"] += size if kind == "activations" and size >= LARGE else 0
        return {f"{k}_mb": v / MB for k, v in parts.items()}

    state_bytes = [*grad_bytes.values(), *(t.untyped_storage().nbytes() for t in state_tensors)]
    heap_state_mb = sum(size for size in state_bytes if size < LARGE) / MB
    return StepMemory(**classified(counter.at_peak), heap_state_mb=heap_state_mb,
                      segments={name: StepMemory(**classified(at_peak), heap_state_mb=heap_state_mb)
                                for name, (_, at_peak) in counter.segment_peaks.items()})


@contextlib.contextmanager
def step_segments(model: nn.Module, counter: LiveTensorBytes):
    """Cut the step into segments for `counter`: the forward pass before the blocks, each block's forward, the
    rest of the forward, the backward pass down to the top block, each block's backward (from the gradient of
    its output until that of the block below; the lowest one's includes the embeddings'), the optimizer step.

    Yields `enter(name)` for the caller's phases. A block's backward starts when its output's gradient is
    complete (a hook on that tensor); a block recomputed under gradient checkpointing runs its forward inside
    its own backward segment."""
    from ..models.structure import find_block_list

    _, blocks = find_block_list(model)
    phase = {"name": "forward"}

    def enter(name: str) -> None:
        phase["name"] = name
        counter.enter(name)

    def before_block(index: int):
        return lambda module, args: counter.enter(("forward", index)) if phase["name"] == "forward" else None

    def after_block(index: int):
        def hook(module, args, output) -> None:
            if phase["name"] != "forward":  # a recomputation under checkpointing
                return
            if index == len(blocks) - 1:
                counter.enter("forward after the blocks")
            output_tensor = next((t for t in tree_flatten(output)[0]
                                  if isinstance(t, torch.Tensor) and t.requires_grad), None)
            if output_tensor is not None:
                output_tensor.register_hook(lambda grad: counter.enter(("backward", index)))
        return hook

    handles = [hook for index, block in enumerate(blocks)
               for hook in (block.register_forward_pre_hook(before_block(index)),
                            block.register_forward_hook(after_block(index)))]
    try:
        yield enter
    finally:
        for handle in handles:
            handle.remove()
