"""Facts about this machine that several parts share: its CPU's name, tunelab's cache folder, and the threads
each of several processes on it gets."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_folder() -> Path:
    """Where measurements of this machine are kept ($TUNELAB_CACHE, else ~/.cache/tunelab)."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
                        platform.processor() or "cpu")
    except OSError:
        return platform.processor() or "cpu"


def threads_per_process(nproc: int) -> int:
    """The cores shared out among `nproc` processes on this machine (`--nproc`), at least one each."""
    return max(1, (os.cpu_count() or 1) // nproc)
