"""Fully sharded data parallel (torch's FSDP2, `fully_shard`) for `train.fsdp`: each process holds 1/N of
every parameter, gradient and optimizer state, gathering one transformer block's weights at a time.

accelerate offers FSDP on GPUs only, so tunelab shards with torch directly (the same `fully_shard` accelerate
and torchtitan use), over whatever group accelerate formed: gloo on CPU, NCCL on GPU. Everything outside the
step sees whole tensors: best weights, checkpoints and the artifact are gathered (collectives every process
joins in the same order), so a checkpoint has the same format with or without sharding and resumes under
any process count. Helpers here are the identity for a model that is not sharded.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from typing import Any

import torch
from torch import nn

from ..models.structure import find_block_list
from .distributed import Ranks


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """Shard every transformer block, then the rest (embeddings, head, a prompt encoder) as the root group.

    One group per block is what bounds memory: a block's weights are whole only while it runs. The parameters
    move to `device`, one shard each. Only the main process has read the weights (the others built the model on
    the meta device, so no process but one ever holds the whole model): they come from it, tensor by tensor,
    each process keeping its shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cpu":
        return_freed_memory_to_the_system()
    whole_params = dict(model.named_parameters()) if ranks.is_main else {}  # kept alive past fully_shard
    mesh = init_device_mesh(device.type, (ranks.world,))
    _, blocks = find_block_list(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _fill_from_main(model, whole_params, device, ranks)
    return model


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_memory_to_the_system(threshold_bytes: int = 1 << 20) -> bool:
    """Give every allocation from `threshold_bytes` on its own memory mapping, returned to the system when freed.

    Sharded training on a CPU gathers each block's weights and frees them again, every step. glibc serves
    allocations under its mmap threshold from its heap, raises that threshold (up to 32 MB) after large frees,
    and did not reuse or return those freed blocks: measured on a 12-block, 150M-parameter BERT over 2 processes,
    each process grew to the whole model gathered and more (LoRA: 3.8 and 2.9 GB peak after 8 steps against 1.05
    GB with a fixed threshold; full fine-tuning 5.1 and 4.6 GB against 3.2 and 2.6 GB; step times within the
    machine's noise). Small tensors pay for it: SmolLM2-135M trained 10-40 % slower, for 20-25 % less memory.
    False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError, TypeError):
        return False


def _fill_from_main(model: nn.Module, whole_params: dict[str, torch.Tensor], device: torch.device,
                    ranks: Ranks) -> None:
    """Weights, buffers and random state of the main process's model on every process, one whole tensor at a
    time. Buffers go too, the non-persistent ones (rotary frequencies, position ids) included, which a meta
    model never computed. The random state goes because the main process drew its new weights (a head,
    adapters) and the others did not: every process then continues exactly as if each had loaded and prepared
    the model itself. (torch's set_model_state_dict with broadcast_from_rank0 misses a parameter reachable under
    two names, as peft's prompt-learning models hold the word embeddings.)"""
    if not ranks.is_main:
        model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a shared parameter once, under its first name
            full = whole_params[name].to(device) if ranks.is_main else torch.empty(param.shape, dtype=param.dtype,
                                                                                   device=device)
            torch.distributed.broadcast(full, src=0)
            param.copy_(shard_of(full, param))
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    torch.set_rng_state(ranks.broadcast(torch.get_rng_state()))


def resharded(model: nn.Module) -> nn.Module:
    """`model` with every group back in its shards. After a forward without backward (evaluation) the root group
    stays gathered, and its module attributes are then the gathered copies: a weight written there would be lost
    at the next reshard, so reads and writes of weights go through the shards."""
    for module in model.modules():
        if is_sharded(module):
            module.reshard()
    return model


def groups_on_shards(model: nn.Module, groups: list[dict]) -> list[dict]:
    """`groups` holding the sharded parameters. A method that runs a forward while it builds its groups (LLRD
    traces which modules run after the last block) leaves the root group gathered, and `named_parameters()`
    then gives the gathered copies: an optimizer holding those stepped tensors that the next gather overwrote,
    so the embeddings and the head never trained."""
    names = {id(p): name for name, p in model.named_parameters()}
    sharded = dict(resharded(model).named_parameters())
    return [{**group, "params": [sharded[names[id(p)]] for p in group["params"]]} for group in groups]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a shard (a collective: every process must call it), else `tensor` itself."""
    return tensor.full_tensor() if isinstance(tensor, _dtensor()) else tensor


def shard_of(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of the full tensor `value`, laid out as the sharded `like` (no communication:
    every process holds `value`)."""
    if not isinstance(like, _dtensor()):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, accelerator, enabled: bool):
    """Reduce gradients in this backward pass only when `enabled` (the last micro-batch of a step)."""
    if enabled:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def gathered_optimizer_state(optimizer, keep: bool) -> dict[str, Any] | None:
    """optimizer.state_dict() with every sharded state gathered whole (on every process: a collective);
    returned where `keep`, else None."""
    state = optimizer.state_dict()
    gathered = {index: {k: whole(v) for k, v in entry.items()} for index, entry in state["state"].items()}
    if not keep:
        return None
    return {**state, "state": {i: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in e.items()}
                               for i, e in gathered.items()}}


def sharded_optimizer_state(optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A whole optimizer state (as `gathered_optimizer_state` wrote it) cut to this process's shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, _dtensor()) for p in params):
        return state
    return {**state, "state": {index: {k: shard_of(v, params[index]) if _is_per_element(v, params[index]) else v
                                       for k, v in entry.items()}
                               for index, entry in state["state"].items()}}


def _is_per_element(value: Any, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape)


def make_plain(model: nn.Module, keep: bool, trainable_only: bool = False) -> None:
    """Replace sharded parameters by their whole tensors (a collective) where `keep`, so the trained model can be
    saved by each method's own code; the model must not run sharded afterwards. Tied parameters stay tied.
    `trainable_only` for a method that saves only what it trained (an adapter): a frozen base is never gathered,
    which for a large model is most of it."""
    if not is_sharded(model):
        return
    resharded(model)  # (the pre-save hooks would otherwise put the shards back)
    replaced: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if trainable_only and not param.requires_grad:
            continue
        if id(param) not in replaced:
            full = whole(param).detach().cpu()
            replaced[id(param)] = nn.Parameter(full, requires_grad=param.requires_grad) if keep else param
        if keep:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = replaced[id(param)]
