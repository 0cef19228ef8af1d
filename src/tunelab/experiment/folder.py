"""The experiment folder: one run at a time (a lock file), the resolved config it was started with
(run.json), and what is already finished there (for --resume)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import ExperimentConfig, from_dict
from ..errors import TunelabInputError

LOCK = ".tunelab.lock"
RUN_FILE = "run.json"
FINISHED = ("success", "diverged")  # a diverged method is a result, not something to retry
# What a folder holds and how a resumed run goes on (checkpoint contents, records, early-stopping rules): a
# tunelab that changes any of them bumps this, and refuses to resume folders of another format instead of
# continuing them under rules they were not started with. Folders that recorded none are format 1.
FOLDER_FORMAT = 1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExperimentLock:
    """An exclusive lock on the folder; a lock left by a dead process on this host is taken over."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK

    def __enter__(self) -> "ExperimentLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    holder = self._holder()
                    raise TunelabInputError([f"--output: {str(self.path.parent)!r} is in use by another tunelab "
                                             f"run (pid {holder.get('pid')} on {holder.get('host')}); wait for it "
                                             "or choose another folder"]) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, fh)
            return self
        raise TunelabInputError([f"--output: could not lock {str(self.path.parent)!r}"])

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self) -> bool:
        holder = self._holder()
        if not holder:  # unreadable: its writer died between create and write
            return True
        return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def write_run_file(folder: Path, cfg: ExperimentConfig, flags: dict[str, Any] | None = None,
                   data_fingerprint: str | None = None) -> None:
    """The config, the run flags (--seeds, --tune) and a hash of the encoded data an experiment was started
    with: --resume continues it."""
    payload = {"format": FOLDER_FORMAT, "tunelab": __version__, "config_hash": cfg.fingerprint(),
               "config": cfg.to_dict(), "flags": flags or {}, "data_fingerprint": data_fingerprint}
    tmp = folder / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(folder / RUN_FILE)  # a process killed mid-write leaves the earlier file, not half of one


def run_file(folder: Path) -> dict[str, Any]:
    """run.json's contents ({} where there is none); one that does not read is an error naming it."""
    path = folder / RUN_FILE
    if not path.is_file():
        return {}
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TunelabInputError([f"--resume: {str(path)!r} does not read ({exc}); it holds the config the "
                                 "experiment was started with: restore it from a backup, or start again in another "
                                 "folder"]) from None
    if not isinstance(payload, dict):
        raise TunelabInputError([f"--resume: {str(path)!r} is not a tunelab run file (not a JSON object)"])
    return payload


def format_problems(folder: Path) -> list[str]:
    """--resume of a folder another tunelab wrote in another format: refused, naming the version to finish it
    with (its checkpoints and records would be read, and its runs continued, by rules it did not start under)."""
    saved = run_file(folder)
    started = saved.get("format", 1)
    if started == FOLDER_FORMAT:
        return []
    by = f"tunelab {saved['tunelab']}" if saved.get("tunelab") else "an earlier tunelab"
    newer = isinstance(started, int) and started > FOLDER_FORMAT
    return [f"--resume: {str(folder)!r} was started by {by} (folder format {started}); this tunelab "
            f"{__version__} resumes format {FOLDER_FORMAT} only: "
            + (f"upgrade tunelab to {by.split()[-1]} or later" if newer else f"finish it with {by}")
            + ", or start it again in another folder"]


def changed_data_problems(folder: Path, fingerprint: str, allow_change: bool | None) -> list[str]:
    """The config names the data files, not what is in them: an edited file (or another tokenizer behind the
    same name) resumed silently, the first steps trained on the old rows and the rest on the new."""
    started = run_file(folder)
    saved = started.get("data_fingerprint")
    if saved is None or saved == fingerprint or allow_change:  # (folders of earlier versions kept none)
        return []
    remedy = "pass --allow-config-change to continue on these" if allow_change is not None else \
        "start another sweep for these"
    # earlier tunelabs drew causal-lm rows otherwise: with no format recorded, after the caps; then, before
    # the carve, tokenizing every row (same format: it changed which rows are drawn, not what a folder holds)
    return [f"--resume: the data differ from those {str(folder)!r} was started with (a data file, the dataset or "
            f"the tokenizer changed since, or an earlier tunelab drew the causal-lm rows otherwise); its finished "
            f"runs and checkpoints trained on the earlier rows: restore them, or {remedy}"]


def resumed_flags(folder: Path, given: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The run flags of a resumed experiment: what it was started with, unless given (None: not given). A
    flag given with another value is a problem: resuming a 3-seed comparison as a 1-seed one would rewrite
    its results without the other seeds."""
    saved = saved_flags(folder)
    flags, problems = {}, []
    for name, default in defaults.items():
        started = saved.get(name, default)
        flags[name] = started if given.get(name) is None else given[name]
        if flags[name] != started:
            problems.append(f"--{name}: {flags[name]}, but {str(folder)!r} was started with --{name} {started}; "
                            f"resume it with --{name} {started} (or leave --{name} out)")
    return flags, problems


def saved_flags(folder: Path) -> dict[str, Any]:
    return run_file(folder).get("flags", {})


def command_problems(folder: Path, command: str) -> list[str]:
    """--resume continues what the folder holds: a sweep resumed by `compare` (or the reverse) would mix a new
    experiment's files into it."""
    started = saved_flags(folder).get("command", command)  # folders of earlier versions did not record it
    if started == command:
        return []
    return [f"--resume: {str(folder)!r} holds a `tunelab {started}` experiment, not a {command}; continue it with "
            f"`tunelab {started} --resume --output {folder}`"]


def saved_config(folder: Path) -> tuple[ExperimentConfig, str]:
    if not (folder / RUN_FILE).is_file():
        raise TunelabInputError([f"--resume: {str(folder)!r} holds no tunelab experiment (no {RUN_FILE})"])
    payload = run_file(folder)
    if not isinstance(payload.get("config"), dict):
        raise TunelabInputError([f"--resume: {str(folder / RUN_FILE)!r} is not a tunelab run file (no config in it)"])
    problems: list[str] = []
    cfg = from_dict(payload["config"], problems)
    if problems:
        raise TunelabInputError([f"--resume: the saved config no longer loads: {p}" for p in problems])
    return cfg, payload.get("config_hash")


def finished_records(folder: Path) -> dict[str, dict[str, Any]]:
    """The runs --resume does not train again, by run id: those in results.json, and those whose process wrote
    its record (records/) before the experiment's own process was killed and could add it there."""
    found = {}
    for path in sorted((folder / "records").glob("*.json")):
        record = read_record(path)
        if record is not None:
            found[record.get("run_id", record.get("method"))] = record
    path = folder / "results.json"
    records = json.loads(path.read_text()).get("methods", []) if path.is_file() else []
    found.update({r.get("run_id", r["method"]): r for r in records if r.get("status") in FINISHED})
    return found


def read_record(path: Path) -> dict[str, Any] | None:
    """A run's finished record, or None (unfinished, or unreadable: written atomically, so not half a file)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") in FINISHED else None


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
