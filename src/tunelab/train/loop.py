"""The one training loop every method goes through.

It knows nothing of any particular method: it gets a model whose trainable parameters are already
chosen and the optimizer groups the method built. Losses stay on the device between log points so the
step never waits on a `.item()`; finiteness is checked at every flush.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data import Encoded
from .batches import collate, epoch_batches, micro_batches
from .compiled import TrainingForward
from .distributed import Ranks
from .embedding_grad import KeptEmbeddingGradient
from .fast_dropout import cheaper_cpu_dropout, cheaper_dropout_applies
from .faults import fault_point
from .head_row import HeadRowOnly
from .sharding import gradient_sync, is_sharded, whole
from .weights import load_weights, trainable_state


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C) after a checkpoint was written, at step `step`."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"stopped at step {step}")


class Pruned(Exception):
    """A sweep's pruner stopped this run early: its intermediate results were not promising."""


class Diverged(RuntimeError):
    def __init__(self, step: int, last_finite_loss: float | None, what: str = "loss"):
        self.step, self.last_finite_loss = step, last_finite_loss
        super().__init__(f"{what} became non-finite at step {step} (last finite training loss: {last_finite_loss})")


def stop_if_non_finite(metrics: dict[str, float], step: int, losses: list[float], split: str) -> None:
    """A model whose evaluation gives NaN or infinity (weights blown up by the last updates, before any training
    loss could show it) has diverged: it must not become the best state, nor a result, nor be ranked."""
    bad = [name for name, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        last = next((x for x in reversed(losses) if math.isfinite(x)), None)
        raise Diverged(step, last, f"{split} {', '.join(bad)}")


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    evals_without_improvement: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    stopped_early: bool = False
    # grad norms of the steps since the last log point: a resumed run logs the point an uninterrupted one would
    unlogged_grad_norms: list[float] = field(default_factory=list)


@dataclass
class LoopHooks:
    """Side effects the loop triggers; the runner decides what they do (TensorBoard, progress, files)."""

    on_log: Callable[[TrainState, dict[str, float]], None] = lambda state, logs: None
    on_eval: Callable[[TrainState, dict[str, float], bool], None] = lambda state, metrics, best: None
    stop_requested: Callable[[], bool] = lambda: False
    after_step: Callable[[int], None] = lambda step: None  # after optimizer.step, before zero_grad


def total_steps(cfg: TrainConfig, num_train: int) -> int:
    """train.max_steps, when set, wins over train.epochs (as in transformers' Trainer)."""
    return cfg.max_steps or math.ceil(math.ceil(num_train / cfg.batch_size) * cfg.epochs)


def eval_interval(cfg: TrainConfig, steps: int) -> int:
    """Steps between evaluations: train.eval_every_steps, else about train.evals_per_run per run (0: epoch ends)."""
    if cfg.eval_every_steps is not None:
        return cfg.eval_every_steps
    return max(1, math.ceil(steps / cfg.evals_per_run))


@dataclass
class Validation:
    """How the loop scores the model: a function giving metrics, and which one decides the best state."""

    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str
    higher_is_better: bool

    def improved(self, new: dict[str, float], best: dict[str, Any] | None) -> bool:
        if best is None:
            return True
        if new[self.metric] == best[self.metric]:
            # a tie, common for accuracy on a small validation split (e.g. the majority class at several
            # evaluations): the lower validation loss wins, else the earlier state stays
            return self.metric != "loss" and new.get("loss", math.inf) < best.get("loss", math.inf)
        return new[self.metric] > best[self.metric] if self.higher_is_better else new[self.metric] < best[self.metric]


class TrainingLoop:
    def __init__(self, model: nn.Module, optimizer, scheduler, accelerator, cfg: TrainConfig,
                 train_data: Encoded, validation: Validation, hooks: LoopHooks | None = None,
                 checkpointer=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator, self.cfg = accelerator, cfg
        self.train_data, self.validation = train_data, validation
        self.hooks = hooks or LoopHooks()
        self.checkpointer = checkpointer
        self.ranks = Ranks.of(accelerator)
        self.module = accelerator.unwrap_model(model)  # the model without its DDP wrapper: evaluated, saved
        self.sharded = is_sharded(model)  # train.fsdp: forward passes and weight copies involve every process
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.train_forward = TrainingForward(model, cfg.compile)
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.total_steps = total_steps(cfg, len(train_data))
        self.eval_every = eval_interval(cfg, self.total_steps)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._segment_start = time.perf_counter()
        self._checkpointed_step: int | None = None
        self._lr_used = scheduler.get_last_lr()[0]
        self.rows_trained = 0  # by this process (its shard), fillers excluded
        # not under torch.compile: a sparse gradient would split its graph (and it plans memory itself)
        self.embedding_grad = KeptEmbeddingGradient.for_model(self.module, accelerator.device, self.ranks.world,
                                                              enabled=not self.train_forward.compiled)
        with accelerator.autocast():  # the check runs the model as training will (bf16-stored frozen weights)
            self.head_row = HeadRowOnly.for_model(self.module,
                                                  enabled=not self.train_forward.compiled and not self.sharded)

    def run(self, state: TrainState | None = None) -> TrainState:
        # same dropout with cheaper masks, and the embedding gradient only where it is not zero, on a CPU;
        # the last block only for the row the head reads, anywhere
        eager = not self.train_forward.compiled
        with cheaper_cpu_dropout(self.model, self.accelerator.device, eager), self.embedding_grad.active(), \
                self.head_row.active():
            return self._run(state or TrainState())

    def shortcuts(self) -> dict[str, Any]:
        """Which of run()'s shortcuts this model and device take (for the result record)."""
        cut = self.head_row.cut_at
        named = None if cut is None else next(n for n, m in self.module.named_modules() if m is cut)
        return {"head_row_only_from": named,
                "embedding_gradient_rows_only": self.embedding_grad.embedding is not None,
                "cheaper_cpu_dropout": cheaper_dropout_applies(self.model, self.accelerator.device,
                                                             not self.train_forward.compiled)}

    def _run(self, state: TrainState) -> TrainState:
        if state.step:  # resumed from the checkpoint of this very step: an epoch end right here must not rewrite it
            self._checkpointed_step = state.step
        self.model.train()
        self._segment_start = time.perf_counter()
        while not self.finished(state):
            batches = epoch_batches(self.train_data.lengths, self.cfg.batch_size, self.cfg.seed,
                                    state.epoch, self.cfg.bucket_size)
            while state.batch_in_epoch < len(batches) and not self.finished(state):
                # the last step of an epoch or of the run is evaluated below: its checkpoint comes after that
                closing = state.batch_in_epoch + 1 == len(batches) or state.step + 1 >= self.total_steps
                self.step(state, batches[state.batch_in_epoch], closing)
            if state.batch_in_epoch >= len(batches):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if not state.history or state.history[-1]["step"] != state.step:
                self.evaluate(state)
            self.checkpoint(state)
            # a stop during a closing step waited for its evaluation and checkpoint (written before them, a
            # resumed run found its last step done and never evaluated it); at the run's end it keeps the run
            if not self.finished(state) and self.ranks.any(self.hooks.stop_requested()):
                raise Interrupted(state.step)
        return state

    def finished(self, state: TrainState) -> bool:
        return state.step >= self.total_steps or state.stopped_early

    def step(self, state: TrainState, rows: np.ndarray, closing: bool = False) -> None:
        """One optimizer step on global batch `rows`: this process's micro-batches, then one update. A `closing`
        step (an epoch's or the run's last) leaves its checkpoint to the caller, after the evaluation there: a
        checkpoint written before it would, on resume, evaluate again and write that evaluation's files twice."""
        parts = micro_batches(self.train_data, rows, self.ranks.rank, self.ranks.world,
                              self.cfg.gradient_accumulation_steps)
        loss = None
        self.embedding_grad.zero()
        for i, (part, weight) in enumerate(parts):
            # gradients are reduced once, after the last micro-batch
            with gradient_sync(self.model, self.accelerator, enabled=i == len(parts) - 1):
                part_loss = self.forward_backward(part, weight)
            loss = part_loss if loss is None else loss + part_loss
            self.rows_trained += len(part) if weight else 0
        grad_norm = whole(self.accelerator.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm))
        self.optimizer.step()
        self._lr_used = self.scheduler.get_last_lr()[0]  # what this step used; after scheduler.step: the next one's
        self.scheduler.step()
        self.hooks.after_step(state.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batch_in_epoch += 1
        state.samples_seen += len(rows)  # the global batch: every process counts all of it
        state.tokens_seen += int(self.train_data.lengths[rows].sum())
        self._pending.append((loss.detach(), torch.as_tensor(grad_norm).detach()))
        if state.step % self.cfg.log_every_steps == 0:
            self.flush(state)
        if self.eval_every and state.step % self.eval_every == 0:
            self.evaluate(state)
        if self.cfg.checkpoint_every_steps and state.step % self.cfg.checkpoint_every_steps == 0 and not closing:
            self.checkpoint(state)
        fault_point(f"step={state.step}")
        if not closing and self.ranks.any(self.hooks.stop_requested()):  # all stop at one step, or the rest hang
            self.flush(state)  # the checkpoint keeps the steps since the last log point for the resumed run
            self.checkpoint(state)
            raise Interrupted(state.step)

    def forward_backward(self, rows: np.ndarray, weight: float) -> torch.Tensor:
        """Backpropagate one micro-batch's weighted loss; returns its share of the batch's mean loss."""
        batch = collate(self.train_data, rows, self.accelerator.device)
        with self.accelerator.autocast():
            loss = self.train_forward(**batch)
        if self.ranks.world == 1 and weight == 1.0:  # the whole batch at once: plain training
            self.accelerator.backward(loss)
            return self.train_forward.detached(loss)
        self.accelerator.backward(loss * weight)
        return self.train_forward.detached(loss) * (weight / self.ranks.world)

    def checkpoint(self, state: TrainState) -> None:
        self.flush(state)
        # an epoch that ends on a checkpoint_every_steps multiple already has its checkpoint
        if self.checkpointer is not None and self._checkpointed_step != state.step:
            self.checkpointer.save(self.module, self.optimizer, self.scheduler, state)
            self._checkpointed_step = state.step
            self._segment_start = time.perf_counter()  # writing checkpoints is not training time

    def clock(self, state: TrainState) -> None:
        """Add the time since the last clock point to the training time. Called only where the host waits
        for the device anyway (flush), so the step itself never synchronises."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        now = time.perf_counter()
        state.train_time_s += now - self._segment_start
        self._segment_start = now

    def flush(self, state: TrainState) -> None:
        """Move pending losses to the host and stop on a non-finite one. The mean since the last log point is
        reported every log_every_steps steps and at the end (evaluations, checkpoints and stops flush in between:
        logging there too spaced the points unevenly, and a resumed run's curve differed from an uninterrupted
        one's)."""
        self.clock(state)
        if self._pending:
            # each process holds its micro-batches' share of the batch loss: the sum is the batch's mean loss
            losses = self.ranks.sum(torch.stack([l for l, _ in self._pending]).float()).cpu().tolist()
            state.unlogged_grad_norms += torch.stack([g for _, g in self._pending]).float().cpu().tolist()
            self._pending.clear()
            first_step = state.step - len(losses) + 1
            for offset, value in enumerate(losses):
                stop_if_non_finite({"loss": value}, first_step + offset, state.losses, "training")
                state.losses.append(value)
        at_log_point = state.step % self.cfg.log_every_steps == 0 or self.finished(state)
        if state.unlogged_grad_norms and at_log_point:
            recent = state.losses[-len(state.unlogged_grad_norms):]
            logs = {"loss": float(np.mean(recent)), "grad_norm": float(np.mean(state.unlogged_grad_norms)),
                    "lr": self._lr_used}
            state.unlogged_grad_norms.clear()
            self.hooks.on_log(state, logs)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        self.flush(state)
        # the main process evaluates, the others wait for its numbers: every decision below is the same everywhere.
        # A sharded model's forward is a collective, so there every process evaluates (alike).
        evaluates = self.ranks.is_main or self.sharded
        metrics = self.ranks.broadcast(self.validation.evaluate(self.module) if evaluates else None)
        stop_if_non_finite(metrics, state.step, state.losses, "validation")
        recent = state.losses[-self.cfg.log_every_steps:]
        entry = {"step": state.step, "epoch": round(state.step / max(self.steps_per_epoch(), 1), 4),
                 "train_loss": float(np.mean(recent)) if recent else None,
                 **{f"val_{k}": v for k, v in metrics.items()}}
        state.history.append(entry)
        improved = self.validation.improved(metrics, state.best)
        # patience counts evaluations without a better metric_for_best: a tie with a lower loss is kept as the
        # best state, but a metric flat for many evaluations (a slowly falling loss) is what it is there to stop
        progressed = state.best is None or metrics[self.validation.metric] != state.best[self.validation.metric]
        if improved:
            state.best = {**metrics, "step": state.step}
            self.keep_best(state)
        if improved and progressed:
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
            patience = self.cfg.early_stopping_patience
            # early: patience ran out before the planned steps did (an evaluation at the last step stops nothing)
            state.stopped_early = (bool(patience) and state.evals_without_improvement >= patience
                                   and state.step < self.total_steps)
        self.report_eval(state, metrics, improved)
        self._segment_start = time.perf_counter()  # evaluation is not training time
        return metrics

    def keep_best(self, state: TrainState) -> None:
        if not self.ranks.is_main and not self.sharded:
            return
        # sharded weights are gathered by every process; the main one writes them, or each keeps them without disk
        weights = trainable_state(self.module, keep=self.ranks.is_main or self.checkpointer is None)
        if self.checkpointer is None:
            self.best_weights = weights
        elif self.ranks.is_main:  # on disk only: a second in-memory copy of a full model costs RSS
            self.checkpointer.save_best(weights, state)

    def report_eval(self, state: TrainState, metrics: dict[str, float], improved: bool) -> None:
        """The eval hooks run on the main process; a pruning decision there stops every process."""
        pruned = None
        if self.ranks.is_main:
            try:
                self.hooks.on_eval(state, metrics, improved)
            except Pruned as exc:
                pruned = str(exc)
        pruned = self.ranks.broadcast(pruned)
        if pruned is not None:
            raise Pruned(pruned)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.cfg.batch_size)

    def restore_best(self, state: TrainState) -> None:
        weights = self.best_weights
        if weights is None and self.checkpointer is not None and state.best is not None:
            weights = self.checkpointer.best_weights(state.best["step"])
        if weights is not None:
            load_weights(self.module, weights)
