"""Fault injection for crash-recovery tests: the environment variable TUNELAB_FAULT makes the process
die, raise or be interrupted at a named point, so tests can prove that resume is exact.

    TUNELAB_FAULT="kill@step=5"          SIGKILL right after optimizer step 5 (any method)
    TUNELAB_FAULT="lora/raise@step=2"    an exception in method lora after step 2
    TUNELAB_FAULT="kill@checkpoint"      SIGKILL in the middle of writing a checkpoint
    TUNELAB_FAULT="interrupt@step=3"     the same as Ctrl-C after step 3
    TUNELAB_FAULT="abort@step=3"         Ctrl-C twice after step 3 (the second aborts)

With TUNELAB_FAULT_RANK=N only process rank N of a multi-process run (its RANK variable) takes the fault.

Unset (always, outside tests) it costs one dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal

current_method: str | None = None


class InjectedFault(RuntimeError):
    pass


def fault_point(point: str) -> None:
    spec = os.environ.get("TUNELAB_FAULT")
    if not spec:
        return
    target, _, rest = spec.rpartition("/")
    action, _, where = rest.partition("@")
    if where != point or (target and target != current_method):
        return
    rank = os.environ.get("TUNELAB_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise InjectedFault(f"injected fault at {point}")
    elif action == "interrupt":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "abort":
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
