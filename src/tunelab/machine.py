"""Facts about this machine that several parts share: its CPU's name, tunelab's cache of measurements, and the
threads each of several processes on it gets."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def cache_folder() -> Path:
    """Where measurements of this machine are kept ($TUNELAB_CACHE, else ~/.cache/tunelab)."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")  # (set but empty: unset)


def read_measurements(name: str) -> dict:
    """The measurements kept in the cache file `name`; none when it is missing or unreadable."""
    try:
        return json.loads((cache_folder() / name).read_text())
    except (OSError, ValueError):
        return {}


def keep_measurement(name: str, key: str, entry: dict) -> None:
    """Adds one measurement to the cache file `name`. Written whole to a temporary file and renamed, so that a
    process reading at the same time never sees half a file; where the folder cannot be written, nothing is
    kept and the next run measures again."""
    path = cache_folder() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**read_measurements(name), key: entry}, indent=1))
        tmp.replace(path)
    except OSError:
        pass


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
