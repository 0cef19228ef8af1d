"""A module for tests/test_forkserver.py to start in a process: reports what that process was given."""
from __future__ import annotations

import json
import os
import signal
import sys


def main(args: list[str]) -> int:
    if args and args[0] == "kill-self":
        os.kill(os.getpid(), signal.SIGKILL)
    if args and args[0] == "raise":
        raise ValueError("raised in the run")
    threads = None
    if "torch" in sys.modules:  # forked from the server: torch is there already, at no cost
        threads = sys.modules["torch"].get_num_threads()
    print(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "probe": os.environ.get("TUNELAB_PROBE"),
                      "threads": threads, "args": args,
                      "ignores_ctrl_c": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}))
    print("to stderr", file=sys.stderr)
    return int(args[0]) if args and args[0].isdigit() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
