"""Atomic checkpoints for exact resume.

A checkpoint is a folder `step-000123` holding the trainable weights (the adapter only, for PEFT
methods), optimizer, scheduler, RNG states and the loop state. It is written under a temporary name
in the same folder, every file fsynced, a MANIFEST.json written last, then renamed into place: a
crash at any moment leaves either a complete checkpoint or a temporary folder that is never read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..models.loading import first_line
from .distributed import Ranks
from .faults import fault_point
from .loop import TrainState
from .setup import seed_rank_streams
from .sharding import gathered_optimizer_state, sharded_optimizer_state
from .weights import load_weights, trainable_state

MANIFEST = "MANIFEST.json"
STEP, BEST = "step", "best"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(folder: Path, name: str, files: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `files` (torch-serialisable objects) and `meta` as checkpoint `folder/name`, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sizes = {}
    for file_name, obj in files.items():
        torch.save(obj, tmp / file_name)
        _fsync(tmp / file_name)
        sizes[file_name] = (tmp / file_name).stat().st_size
        fault_point("checkpoint")  # tests kill the process here: half a checkpoint must never be used
    (tmp / MANIFEST).write_text(json.dumps({**meta, "files": sizes}, indent=2, default=str))
    _fsync(tmp / MANIFEST)
    final = folder / name
    if final.exists():  # written before by a run that was then killed and resumed: the same state, written again
        old = folder / f".old-{name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(folder)
    return final


def is_complete(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / f).is_file() and (path / f).stat().st_size == size for f, size in sizes.items())


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])  # `kind-NNNNNN`


def complete_checkpoints(folder: Path, kind: str) -> list[Path]:
    """Complete `kind-NNNNNN` checkpoints (kind: step or best), oldest first."""
    found = [p for p in folder.glob(f"{kind}-*") if p.is_dir() and is_complete(p)] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


class Checkpointer:
    """Writes and reads one method's checkpoints; keeps the last `keep` plus the best.

    Under DDP every process calls `save` (the RNG states of all of them are gathered, so a resumed run draws
    what the uninterrupted one would have), the main process alone writes, and every process restores."""

    def __init__(self, folder: Path, config_hash: str, keep: int = 1,
                 extra_state: Callable[[], dict | None] = lambda: None,
                 load_extra_state: Callable[[dict], None] = lambda state: None, ranks: Ranks | None = None,
                 run_info: dict[str, Any] | None = None):
        self.folder, self.config_hash, self.keep = folder, config_hash, keep
        self.ranks = ranks or Ranks()
        self.run_info = run_info or {}  # what a resume must keep as it was (the precision the run chose)
        self.extra_state, self.load_extra_state = extra_state, load_extra_state  # the method's own state

    def remove_all(self) -> int:
        """Delete this run's checkpoints (once it succeeded: the artifact is what stays); bytes freed."""
        if not self.folder.is_dir():
            return 0
        size = sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())
        shutil.rmtree(self.folder, ignore_errors=True)
        return size

    def save(self, model: nn.Module, optimizer, scheduler, state: TrainState) -> Path | None:
        rng = self.ranks.gather(rng_state())
        main = self.ranks.is_main
        # sharded weights and optimizer state are gathered whole: every process takes part, the main one writes
        weights, optimizer_state = trainable_state(model, keep=main), gathered_optimizer_state(optimizer, keep=main)
        if not main:
            return None
        files = {"trainable.pt": weights, "optimizer.pt": optimizer_state,
                 "scheduler.pt": scheduler.state_dict(), "rng.pt": rng[0] if len(rng) == 1 else rng}
        extra = self.extra_state()
        if extra is not None:
            files["extra.pt"] = extra
        meta = {"step": state.step, "config_hash": self.config_hash, "state": dataclasses.asdict(state),
                "run": self.run_info}
        return self._write(STEP, state.step, files, meta, keep=self.keep)

    def save_best(self, weights: dict[str, torch.Tensor], state: TrainState) -> None:
        # Each new best is a new folder, older ones pruned after it is complete: never a moment without one.
        self._write(BEST, state.step, {"trainable.pt": weights},
                    {"step": state.step, "config_hash": self.config_hash, "best": state.best}, keep=1)

    def _write(self, kind: str, step: int, files: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
        path = write_atomic(self.folder, f"{kind}-{step:06d}", files, meta)
        for old in complete_checkpoints(self.folder, kind)[:-keep]:
            remove_checkpoint(old)
        return path

    def latest(self, kind: str = STEP) -> Path | None:
        found = complete_checkpoints(self.folder, kind)
        return found[-1] if found else None

    def damaged_latest(self) -> Path | None:
        """The newest step checkpoint where it is not complete. Writes are atomic and checkpoints are moved
        aside before they are deleted, so that is damage (a file truncated or removed), not a write cut short:
        resuming from an older one, or from nothing, would quietly drop the training since."""
        named = [p for p in self.folder.glob(f"{STEP}-*") if p.is_dir()] if self.folder.is_dir() else []
        newest = max(named, key=checkpoint_step, default=None)
        return newest if newest is not None and not is_complete(newest) else None

    def restore(self, path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
        """Load checkpoint `path`; checkpoints written after it belong to the abandoned run and are removed."""
        step = checkpoint_step(path)
        for kind in (STEP, BEST) if self.ranks.is_main else ():
            for later in complete_checkpoints(self.folder, kind):
                if checkpoint_step(later) > step:
                    remove_checkpoint(later)
        try:
            return self._load(path, model, optimizer, scheduler, step)
        except Exception as exc:  # torch's own message suggests weights_only=False: not for a damaged file
            raise CheckpointUnreadable(self.unreadable(path, exc)) from exc

    def unreadable(self, path: Path, exc: Exception) -> str:
        written_with = json.loads((path / MANIFEST).read_text()).get("config_hash")
        changed = " It was written under another config (resumed with --allow-config-change): a change of " \
            "the model or of the method's shape cannot continue from it." if written_with != self.config_hash else ""
        return (f"checkpoint {path} cannot be restored ({type(exc).__name__}: {first_line(exc)}).{changed} Remove "
                f"{self.folder} and resume to train this run again")

    def _load(self, path: Path, model: nn.Module, optimizer, scheduler, step: int) -> TrainState:
        load_weights(model, torch.load(path / "trainable.pt", weights_only=True))
        saved_optimizer = torch.load(path / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(sharded_optimizer_state(optimizer, saved_optimizer))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng = torch.load(path / "rng.pt", weights_only=False)
        # one state per process when written under DDP; another process count resumes from rank 0's, the
        # others from streams of their own (derived from the step: the same on every resume)
        same_world = isinstance(rng, list) and len(rng) == self.ranks.world
        set_rng_state(rng[self.ranks.rank] if same_world else rng[0] if isinstance(rng, list) else rng)
        if not same_world:
            seed_rank_streams(step, self.ranks.rank)
        if (path / "extra.pt").is_file():
            self.load_extra_state(torch.load(path / "extra.pt", weights_only=False))
        meta = json.loads((path / MANIFEST).read_text())
        return TrainState(**meta["state"])

    def best_weights(self, step: int) -> dict[str, torch.Tensor]:
        """The weights of the best evaluation, at `step`: an error where they are gone or damaged, never the
        last step's weights tested and saved under the best step's name."""
        path = self.latest(BEST)
        if path is None or checkpoint_step(path) != step:
            raise CheckpointUnreadable(f"the best checkpoint of this run ({BEST}-{step:06d}, its best evaluation) "
                                       f"is missing or damaged in {self.folder}; remove that folder and resume to "
                                       "train this run again")
        try:
            return torch.load(path / "trainable.pt", weights_only=True)
        except Exception as exc:
            raise CheckpointUnreadable(self.unreadable(path, exc)) from exc


class CheckpointUnreadable(RuntimeError):
    """A checkpoint a run needs cannot be used: the run stops, saying which and what to do."""


def remove_checkpoint(path: Path) -> None:
    """Moved aside first (an atomic rename), then deleted: a stop in the middle leaves no half checkpoint under
    a checkpoint's name, which would read as damage."""
    aside = path.with_name(f".old-{path.name}-{os.getpid()}")
    try:
        path.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def started_with(folder: Path) -> dict[str, Any]:
    """The run info of the latest complete step checkpoint in `folder` ({} when there is none)."""
    found = complete_checkpoints(folder, STEP)
    return json.loads((found[-1] / MANIFEST).read_text()).get("run", {}) if found else {}
