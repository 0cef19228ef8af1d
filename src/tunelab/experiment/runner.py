"""Run each selected method the same way and write one result record per method.

A method that fails or diverges is recorded with its status and error; the others still run.
"""
from __future__ import annotations

import contextlib
import json
import platform
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..methods.base import get_method
from ..models.fingerprint import weights_fingerprint
from ..train import faults
from ..train.checkpoint import Checkpointer, CheckpointUnreadable, started_with
from ..train.distributed import Ranks, check_world, launched_rank, launched_world_size
from ..train.loop import (Diverged, Interrupted, LoopHooks, Pruned, TrainingLoop, TrainState, Validation,
                          stop_if_non_finite, total_steps)
from ..train.batches import collate, epoch_batches
from ..train.precision import choose_precision
from ..train.sharding import groups_on_shards, make_plain, shard_model
from ..train.setup import (apply_threads, build_optimizer, build_scheduler, enable_checkpointing, formed_group,
                           make_accelerator, resolve_device, seed_everything, seed_rank_streams,
                           store_frozen_matmul_weights)
from ..train.tracking import MemoryMonitor, SilentTracker, Tracker
from .folder import write_json
from .job import Job


def library_versions() -> dict[str, str]:
    # from the installed packages' metadata: importing datasets only to read its version cost a run 0.3 s
    from importlib.metadata import version

    return {"tunelab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            **{name: version(name) for name in ("transformers", "peft", "accelerate", "datasets")}}


def run_method(job: Job, name: str, out_dir: Path, show_progress: bool = True,
               resume: bool = False, run_id: str | None = None, on_eval=None) -> dict[str, Any]:
    """Train, evaluate and save one run of method `name`; its folders are named `run_id` (default: the
    method's name)."""
    cfg, run_id = job.config, run_id or name
    record: dict[str, Any] = {"method": name, "run_id": run_id, "status": "running", "error": None,
                              "config": cfg.to_dict(), "seed": cfg.train.seed, "versions": library_versions()}
    started = time.perf_counter()
    faults.current_method = name
    try:
        record.update(train_one(job, name, out_dir, show_progress, resume, run_id, on_eval))
        record["status"] = "success"
    except Pruned as exc:
        record.update(status="pruned", error=str(exc))
    except Interrupted as exc:
        record.update(status="interrupted", error=f"{exc}; continue with --resume", steps=exc.step)
    except Diverged as exc:
        record.update(status="diverged", error=str(exc), diverged_at_step=exc.step,
                      last_finite_loss=exc.last_finite_loss)
    except Exception as exc:  # one method's failure must not lose the others' results
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8))
    record["wall_time_s"] = round(time.perf_counter() - started, 2)
    return record


@dataclass
class MethodSetup:
    """A method's model and optimizer, ready for the loop."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any
    lr: float
    expected_trainable: int
    param_groups: list[dict[str, Any]]
    total_steps: int
    precision_reason: str = ""
    base_weights_loaded_mb: float = 0.0  # read from disk by this process (none where the main one shares them)

    @property
    def precision(self) -> str:
        return "bf16" if self.accelerator.mixed_precision == "bf16" else "fp32"


def setup_method(job: Job, name: str, precision: str | None = None) -> MethodSetup:
    """The method's model, optimizer and schedule; `precision` (a resumed run's) skips choosing one."""
    cfg, method = job.config, get_method(name)
    opts = cfg.options(name)
    apply_threads(cfg.train)
    seed_everything(cfg.train.seed)  # same seed → same head initialisation for every method
    steps = total_steps(cfg.train, len(job.train))
    # a sharded run's other processes build the model on the meta device and get the main one's weights
    base = job.load_base_model(on_meta=cfg.train.fsdp and launched_rank() != 0)
    loaded_mb = sum(p.numel() * p.element_size() for p in base.parameters() if not p.is_meta) / 2**20
    ctx = job.context(base, steps)
    expected = method.expected_trainable_params(base, opts, ctx)
    model = method.prepare(base, opts, ctx)
    warn_if_count_differs(name, expected, model)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    precision, reason = (precision, "resumed in the precision the run started with") if precision \
        else method_precision(job, name, model)
    accelerator = make_accelerator(cfg.train, precision)
    check_world(Ranks.of(accelerator))
    if accelerator.mixed_precision == "bf16" and method.saves_adapter and method.bf16_frozen_weights \
            and not cfg.train.fsdp:  # (an FSDP group gathers its weights in one buffer of one dtype)
        # only where the frozen base is never written out: a method saving the whole model must keep fp32
        store_frozen_matmul_weights(model, torch.bfloat16)
    if cfg.train.fsdp:  # before the optimizer: it must hold the sharded parameters
        model = shard_model(model, accelerator.device, Ranks.of(accelerator))
    lr = method.resolve_lr(opts, cfg.train.lr)
    groups = method.param_groups(model, opts, lr, cfg.train.weight_decay)
    optimizer = build_optimizer(groups_on_shards(model, groups) if cfg.train.fsdp else groups)
    groups = [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
               "num_params": sum(p.numel() for p in g["params"])} for g in optimizer.param_groups]
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    if cfg.train.fsdp:  # sharded already; accelerate would wrap it in DDP besides
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    seed_rank_streams(cfg.train.seed, accelerator.process_index)
    return MethodSetup(model, optimizer, scheduler, accelerator, lr, expected, groups, steps, reason,
                       round(loaded_mb, 1))


def warn_if_count_differs(name: str, expected: int, model: torch.nn.Module) -> None:
    """A method's own formula and what its `prepare` left trainable must agree: one of them is wrong otherwise,
    and the author of a new method should hear it when the run starts, not find it in results.json."""
    actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if actual != expected:
        warnings.warn(f"method {name!r}: expected_trainable_params gives {expected:,} parameters, but prepare "
                      f"left {actual:,} trainable; one of the two is wrong", RuntimeWarning, stacklevel=3)


def method_precision(job: Job, name: str, model: torch.nn.Module) -> tuple[str, str]:
    """train.precision for this method's model: measured on a typical batch where auto has to choose."""
    cfg = job.config.train
    # formed first: it gives each process its own GPU, which the model moves to
    ranks = formed_group(cfg) if launched_world_size() > 1 else Ranks()
    device = torch.device(resolve_device(cfg))
    if device.type == "cuda" and not cfg.fsdp:  # a model to shard may not fit one device whole
        model.to(device)
    batches = epoch_batches(job.train.lengths, cfg.batch_size, cfg.seed, 0, cfg.bucket_size)
    typical = sorted(batches, key=lambda rows: int(job.train.lengths[rows].max()))[len(batches) // 2]
    micro = typical[:max(1, len(typical) // (ranks.world * cfg.gradient_accumulation_steps))]
    # checkpointing recomputes blocks in training mode, which the probe runs in: a step of another cost
    key = json.dumps([job.model_path, job.task.name, name, job.config.to_dict().get(name),
                      cfg.gradient_checkpointing], default=str)
    # a sharded run's other processes hold no weights yet (and the main one's are not on the device)
    return choose_precision(cfg, model, collate(job.train, micro, device), key,
                            can_measure=get_method(name).precision_probe and not cfg.fsdp, ranks=ranks)


def train_one(job: Job, name: str, out_dir: Path, show_progress: bool, resume: bool,
              run_id: str, on_eval=None) -> dict[str, Any]:
    cfg = job.config
    folder = out_dir / "checkpoints" / run_id
    setup = setup_method(job, name, started_with(folder).get("precision") if resume else None)
    accelerator = setup.accelerator
    method, opts = get_method(name), cfg.options(name)
    model = accelerator.unwrap_model(setup.model)
    ranks = Ranks.of(accelerator)
    checkpointer = Checkpointer(folder, cfg.fingerprint(), cfg.train.keep_checkpoints,
                                lambda: method.extra_state(model), lambda s: method.load_extra_state(model, s),
                                ranks, {"precision": setup.precision})
    latest = resume_point(checkpointer, ranks) if resume else None
    if latest is None and ranks.is_main:  # a fresh start: an abandoned attempt's best must not be restored
        checkpointer.remove_all()
    state = restore_with_current_rates(checkpointer, latest, setup) if latest else TrainState()
    # peak memory and wall time are this attempt's: a resumed record says where the attempt began
    resumed = {"resumed_from_step": state.step} if latest else {}
    tracker = Tracker(out_dir / "tensorboard" / run_id, run_id, setup.total_steps, cfg.train.batch_size,
                      show_progress, start_step=state.step, start_time_s=state.train_time_s) \
        if ranks.is_main else SilentTracker()
    eval_setup = job.eval_setup(accelerator.device, accelerator.autocast)
    validation = Validation(lambda model: job.task.evaluate(model, job.validation, eval_setup).metrics,
                            cfg.metric_for_best, job.task.higher_is_better(cfg.metric_for_best))
    # over the test and the save too: a stop then waits for the finished run's record, and stops after it
    with graceful_interrupt() as stop_requested:
        with MemoryMonitor(accelerator.device) as memory:
            hooks = LoopHooks(on_log=tracker.on_log, on_eval=both(tracker.on_eval, on_eval),
                              stop_requested=stop_requested,
                              after_step=lambda step: method.after_step(model, opts, step))
            trainer = TrainingLoop(setup.model, setup.optimizer, setup.scheduler, accelerator, cfg.train,
                                   job.train, validation, hooks, checkpointer)
            try:
                state = trainer.run(state)
            finally:
                tracker.close()
        processes = ranks.gather({**memory.report(), "rows": trainer.rows_trained,
                                  "base_weights_loaded_mb": setup.base_weights_loaded_mb})
        stop = {STOP_REQUESTED: True} if stop_requested() else {}
        if not ranks.is_main and not trainer.sharded:  # the main process evaluates and writes; the others are done
            return {"rank": ranks.rank, **stop}
        result = tested_and_saved(job, name, out_dir / "artifacts" / run_id, setup, state, trainer, eval_setup)
        if result is None:
            return {"rank": ranks.rank, **stop}
        # the record names the artifact within the experiment folder: a folder moved or copied still reads right
        result = {**result, "artifact_dir": f"artifacts/{run_id}", **process_memory(processes), **resumed}
        if not cfg.train.keep_checkpoints_after_success:
            result["checkpoints_removed_mb"] = round(checkpointer.remove_all() / 2**20, 1)
        tracker.finish(result["peak_memory_mb"], state.step, run_hparams(cfg, name, setup.lr, result),
                       {f"best_val_{k}": v for k, v in (state.best or {}).items() if k != "step"})
        return {**result, STOP_REQUESTED: True} if stop_requested() else result


def run_hparams(cfg, name: str, lr: float, result: dict[str, Any]) -> dict[str, Any]:
    """What TensorBoard's HParams tab sets runs apart by: the method's own options (a sweep trial's drawn
    lora.r or llrd.decay among them) beside the training settings."""
    options = {f"{name}.{key}": value for key, value in (cfg.to_dict().get(name) or {}).items() if value is not None}
    return {"method": name, "lr": lr, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
            "weight_decay": cfg.train.weight_decay, "trainable_params": result["trainable_params"], **options}


# a stop that came after the run's last steps: the run finished and is kept, and the experiment stops after it.
# Taken off the record by whoever ran it (the stop is not part of the result).
STOP_REQUESTED = "stop_requested"


def tested_and_saved(job: Job, name: str, directory: Path, setup: MethodSetup, state: TrainState,
                     trainer: TrainingLoop, eval_setup) -> dict[str, Any] | None:
    """The best weights scored on the test split and saved as the artifact; the record's results (None on the
    processes other than the main one)."""
    method, model, main = get_method(name), setup.accelerator.unwrap_model(setup.model), trainer.ranks.is_main
    trainer.restore_best(state)  # under sharding every process evaluates and gathers (collectives) ...
    test = job.task.evaluate(model, job.test, eval_setup) if job.test is not None else None
    if test is not None:
        stop_if_non_finite(test.metrics, (state.best or {}).get("step", state.step), state.losses, "test")
    examples = test.examples if test else []
    if test is None and job.task.shows_examples:  # then the report's examples come from validation
        examples = job.task.evaluate(model, job.validation, eval_setup).examples
    make_plain(model, keep=main, trainable_only=method.saves_adapter)  # ... and the main process saves
    if not main:
        return None
    measured = measurements(setup, state, trainer.steps_per_epoch())
    artifact = save_artifact(job, name, model, directory, precision=measured["precision"])
    return {**measured, "precision_reason": setup.precision_reason, "step_shortcuts": trainer.shortcuts(),
            "history": state.history, "losses": state.losses, "best_val": state.best,
            "test": test.metrics if test else None, "examples": examples,
            "test_per_example": test.per_example if test else {}, **artifact}


def resume_point(checkpointer: Checkpointer, ranks: Ranks) -> Path | None:
    """The latest complete checkpoint, which every process must see alike (a shared output folder)."""
    damaged = checkpointer.damaged_latest()
    if damaged is not None:
        before = checkpointer.latest()
        raise CheckpointUnreadable(f"checkpoint {damaged} is damaged (its files differ from its manifest); remove "
                                   f"it to resume from {before.name if before else 'the start'}, or remove "
                                   f"{checkpointer.folder} to train this run again")
    latest = checkpointer.latest()
    seen = ranks.gather(latest.name if latest else None)
    if len(set(seen)) > 1:
        raise RuntimeError(f"processes see different latest checkpoints in {checkpointer.folder} ({seen}); "
                           "under several machines --output must be a folder they all share")
    return latest


def process_memory(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak memory of the run: the largest process's (what one device must hold), and each one's under DDP."""
    peak = max(processes, key=lambda p: p["peak_memory_mb"])
    out = {k: v for k, v in peak.items() if k not in ("rows", "base_weights_loaded_mb")}
    if len(processes) > 1:
        out.update(processes=len(processes), peak_memory_mb_per_process=[p["peak_memory_mb"] for p in processes],
                   rows_per_process=[p["rows"] for p in processes],
                   base_weights_loaded_mb_per_process=[p["base_weights_loaded_mb"] for p in processes])
    return out


def restore_with_current_rates(checkpointer: Checkpointer, latest: Path, setup: MethodSetup) -> TrainState:
    """Restore a checkpoint, then give the optimizer this config's rates and weight decay.

    A checkpoint's optimizer and scheduler state carry the learning rates it was started with; after
    `--resume --allow-config-change` the recorded config would otherwise disagree with what trains. The
    schedule's shape (warmup, decay, total steps) comes from the current config anyway; unchanged rates are
    set to the very values they had, so an ordinary resume stays bit-identical.
    """
    planned = [(g["initial_lr"], g["weight_decay"]) for g in setup.optimizer.param_groups]
    model = setup.accelerator.unwrap_model(setup.model)  # weights are saved without DDP's `module.` prefix
    state = checkpointer.restore(latest, model, setup.optimizer, setup.scheduler)
    scheduler = getattr(setup.scheduler, "scheduler", setup.scheduler)  # inside accelerate's wrapper
    scheduler.base_lrs = [lr for lr, _ in planned]
    for group, (lr, decay), factor in zip(setup.optimizer.param_groups, planned, scheduler.lr_lambdas):
        group.update(initial_lr=lr, weight_decay=decay, lr=lr * factor(scheduler.last_epoch))
    scheduler._last_lr = [g["lr"] for g in setup.optimizer.param_groups]
    return state


def measurements(setup: MethodSetup, state: TrainState, steps_per_epoch: int) -> dict[str, Any]:
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in setup.model.parameters())
    seconds = max(state.train_time_s, 1e-9)
    return {
        "trainable_params": trainable, "trainable_params_expected": setup.expected_trainable,
        "total_params": total, "trainable_percent": round(100 * trainable / total, 4), "lr": setup.lr,
        "param_groups": setup.param_groups, "steps": state.step,
        "epochs_completed": round(state.step / max(steps_per_epoch, 1), 4), "stopped_early": state.stopped_early,
        "train_time_s": round(state.train_time_s, 2), "train_samples_per_s": round(state.samples_seen / seconds, 2),
        "train_tokens_per_s": round(state.tokens_seen / seconds, 1),
        "precision": setup.precision,
        "device": str(setup.accelerator.device)}


def both(first, second):
    """Call `first`, then `second` when there is one (e.g. a sweep's pruning report after TensorBoard)."""
    if second is None:
        return first
    return lambda *args: (first(*args), second(*args))


@contextlib.contextmanager
def graceful_interrupt():
    """The first Ctrl-C asks the loop to checkpoint and stop after the current step; a second one aborts.
    SIGTERM (a scheduler preempting the job, or tunelab's parent passing a stop on) asks the same, however
    often it comes: it never aborts, so a checkpoint is written before the scheduler's SIGKILL."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def request(how: str) -> None:
        requested.set()
        print(f"\nstopping after this step (checkpoint + partial results){how}", file=sys.stderr)

    def on_sigint(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        request("; Ctrl-C again to abort")

    def on_sigterm(signum, frame):
        if not requested.is_set():
            request(": a stop was requested (SIGTERM, or a Ctrl-C or SIGINT that tunelab passed on)")

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    try:
        yield requested.is_set
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def save_artifact(job: Job, name: str, model: torch.nn.Module, directory: Path,
                  precision: str = "fp32") -> dict[str, Any]:
    """The method's own save, the tokenizer, and a tunelab.json that `tunelab predict`/`export` read."""
    method, cfg = get_method(name), job.config
    directory.mkdir(parents=True, exist_ok=True)
    method.save(model, directory)
    job.tokenizer.save_pretrained(directory)
    write_json(directory / "tunelab.json", {
        "method": name, "tunelab": __version__, "task": job.task.name, "base_model": job.model_path,
        "base_model_name": cfg.model_name, "base_source": model_source(cfg.model_name),
        "base_fingerprint": weights_fingerprint(job.model_path),
        "revision": cfg.model.revision, "labels": job.label_names, "max_length": cfg.data.max_length,
        "format": artifact_format(method), "precision": precision, "options": cfg.to_dict().get(name),
        "task_options": cfg.to_dict().get(job.task.name),
        "columns": {key: getattr(cfg.data, key) for key in job.task.data_keys}})
    size = sum(f.stat().st_size for f in own_files(directory))
    return {"artifact_size_mb": round(size / 2**20, 3),  # (the record names it: artifact_dir in train_one)
            "artifact_format": artifact_format(method)}


def model_source(name: str) -> str:
    """Where a base model comes from, so predict knows whether finding it again by name means anything: a hub id
    or a packaged name, yes; a local folder's name, read against another working folder, no."""
    from ..models.loading import PACKAGED_ALIASES, PACKAGED_MODELS

    if name in PACKAGED_MODELS or name in PACKAGED_ALIASES:
        return "packaged"
    return "local" if Path(name).expanduser().exists() else "hub"


def own_files(directory: Path) -> list[Path]:
    """The artifact's files, not those of the artifacts saved inside its folder (the trials of `compare --tune`
    sit in `artifacts/<method>/trial-NNN/`, each with a tunelab.json of its own)."""
    nested = {folder.parent for folder in directory.glob("*/**/tunelab.json")}
    return [f for f in directory.rglob("*") if f.is_file() and not any(n in f.parents for n in nested)]


def artifact_format(method) -> str:
    return method.artifact_format or ("peft" if method.saves_adapter else "transformers")


