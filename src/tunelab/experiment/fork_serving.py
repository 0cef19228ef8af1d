"""The fork server's side (see forkserver, the side that asks): it imports the libraries every run needs once,
then forks a process per request, gives it the caller's streams, folder and environment, and reports its pid
and later its exit code. It never runs a tensor operation itself, so no thread pool exists when it forks."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback

from . import forkserver
from .forkserver import MESSAGE_BYTES, flush_standard_streams

# what every run imports: starting these in the server is the point of it
PRELOAD = ["torch", "transformers", "peft", "accelerate", "torch.utils.tensorboard", "tqdm.auto",
           "tunelab.experiment.worker", "tunelab.experiment.runner"]
# A server nobody has used for this long leaves (its memory is the user's); the next use starts another.
IDLE_EXIT_S = 600


def serve(sock: socket.socket) -> None:
    # Ctrl-C reaches the whole process group: the runs checkpoint on it, and the server must outlive them
    # to report how they ended.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    import_quietly(PRELOAD)
    import torch

    default_threads = torch.get_num_threads()
    idle_exit_s = float(os.environ.get("TUNELAB_FORK_SERVER_IDLE_S", IDLE_EXIT_S))
    running: set[int] = set()
    accepting, last_busy = True, time.monotonic()
    while accepting or running:
        if accepting and not running and time.monotonic() - last_busy > idle_exit_s:
            break
        if running and os.getppid() != parent:  # the parent was killed: nobody waits for these runs any more
            accepting = False
            stop_orphans(running)
        if select.select([sock] if accepting else [], [], [], 0.05)[0]:
            data, fds, _, _ = socket.recv_fds(sock, MESSAGE_BYTES, 3)
            accepting, last_busy = bool(data), time.monotonic()
            request = json.loads(data) if data else {}
            if "import" in request:
                import_quietly(request["import"])
            elif "module" in request:
                try:
                    pid = fork_run(request, fds, sock, default_threads)
                except OSError as error:  # e.g. no memory left to fork: this run fails, the server goes on
                    tell(sock, {"id": request["id"], "error": str(error)})
                else:
                    running.add(pid)
                    tell(sock, {"id": request["id"], "pid": pid})
            for fd in fds:
                os.close(fd)
        for pid in list(running):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                running.discard(pid)
                last_busy = time.monotonic()
                tell(sock, {"pid": pid, "exit": os.waitstatus_to_exitcode(status)})
    sock.close()


def stop_orphans(running: set[int]) -> None:
    """SIGKILL, not a stop after the step: a --resume may already be starting in the same folder, and two
    processes writing one run's checkpoints would spoil them. The run resumes from its last checkpoint."""
    for pid in running:
        with contextlib.suppress(ProcessLookupError):  # ended already, not yet reaped
            os.kill(pid, signal.SIGKILL)


def import_quietly(modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 — an optional speed-up: the run imports what it needs itself
            pass


def tell(sock: socket.socket, message: dict) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:  # the parent is gone: keep reaping the runs it left
        pass


def fork_run(request: dict, fds: list[int], sock: socket.socket, default_threads: int) -> int:
    flush_standard_streams()  # or each run would print what the server left in its buffers
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sock.close()
        become_run(request, fds, default_threads)
        code = importlib.import_module(request["module"]).main(request["args"])
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:  # as Python ends on an uncaught one: killed by SIGINT
        traceback.print_exc()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 — reported like an uncaught exception in a fresh interpreter
        traceback.print_exc()
    finally:
        # No interpreter teardown (the 1.4 s this module saves on the way out): the run has closed its files.
        flush_standard_streams()
        os._exit(code or 0)


def become_run(request: dict, fds: list[int], default_threads: int) -> None:
    """Give the forked process what a fresh one would have: signals, streams, folder, environment, threads."""
    import torch

    forkserver.forked_run = True
    signal.signal(signal.SIGINT, signal.SIG_IGN if request["ignore_sigint"] else signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["module"], *request["args"]]
    sys.path[:] = request["path"]
    # torch read OMP_NUM_THREADS when the server imported it; a run (e.g. one of --nproc N) may set its own
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else default_threads)
