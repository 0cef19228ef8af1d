"""Monitoring: TensorBoard (one run per method), a tqdm progress bar, and peak-memory measurement."""
from __future__ import annotations

import os
import resource
import threading
from pathlib import Path
from typing import Any

import torch

from .loop import TrainState

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux: the process-wide peak is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryMonitor:
    """Peak memory while one method runs: resident set size sampled by a thread on CPU, allocator on CUDA.

    ru_maxrss cannot be reset between methods in one process, so RSS is sampled instead (every 20 ms:
    a peak shorter than that can be missed).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.02):
        self.device, self.interval_s = device, interval_s
        self.peak_mb = self.start_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryMonitor":
        self.start_mb = self.peak_mb = current_rss_mb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, current_rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())

    def report(self) -> dict[str, float]:
        out = {"peak_memory_mb": round(self.peak_mb, 1),
               "peak_memory_increase_mb": round(self.peak_mb - self.start_mb, 1)}
        if self.device.type == "cuda":
            out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            out["peak_rss_mb"] = round(self.peak_mb, 1)
        return out


class Tracker:
    """TensorBoard events under DIR/tensorboard/<method> so `tensorboard --logdir DIR` overlays methods."""

    def __init__(self, log_dir: Path, method: str, total_steps: int, batch_size: int, show_progress: bool,
                 start_step: int = 0, start_time_s: float = 0.0):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        # On resume, purge_step drops events logged after the checkpoint by the run that crashed (those of the
        # checkpoint's own step were logged before it was written: kept; from step 0, everything goes).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=f"{method:>14}", unit="step",
                        disable=not show_progress, dynamic_ncols=True, leave=True)
        self.batch_size = batch_size
        self._last_step = start_step
        self._last_time = start_time_s

    def on_log(self, state: TrainState, logs: dict[str, float]) -> None:
        steps = state.step - self._last_step
        elapsed = state.train_time_s - self._last_time
        samples_per_s = steps * self.batch_size / elapsed if elapsed > 0 else 0.0
        self._last_step, self._last_time = state.step, state.train_time_s
        for key, value in logs.items():
            self.writer.add_scalar(f"train/{key}", value, state.step)
        self.writer.add_scalar("train/samples_per_s", samples_per_s, state.step)
        self.bar.update(steps)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", sps=f"{samples_per_s:.1f}")

    def on_eval(self, state: TrainState, metrics: dict[str, float], improved: bool) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"eval/{key}", value, state.step)

    def close(self) -> None:
        self.writer.flush()
        self.bar.close()

    def finish(self, peak_mb: float, step: int, hparams: dict[str, Any], final: dict[str, float]) -> None:
        self.writer.add_scalar("system/peak_memory_mb", peak_mb, step)
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        metrics = {f"hparam/{k}": v for k, v in final.items() if isinstance(v, (int, float))}
        self.writer.add_hparams(clean, metrics, run_name=".")  # "." keeps hparams in the method's own run
        self.writer.close()


class SilentTracker:
    """What processes other than the main one track under DDP: nothing (one TensorBoard run, one bar)."""

    def on_log(self, state: TrainState, logs: dict[str, float]) -> None:
        pass

    def on_eval(self, state: TrainState, metrics: dict[str, float], improved: bool) -> None:
        pass

    def close(self) -> None:
        pass
