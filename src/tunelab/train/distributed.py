"""The few collective operations the loop needs when it runs under DistributedDataParallel.

With one process every operation is the identity, so single-process training pays nothing for them. The
process group itself is formed by accelerate (gloo on CPU, NCCL on GPU) from the environment that
`torchrun`, `accelerate launch` or `tunelab compare --nproc N` sets.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import torch

from ..errors import TunelabInputError


class Ranks:
    """This process's place in the group, and collectives that are no-ops for a group of one."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @classmethod
    def of(cls, accelerator) -> "Ranks":
        return cls(accelerator.process_index, accelerator.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a Ctrl-C that reached only some of them)."""
        if self.world == 1:
            return flag
        return bool(self.sum(torch.tensor([int(flag)])).item())

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def leave_process_group() -> None:
    """Destroy the process group before the interpreter exits: left to exit-time teardown, gloo's threads can
    abort a finished process ("terminate called without an active exception", seen once in CI under torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """End a command-line process. One of a launched group (torchrun, accelerate launch, --nproc) skips the
    interpreter's teardown once its files are written and its group is left: C++ destructors of the group's
    threads at exit have aborted finished processes ("terminate called without an active exception": once in
    CI, once in a full local test run, never when repeated alone), failing a launch whose work was all saved."""
    if launched_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch, --nproc) says it started."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_rank() -> int:
    """This process's place among those the launcher started (known before the group forms)."""
    return int(os.environ.get("RANK", "0") or 0)


def launcher_problems(asked: int | None) -> list[str]:
    """Setups that would silently train something else than asked, found before anything runs.

    `accelerate launch --cpu --num_processes N` starts one ordinary process (it only sets MASTER_ADDR for
    N > 1): each such launch would train alone on all the data. `--nproc N` under a launcher states what
    the launcher should have formed."""
    world = launched_world_size()
    if world == 1 and "MASTER_ADDR" in os.environ and "ACCELERATE_USE_CPU" in os.environ:
        return ["accelerate launch started a single process although more were asked for: with --cpu, or "
                "on a machine without a GPU unless --multi_gpu is given, it ignores --num_processes. Use "
                "`accelerate launch --multi_gpu --num_processes N` (tunelab trains on the CPU by itself when "
                "there is no GPU), `torchrun --nproc_per_node N`, or "
                "`tunelab compare --nproc N`"]
    if asked is not None and world > 1 and asked != world:
        return [f"--nproc/--processes: {asked} processes asked for, but the launcher started {world} (WORLD_SIZE); "
                "drop --nproc under torchrun/accelerate launch or make the two agree"]
    return []


def check_world(ranks: Ranks) -> None:
    """Stop when the process group that formed differs from what the launcher started."""
    launched = launched_world_size()
    if ranks.world != launched:
        raise TunelabInputError([
            f"the launcher started {launched} processes (WORLD_SIZE) but they formed a group of {ranks.world}: "
            "each would train alone on all the data. On a CPU-only machine launch with torchrun or "
            "`accelerate launch --multi_gpu` and keep train.device at auto or cpu"])
