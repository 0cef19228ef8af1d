"""The loop's evaluation schedule and early stopping, on a tiny job."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tunelab.config import load_config
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method
from tunelab.train.loop import TrainingLoop, Validation, eval_interval


def loop_for(tiny_overrides, extra, metric_values):
    job = prepare_job(load_config(None, [*tiny_overrides, "methods=lora", *extra]))
    setup = setup_method(job, "lora")
    values = iter(metric_values)
    validation = Validation(lambda model: {"accuracy": next(values)}, "accuracy", True)
    return TrainingLoop(setup.model, setup.optimizer, setup.scheduler, setup.accelerator, job.config.train,
                        job.train, validation)


def test_about_ten_evaluations_per_run_unless_eval_every_steps_is_set(tiny_overrides):
    overrides = [o for o in tiny_overrides if not o.startswith("train.eval_every_steps")]
    state = loop_for(overrides, ["train.max_steps=20"], [0.5] * 50).run()
    assert [h["step"] for h in state.history] == list(range(2, 21, 2))
    cfg = load_config(None, overrides).train
    assert eval_interval(cfg, 125) == 13 and eval_interval(dataclasses.replace(cfg, eval_every_steps=0), 125) == 0


def test_early_stopping_counts_evaluations_without_improvement(tiny_overrides):
    extra = ["train.max_steps=20", "train.eval_every_steps=2", "train.early_stopping_patience=2"]
    state = loop_for(tiny_overrides, extra, [0.5, 0.6, 0.6, 0.55, 0.9]).run()
    assert state.stopped_early and state.step == 8  # best at step 4, then two evaluations without a gain
    assert not loop_for(tiny_overrides, ["train.max_steps=20", "train.eval_every_steps=2"], [0.5] * 20).run().stopped_early
    # patience runs out at the last evaluation, the last step: the run was not stopped, it finished
    ran_out_at_the_end = loop_for(tiny_overrides, [*extra[1:], "train.max_steps=6"], [0.9, 0.8, 0.7]).run()
    assert ran_out_at_the_end.step == 6 and not ran_out_at_the_end.stopped_early


def test_a_flat_metric_with_a_falling_loss_runs_out_of_patience_and_keeps_the_lowest_loss(tiny_overrides):
    """A tie with a lower loss is the better state to keep, but no progress: with accuracy flat for 20
    evaluations and the loss falling a little each time, the run never stopped."""
    job = prepare_job(load_config(None, [*tiny_overrides, "methods=lora", "train.max_steps=20",
                                         "train.eval_every_steps=2", "train.early_stopping_patience=2"]))
    setup = setup_method(job, "lora")
    losses = iter([0.70, 0.69, 0.68, 0.67, 0.66])
    validation = Validation(lambda model: {"accuracy": 0.45, "loss": next(losses)}, "accuracy", True)
    state = TrainingLoop(setup.model, setup.optimizer, setup.scheduler, setup.accelerator, job.config.train,
                         job.train, validation).run()
    assert state.stopped_early and state.step == 6  # the first evaluation, then two without a better accuracy
    assert state.best["step"] == 6 and state.best["loss"] == 0.68  # the tie-break still picks the lowest loss


def test_a_tie_on_the_metric_goes_to_the_lower_validation_loss():
    accuracy = Validation(lambda model: {}, "accuracy", True)
    best = {"accuracy": 0.65, "loss": 0.70, "step": 2}
    assert accuracy.improved({"accuracy": 0.65, "loss": 0.60}, best)
    assert not accuracy.improved({"accuracy": 0.65, "loss": 0.70}, best)  # a full tie: the earlier state stays
    assert not accuracy.improved({"accuracy": 0.60, "loss": 0.10}, best)  # the metric decides first
    assert not accuracy.improved({"accuracy": 0.65}, best)  # no loss reported: no tie-break
    loss = Validation(lambda model: {}, "loss", False)
    assert loss.improved({"loss": 0.69}, best) and not loss.improved({"loss": 0.70}, best)


def test_auto_precision_says_why_and_never_picks_emulated_bf16(monkeypatch, tiny_overrides):
    import tunelab.train.setup as setup

    cfg = dataclasses.replace(load_config(None, tiny_overrides).train, device="cpu", precision="auto")
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: False)
    precision, reason = setup.precision_choice(cfg)
    assert precision == "fp32" and "emulated" in reason
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: True)
    assert setup.precision_choice(cfg) == ("bf16", "auto: the CPU has AMX or AVX512-BF16, so bf16 matmuls run "
                                                   "natively")
    assert setup.precision_choice(dataclasses.replace(cfg, precision="fp32")) == ("fp32", "set by train.precision")


def test_gradient_checkpointing_trains_the_same_weights(tiny_overrides):
    """Recomputing activations in the backward pass (with the same dropout masks) changes memory, not math."""
    import torch

    trained = {}
    for checkpointing in (False, True):
        extra = ["train.max_steps=6", "train.eval_every_steps=0", f"train.gradient_checkpointing={checkpointing}"]
        job = prepare_job(load_config(None, [*tiny_overrides, "methods=full", *extra]))
        setup = setup_method(job, "full")
        validation = Validation(lambda model: {"accuracy": 0.5}, "accuracy", True)
        TrainingLoop(setup.model, setup.optimizer, setup.scheduler, setup.accelerator, job.config.train,
                     job.train, validation).run()
        trained[checkpointing] = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    assert any(getattr(m, "gradient_checkpointing", False) for m in setup.model.modules())
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_the_logged_learning_rate_is_the_one_each_step_used(tiny_overrides):
    """With one warmup step the first update runs at lr 0 (the schedule's start); its log must say 0, not the
    rate the scheduler has moved on to for the next step."""
    loop = loop_for(tiny_overrides, ["train.max_steps=4", "train.warmup_ratio=0.25", "train.log_every_steps=1",
                                     "train.eval_every_steps=0", "lora.lr=1e-3"], [0.5] * 5)
    logged = []
    loop.hooks.on_log = lambda state, logs: logged.append(logs["lr"])
    loop.run()
    assert logged == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])  # linear: warmup to 1e-3 at step 1, then down to 0


def test_training_losses_are_logged_every_log_every_steps_whatever_else_flushes(tiny_overrides):
    """Evaluations (every 3 steps) and checkpoints also move losses to the host; logging at each of them gave
    TensorBoard points at 3, 4, 6, 8, 9, ..., each a mean over another stretch. The points are at the multiples
    of log_every_steps and the last step, each the mean of the losses since the one before."""
    loop = loop_for(tiny_overrides, ["train.max_steps=11", "train.log_every_steps=4", "train.eval_every_steps=3"],
                    [0.5] * 10)
    logged = []
    loop.hooks.on_log = lambda state, logs: logged.append((state.step, logs["loss"]))
    state = loop.run()
    assert [step for step, _ in logged] == [4, 8, 11]
    for (step, loss), since in zip(logged, (0, 4, 8)):
        assert loss == pytest.approx(np.mean(state.losses[since:step]))
