"""Every registered method passes the same contract on a tiny BERT. A method without an entry here fails."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tunelab.config import load_config
from tunelab.job import prepare_job
from tunelab.registry import PrepareContext, get_method, registry
from tunelab.runner import setup_method
from tunelab.train.batches import collate, epoch_batches
from tunelab.train.evaluate import evaluate

# name → (options for the test run, predicate: should this parameter of the prepared model be trained?)
MATRIX = {
    "full": ([], lambda name: True),
    "llrd": (["llrd.decay=0.8"], lambda name: True),
    "lora": (["lora.r=4", "lora.lr=1e-2"], lambda name: "lora_" in name or "modules_to_save" in name),
    "prompt-tuning": (["prompt-tuning.num_virtual_tokens=5", "prompt-tuning.init=random"],
                      lambda name: "prompt_encoder" in name or "modules_to_save" in name),
}
METHODS = sorted(registry())


def make_job(name, tiny_overrides, extra=()):
    options, _ = MATRIX[name]
    return prepare_job(load_config(None, [*tiny_overrides, f"methods={name}", "train.weight_decay=0",
                                          *options, *extra]))


def train_steps(setup, job, steps):
    batches = epoch_batches(job.train.lengths, job.config.train.batch_size, 0, 0)
    losses = []
    for i in range(steps):
        batch = collate(job.train, batches[i % len(batches)], setup.accelerator.device)
        with setup.accelerator.autocast():  # a no-op in fp32
            loss = setup.model(**batch).loss
        loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
        setup.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_every_registered_method_has_a_matrix_entry():
    assert set(MATRIX) == set(registry()), "add an entry to MATRIX for every registered method"


@pytest.mark.parametrize("name", METHODS)
def test_only_intended_parameters_change(name, tiny_overrides):
    job = make_job(name, tiny_overrides)
    setup = setup_method(job, name)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    intended = {n for n in before if MATRIX[name][1](n)}
    assert trainable == intended
    train_steps(setup, job, steps=3)
    changed = {n for n, p in setup.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == intended


@pytest.mark.parametrize("name", METHODS)
def test_trainable_count_matches_the_methods_formula(name, tiny_overrides):
    job = make_job(name, tiny_overrides)
    setup = setup_method(job, name)
    actual = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    assert actual == setup.expected_trainable > 0


def test_lora_formula_by_hand(tiny_overrides):
    # tiny BERT: 2 layers, hidden 32; query and value are 32→32; head 32*2+2.
    job = make_job("lora", tiny_overrides)
    assert setup_method(job, "lora").expected_trainable == 2 * 2 * 4 * (32 + 32) + 32 * 2 + 2


@pytest.mark.parametrize("name", METHODS)
def test_loss_is_finite_and_falls(name, tiny_overrides):
    job = make_job(name, tiny_overrides, ["train.lr=5e-3", "train.warmup_ratio=0", "train.epochs=3",
                                          "train.max_steps=40"])
    setup = setup_method(job, name)
    device = setup.accelerator.device
    before = evaluate(setup.model, job.train, 64, device, job.num_labels)["loss"]
    losses = train_steps(setup, job, steps=40)
    after = evaluate(setup.model, job.train, 64, device, job.num_labels)["loss"]
    assert all(math.isfinite(x) for x in losses)
    assert after < before - 0.01, (before, after)


@pytest.mark.parametrize("name", METHODS)
def test_save_then_load_gives_identical_logits(name, tiny_overrides, tmp_path):
    job = make_job(name, tiny_overrides)
    setup = setup_method(job, name)
    train_steps(setup, job, steps=3)
    model = setup.accelerator.unwrap_model(setup.model).eval()
    method = get_method(name)
    method.save(model, tmp_path)
    from tunelab.modeling import load_classifier

    torch.manual_seed(123)  # a different head init: the saved head must replace it
    fresh_base = load_classifier(job.model_path, job.num_labels, job.label_names)
    reloaded = method.load(tmp_path, fresh_base).eval()
    batch = collate(job.validation, np.arange(8), torch.device("cpu"))
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_stores_frozen_matmul_weights_in_bf16_with_identical_training(name, tiny_overrides, monkeypatch):
    """Under bf16 autocast an adapter method keeps its frozen Linear weights in bf16 (no per-step casts);
    trainable ones and their optimizer state stay fp32, and training computes exactly what it did with fp32
    storage."""
    import tunelab.runner

    job = make_job(name, tiny_overrides, ["train.precision=bf16"])
    stored = setup_method(job, name)
    frozen = [p for m in stored.model.modules() if isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False) if not p.requires_grad]
    # only adapter methods convert: a method that saves the whole model must not write a rounded base
    expected = torch.bfloat16 if get_method(name).saves_adapter else torch.float32
    assert all(p.dtype == expected for p in frozen)
    assert all(p.dtype == torch.float32 for p in stored.model.parameters() if p.requires_grad)
    assert bool(frozen) == (name not in ("full", "llrd"))  # full-model methods freeze nothing
    losses_bf16_storage = train_steps(stored, job, 3)

    monkeypatch.setattr(tunelab.runner, "store_frozen_matmul_weights", lambda model, dtype: 0)
    plain = setup_method(job, name)
    assert all(p.dtype == torch.float32 for p in plain.model.parameters())
    assert train_steps(plain, job, 3) == losses_bf16_storage
    trained = {n: p for n, p in stored.model.named_parameters() if p.requires_grad}
    for n, p in plain.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n


def test_prepare_context_is_all_a_method_needs(tiny_bert):
    # expected_trainable_params works from the untouched base model and options alone
    from tunelab.modeling import load_classifier

    base = load_classifier(str(tiny_bert), 3, ["a", "b", "c"])
    ctx = PrepareContext(str(tiny_bert), str(tiny_bert), 3)
    full = get_method("full")
    assert full.expected_trainable_params(base, full.Options(), ctx) == sum(p.numel() for p in base.parameters())
