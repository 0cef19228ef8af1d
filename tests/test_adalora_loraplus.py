"""What the shared method contract cannot see: LoRA+'s per-matrix learning rates, AdaLoRA's rank allocator
(it prunes only when the loop's after-step hook runs), its schedule on short runs, and its regulariser."""
from __future__ import annotations

import pytest
import torch

from tunelab.errors import TunelabInputError
from tunelab.experiment.runner import setup_method
from tunelab.methods.adalora import schedule, tuner
from tunelab.methods.base import get_method
from tunelab.train.batches import collate, epoch_batches

from test_methods_matrix import make_job


def test_lora_plus_groups_give_b_ratio_times_the_rate_of_a(task_overrides):
    job = make_job("lora-plus", "classification", task_overrides,
                   ["lora-plus.lr=1e-3", "lora-plus.ratio=4", "train.weight_decay=0.01"])
    setup = setup_method(job, "lora-plus")
    recorded = {g["name"]: g for g in setup.param_groups}  # as built, before the scheduler scales them
    groups = {g["name"]: {id(p) for p in g["params"]} for g in setup.optimizer.param_groups}
    named = [(n, p) for n, p in setup.model.named_parameters() if p.requires_grad]
    assert groups["lora_A"] == {id(p) for n, p in named if "lora_A" in n}
    assert groups["lora_B"] == {id(p) for n, p in named if "lora_B" in n}
    assert recorded["lora_A"]["lr"] == 1e-3 and recorded["lora_B"]["lr"] == pytest.approx(4e-3)
    # the head keeps the base rate; its bias goes without weight decay
    assert {recorded[k]["lr"] for k in ("other", "other.no_decay")} == {1e-3}
    assert recorded["other.no_decay"]["weight_decay"] == 0.0 and recorded["lora_B"]["weight_decay"] == 0.01
    assert set().union(*groups.values()) == {id(p) for _, p in named}


@pytest.mark.parametrize("method, vector", [("ia3", "ia3_l"), ("adalora", "lora_E")])
def test_scaling_vectors_are_not_decayed_towards_zero(method, vector, task_overrides):
    """IA3's factors start at 1 and AdaLoRA's singular values hold the adapter's scale; stored 2-D, they were
    decayed like weight matrices, pulling each layer towards off."""
    job = make_job(method, "classification", task_overrides, ["train.weight_decay=0.01"])
    setup = setup_method(job, method)
    decay_of = {id(p): g["weight_decay"] for g in setup.optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in setup.model.named_parameters() if p.requires_grad]
    vectors = [p for n, p in named if vector in n]
    assert vectors and all(p.ndim == 2 and decay_of[id(p)] == 0.0 for p in vectors)
    assert any(decay_of[id(p)] == 0.01 for n, p in named if vector not in n)  # the rest as before


def masks_after(job, steps: int, hook: bool):
    """Train like the loop does, with or without the method's after-step hook; the zeroed singular values."""
    setup = setup_method(job, "adalora")
    opts = job.config.options("adalora")
    batches = epoch_batches(job.train.lengths, job.config.train.batch_size, 0, 0)
    for step in range(1, steps + 1):
        setup.model(**collate(job.train, batches[step % len(batches)], setup.accelerator.device)).loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
        if hook:
            get_method("adalora").after_step(setup.model, opts, step)
        setup.optimizer.zero_grad()
    ada = tuner(setup.model)
    zeroed = {n: (p == 0).view(-1).tolist() for n, p in ada.model.named_parameters() if ".lora_E." in n}
    return zeroed, ada.peft_config["default"].rank_pattern


def test_adalora_prunes_ranks_only_with_the_after_step_hook(task_overrides):
    job = make_job("adalora", "classification", task_overrides, ["adalora.init_r=4", "adalora.target_r=2"])
    zeroed, pattern = masks_after(job, 6, hook=True)
    assert pattern is not None and any(not kept for row in pattern.values() for kept in row)
    assert any(any(row) for row in zeroed.values())  # pruned triplets: E set to exactly 0
    zeroed, pattern = masks_after(job, 6, hook=False)
    assert pattern is None and not any(any(row) for row in zeroed.values())


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 10, 37, 1000])
def test_adalora_schedule_is_valid_for_any_run_length(steps):
    from peft import AdaLoraConfig

    s = schedule(steps)
    AdaLoraConfig(target_modules=["q"], **s)  # peft validates the schedule
    assert s["total_step"] - s["tfinal"] >= 2  # the final allocation has importance from an earlier step


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_adalora_runs_very_short_schedules(task_overrides, steps):
    job = make_job("adalora", "classification", task_overrides, [f"train.max_steps={steps}"])
    masks_after(job, steps, hook=True)


def test_adalora_refuses_a_target_rank_not_below_the_initial_one(task_overrides):
    with pytest.raises(TunelabInputError, match="adalora.target_r"):
        make_job("adalora", "classification", task_overrides, ["adalora.init_r=4", "adalora.target_r=4"])


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_adalora_regulariser_is_in_the_training_loss_only(task, task_overrides):
    job = make_job("adalora", task, task_overrides)
    setup = setup_method(job, "adalora")
    model = setup.model.eval()  # no dropout: the two forwards differ by the regulariser alone
    batch = collate(job.train, epoch_batches(job.train.lengths, 8, 0, 0)[0], setup.accelerator.device)
    with torch.no_grad():
        measured = model(**batch).loss
    trained = model(**batch).loss
    assert trained.requires_grad and trained.item() > measured.item()
