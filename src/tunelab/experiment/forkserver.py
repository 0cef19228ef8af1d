"""Start each run's process by forking one that has already imported the libraries, not a fresh interpreter.

A fresh interpreter spends about 6 s importing torch, transformers and peft and 1.4 s tearing them down
(2 cores of an AVX2 AMD EPYC); a small run trains in less. The server imports them once per experiment and
forks a process per run from itself. Each run still gets a new process: its own memory, peak and failures.
The server never runs a tensor operation, so nothing one run does reaches the next, and no thread pool
exists yet when it forks.

The parent and the server talk over a Unix socket pair. A request (JSON: module, args, environment, working
folder) carries the parent's current stdin, stdout and stderr (SCM_RIGHTS), so a run writes where the
parent writes now (a terminal, a log file, pytest's capture). The server answers with the run's pid, and
later with its exit code (negative: killed by that signal, as subprocess reports it).

`TUNELAB_FORK_SERVER=0` starts fresh interpreters instead; so do machines with a CUDA device and systems other
than Linux unless `TUNELAB_FORK_SERVER=1` (see `wanted`).
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MESSAGE_BYTES = 1 << 20
_shared: "ForkServer | None" = None
forked_run = False  # set in a process the server forked


def wanted() -> bool:
    """On Linux without a CUDA device, unless TUNELAB_FORK_SERVER says otherwise (0: never, 1: also with one).
    macOS is left out because forking a process that has loaded its system frameworks is unsafe there; CUDA
    because its runtime does not survive a fork once touched, and the server is only measured on CPUs."""
    setting = os.environ.get("TUNELAB_FORK_SERVER", "")
    if setting in ("0", "1") or not sys.platform.startswith("linux"):
        return setting == "1" and hasattr(os, "fork")
    import torch

    return not torch.cuda.is_available()


def start_mode() -> str:
    return "fork server" if wanted() else "fresh interpreter"


# Read by libraries once, when they load (thread pools, allocator, hash seed, warnings, library settings): a run
# forked from a server started under other values would not follow them, so such a change starts a new server.
# OMP_NUM_THREADS is not among them: each run sets torch's thread count from its own environment.
FROZEN_AT_IMPORT = ("OMP_", "MKL_", "OPENBLAS_", "GOMP_", "KMP_", "MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD",
                    "PYTHONHASHSEED", "PYTHONWARNINGS", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "TOKENIZERS_")


def frozen_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(FROZEN_AT_IMPORT) and k != "OMP_NUM_THREADS"}


def shared_server(env: dict[str, str] | None = None) -> "ForkServer | None":
    """This process's server, started on first use, and again after it has left or when `env` (default: this
    process's) differs from its own in what libraries read once at import."""
    global _shared
    if not wanted():
        return None
    env = dict(os.environ) if env is None else env
    if _shared is not None and _shared.alive and _shared.frozen != frozen_environment(env):
        _shared.close(wait=False)  # it leaves once its runs have ended
    if _shared is None or not _shared.alive:
        _shared = ForkServer(env)
        atexit.register(_shared.close)
    return _shared


def warm_up(model_path: str | None = None) -> None:
    """Start the server now, so its imports overlap the caller's work, and have it import this model's module."""
    server = shared_server()
    if server is not None and model_path:
        try:
            server.preload(model_modules(model_path))
        except ServerLeft:  # it left while idle: the first run starts another
            pass


def model_modules(model_path: str) -> list[str]:
    """The model's transformers module (its class is looked up by model_type); none when unknown."""
    try:
        model_type = json.loads((Path(model_path) / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    return [f"transformers.models.{name}.modeling_{name}"]


def start_process(module: str, args: list[str], env: dict[str, str], streams: tuple[int, int, int] = (0, 1, 2),
                  ignore_sigint: bool | None = None):
    """`module`.main(args) in a new process (a Popen, or what behaves as one): forked from the shared server,
    else a fresh interpreter running `python -m module args`. It ignores SIGINT where `ignore_sigint` says so
    (None: where this process ignores it now, as a fresh interpreter would inherit)."""
    ignored_here = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    ignore_sigint = ignored_here if ignore_sigint is None else ignore_sigint
    for attempt in range(2):
        server = shared_server(env)
        if server is None:
            break
        try:
            return server.start(module, args, env, streams, ignore_sigint)
        except ServerLeft:
            if attempt:
                raise
    stdin, stdout, stderr = streams
    # An ignored signal stays ignored across exec, a handled one does not: where the run must differ from this
    # process, its disposition is set in the child between fork and exec (so this process need not ignore
    # Ctrl-C meanwhile, and lose one that comes then).
    disposition = signal.SIG_IGN if ignore_sigint else signal.SIG_DFL
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdin=stdin, stdout=stdout,
                            stderr=stderr, preexec_fn=None if ignore_sigint == ignored_here
                            else functools.partial(signal.signal, signal.SIGINT, disposition))


def run_captured(module: str, args: list[str], timeout: float,
                 env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`module`.main(args) in a process started as a run's is: (exit code, stdout, stderr). Measurements of
    a process (its resident size, what its allocator keeps) then hold for the runs."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = start_process(module, args, dict(os.environ) if env is None else env,
                                (0, out.fileno(), err.fileno()))
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


class ServerLeft(RuntimeError):
    """The server was gone before it forked (it had been idle): a new one can take the request."""


class ForkServer:
    """The parent's side: `start` a module's main(args) in a forked process, then poll it like a Popen."""

    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        self.frozen = frozen_environment(env)
        # set before the server's first import (`-m` imports the tunelab package, and torch with it)
        server_env = {**{k: v for k, v in env.items() if k != "OMP_NUM_THREADS"},  # torch's own default
                      "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),  # runs never download; the parent did
                      "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}  # is_available() without CUDA's runtime
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # imported by name, not run with -m: `import tunelab` has imported this module already (runpy warned
        # that it "may result in unpredictable behaviour" on every compare)
        serve_here = (f"import socket, sys; from {__package__}.fork_serving import serve; "
                      "serve(socket.socket(fileno=int(sys.argv[1])))")
        self.process = subprocess.Popen([sys.executable, "-c", serve_here, str(theirs.fileno())], env=server_env,
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock = ours
        self.exit_codes: dict[int, int] = {}
        self.connected = True
        self.requests = 0

    @property
    def alive(self) -> bool:
        return self.connected and self.process.poll() is None

    def preload(self, modules: list[str]) -> None:
        if modules:
            self._send({"import": modules}, [])

    def start(self, module: str, args: list[str], env: dict[str, str],
              streams: tuple[int, int, int] = (0, 1, 2), ignore_sigint: bool = False) -> "ForkedProcess":
        """`module`.main(args) in a forked process with `env`, this folder and `streams` as stdin/out/err."""
        flush_standard_streams()  # what the parent printed comes before what the run prints
        self.requests += 1  # echoed in the reply: one left unread by an interrupted start is not taken for this
        self._send({"id": self.requests, "module": module, "args": args, "env": env, "cwd": os.getcwd(),
                    "path": sys.path, "ignore_sigint": ignore_sigint}, list(streams))
        while True:
            reply = self._receive(timeout=None)
            if reply is None:
                code = self.process.wait()
                if code == 0:
                    raise ServerLeft("the fork server had left")
                raise RuntimeError(f"tunelab's fork server ended (exit code {code}); set TUNELAB_FORK_SERVER=0 "
                                   "to start each run in a fresh interpreter")
            if reply.get("id") == self.requests and "error" in reply:
                raise RuntimeError(f"tunelab's fork server could not start the run: {reply['error']}")
            if reply.get("id") == self.requests:
                self.exit_codes.pop(reply["pid"], None)  # a reused pid's earlier run ended before this reply
                return ForkedProcess(self, reply["pid"])

    def _send(self, message: dict, fds: list[int]) -> None:
        try:
            socket.send_fds(self.sock, [json.dumps(message).encode()], fds)
        except (BrokenPipeError, ConnectionResetError) as error:  # it left while idle
            self.connected = False
            raise ServerLeft("the fork server had left") from error

    def returncode(self, pid: int, timeout: float | None = 0.0) -> int | None:
        """The run's exit code once it has ended, waiting up to `timeout` seconds (None: until it ends)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self.exit_codes:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.connected:  # the server died: its orphaned run can only be watched
                if not is_running(pid):
                    self.exit_codes[pid] = 255
                elif left != 0.0:
                    time.sleep(0.1 if left is None else min(0.1, left))
                    continue
                break
            if self._receive(timeout=left) is None and left == 0.0:
                break
        return self.exit_codes.get(pid)

    def _receive(self, timeout: float | None) -> dict | None:
        """One message (an exit is also filed); None when none came in time or the server is gone."""
        if not self.connected or not select.select([self.sock], [], [], timeout)[0]:
            return None
        data = self.sock.recv(MESSAGE_BYTES)
        if not data:
            self.connected = False
            return None
        message = json.loads(data)
        if "exit" in message:
            self.exit_codes[message["pid"]] = message["exit"]
        return message

    def close(self, wait: bool = True) -> None:
        """No more runs: the server leaves once the ones it started have ended."""
        self.sock.close()
        self.connected = False
        try:
            self.process.wait(timeout=30 if wait else 0)
        except subprocess.TimeoutExpired:
            pass  # still reaping runs that are finishing; it leaves after them


class ForkedProcess:
    """The part of subprocess.Popen that running a run needs."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid = server, pid

    @property
    def returncode(self) -> int | None:
        return self.server.exit_codes.get(self.pid)

    def poll(self) -> int | None:
        return self.server.returncode(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        code = self.server.returncode(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # an ended run's pid may already belong to another process
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its descriptor is gone: nothing left to lose
            pass
