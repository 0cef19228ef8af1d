"""Every registered method passes the same contract on every registered task, on tiny models built here.
A method or task without an entry here fails the suite; a pair that cannot work is listed in NOT_APPLICABLE
with its reason and must be refused by `validate`."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tunelab.config import load_config
from tunelab.errors import TunelabInputError
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method
from tunelab.methods.base import get_method, registry
from tunelab.tasks.base import registry as task_registry
from tunelab.train.batches import collate, epoch_batches

# method → (options for the test run, predicate: is this parameter the method's own trainable one?)
MATRIX = {
    "full": ([], lambda name: True),
    "llrd": (["llrd.decay=0.8"], lambda name: True),
    "lora": (["lora.r=4", "lora.lr=1e-2"], lambda name: "lora_" in name),
    # 4 → 3: pruning can never empty a whole layer within the contract's 3-step runs (E would not change)
    "adalora": (["adalora.init_r=4", "adalora.target_r=3", "adalora.lr=1e-2"],
                lambda name: any(f"lora_{m}." in name for m in "ABE")),
    "lora-plus": (["lora-plus.r=4", "lora-plus.lr=2e-3"], lambda name: "lora_" in name),
    "prompt-tuning": (["prompt-tuning.num_virtual_tokens=5", "prompt-tuning.init=random"],
                      lambda name: "prompt_encoder" in name),
    "bitfit": ([], lambda name: name.endswith(".bias")),
    "ia3": ([], lambda name: "ia3_l" in name),
    "prefix-tuning": (["prefix-tuning.num_virtual_tokens=5"], lambda name: "prompt_encoder" in name),
    "p-tuning": (["p-tuning.num_virtual_tokens=5", "p-tuning.encoder_hidden_size=16"],
                 lambda name: "prompt_encoder" in name),
    "dora": (["dora.r=4", "dora.lr=1e-2"], lambda name: "lora_" in name),  # lora_A/B and lora_magnitude_vector
    # top block (of 2) + what sits above the stack: pooler and classifier (BERT), final norm (Llama)
    "freeze": (["freeze.k=1"], lambda name: any(part in name for part in (
        ".layer.1.", ".layers.1.", ".pooler.", ".norm.", ".classifier.", ".score."))),
}
TASKS = ["classification", "causal-lm"]
NOT_APPLICABLE: dict[tuple[str, str], str] = {  # (method, task) → why
    ("bitfit", "causal-lm"): "the task's test model (Llama, as Mistral, Gemma) has no bias terms: nothing to train",
}
PAIRS = [(m, t) for m in sorted(registry()) for t in TASKS if (m, t) not in NOT_APPLICABLE]


def intended(method: str, heads: tuple[str, ...], name: str) -> bool:
    """The method's own parameters, plus the task's fresh head (trained in full by every method): peft keeps
    a trainable copy of it (modules_to_save) beside the frozen original, the other methods train the module
    itself, under whatever wrapper the method puts around the model."""
    parts = name.split(".")
    return MATRIX[method][1](name) or "modules_to_save" in parts or \
        (bool(set(parts) & set(heads)) and "original_module" not in parts)


def task_heads(job) -> tuple[str, ...]:
    """The modules the task declares as its head (on the unprepared model: a method may wrap it)."""
    return job.task.head_modules(job.load_base_model())


def make_job(method, task, task_overrides, extra=()):
    options, _ = MATRIX[method]
    return prepare_job(load_config(None, [*task_overrides[task], f"methods={method}", "train.weight_decay=0",
                                          *options, *extra]))


def train_steps(setup, job, steps):
    """What the loop does per step, including the method's after-step hook (each job has one method)."""
    name = job.config.methods[0]
    batches = epoch_batches(job.train.lengths, job.config.train.batch_size, 0, 0)
    losses = []
    for i in range(steps):
        batch = collate(job.train, batches[i % len(batches)], setup.accelerator.device)
        with setup.accelerator.autocast():  # a no-op in fp32
            loss = setup.model(**batch).loss
        loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
        get_method(name).after_step(setup.model, job.config.options(name), i + 1)
        setup.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def logits(model, job, rows=8):
    batch = collate(job.validation, np.arange(min(rows, len(job.validation))), torch.device("cpu"))
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_every_registered_method_and_task_has_a_matrix_entry():
    assert set(MATRIX) == set(registry()), "add an entry to MATRIX for every registered method"
    assert set(TASKS) == set(task_registry()), "add every registered task to TASKS (and a task_overrides job)"


@pytest.mark.parametrize("method,task", PAIRS)
def test_only_intended_parameters_change(method, task, task_overrides):
    job = make_job(method, task, task_overrides)
    setup = setup_method(job, method)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    heads = task_heads(job)
    wanted = {n for n in before if intended(method, heads, n)}
    assert trainable == wanted
    train_steps(setup, job, steps=3)
    changed = {n for n, p in setup.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == wanted


@pytest.mark.parametrize("method,task", PAIRS)
def test_trainable_count_matches_the_methods_formula(method, task, task_overrides):
    setup = setup_method(make_job(method, task, task_overrides), method)
    actual = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    assert actual == setup.expected_trainable > 0


def test_a_wrong_formula_is_reported_when_the_run_starts(task_overrides, monkeypatch):
    monkeypatch.setattr(get_method("bitfit"), "expected_trainable_params", lambda *args: 1)
    with pytest.warns(RuntimeWarning, match=r"'bitfit': expected_trainable_params gives 1 parameters, but"):
        setup_method(make_job("bitfit", "classification", task_overrides), "bitfit")


def test_lora_formula_by_hand(task_overrides):
    # tiny BERT: 2 layers, hidden 32; query and value are 32→32; head 32*2+2.
    assert setup_method(make_job("lora", "classification", task_overrides), "lora").expected_trainable == \
        2 * 2 * 4 * (32 + 32) + 32 * 2 + 2
    # tiny Llama: 2 layers; q_proj 32→32, v_proj 32→16 (2 of 4 heads for keys/values); no head.
    assert setup_method(make_job("lora", "causal-lm", task_overrides), "lora").expected_trainable == \
        2 * 4 * ((32 + 32) + (32 + 16))


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_all_linear_targets_every_linear_layer_but_the_head(method, task_overrides):
    """peft's `all-linear` shorthand was refused as a module name; expanded, the count and peft agree."""
    setup = setup_method(make_job(method, "classification", task_overrides, [f"{method}.target_modules=[all-linear]"]),
                         method)
    adapted = {n.split(".lora_")[0] for n, p in setup.model.named_parameters() if ".lora_" in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"query", "key", "value", "dense"}  # dense: out, ffn, pooler
    assert not any("classifier" in n for n in adapted)
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    assert trainable == setup.expected_trainable


@pytest.mark.parametrize("method,task", PAIRS)
def test_loss_is_finite_and_falls(method, task, task_overrides):
    no_generation = ["causal-lm.generation_samples=0"] if task == "causal-lm" else []
    job = make_job(method, task, task_overrides, ["train.lr=5e-3", "train.warmup_ratio=0", "train.epochs=3",
                                                  "train.max_steps=40", *no_generation])
    setup = setup_method(job, method)
    eval_setup = job.eval_setup(setup.accelerator.device, setup.accelerator.autocast)
    before = job.task.evaluate(setup.model, job.train, eval_setup).metrics["loss"]
    losses = train_steps(setup, job, steps=40)
    after = job.task.evaluate(setup.model, job.train, eval_setup).metrics["loss"]
    assert all(math.isfinite(x) for x in losses)
    assert after < before - 0.01, (before, after)


@pytest.mark.parametrize("method,task", PAIRS)
def test_save_then_load_gives_identical_logits(method, task, task_overrides, tmp_path):
    # fp32: under bf16 the trained model's frozen weights are stored rounded, which is not what is saved
    job = make_job(method, task, task_overrides, ["train.precision=fp32"])
    setup = setup_method(job, method)
    train_steps(setup, job, steps=3)
    model = setup.accelerator.unwrap_model(setup.model).eval()
    get_method(method).save(model, tmp_path)
    torch.manual_seed(123)  # a different head init: the saved head must replace it
    reloaded = get_method(method).load(tmp_path, job.load_base_model()).eval()
    assert torch.equal(logits(model, job), logits(reloaded, job))


@pytest.mark.parametrize("method,task", PAIRS)
def test_bf16_stores_frozen_matmul_weights_in_bf16_with_identical_training(method, task, task_overrides,
                                                                            monkeypatch):
    """Under bf16 autocast an adapter method keeps its frozen Linear weights in bf16 (no per-step casts);
    trainable ones and their optimizer state stay fp32, and training computes exactly what it did with fp32
    storage."""
    import tunelab.experiment.runner

    job = make_job(method, task, task_overrides, ["train.precision=bf16"])
    stored = setup_method(job, method)
    tied = {id(p) for m in stored.model.modules() if not isinstance(m, torch.nn.Linear)
            for p in m.parameters(recurse=False)}  # e.g. an output layer tied to the input embedding
    frozen = [p for m in stored.model.modules() if isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False) if not p.requires_grad and id(p) not in tied]
    # only adapter methods convert: a method that saves the whole model must not write a rounded base
    converts = get_method(method).saves_adapter and get_method(method).bf16_frozen_weights
    expected = torch.bfloat16 if converts else torch.float32
    assert all(p.dtype == expected for p in frozen)
    assert all(p.dtype == torch.float32 for p in stored.model.parameters() if p.requires_grad)
    # adapter methods always leave a frozen base to convert; a whole-model method may freeze some (freeze),
    # and then keeps it fp32 (checked above)
    assert bool(frozen) or not get_method(method).saves_adapter
    losses_bf16_storage = train_steps(stored, job, 3)

    monkeypatch.setattr(tunelab.experiment.runner, "store_frozen_matmul_weights", lambda model, dtype: 0)
    plain = setup_method(job, method)
    assert all(p.dtype == torch.float32 for p in plain.model.parameters())
    assert train_steps(plain, job, 3) == losses_bf16_storage
    trained = {n: p for n, p in stored.model.named_parameters() if p.requires_grad}
    for n, p in plain.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n


@pytest.mark.parametrize("pair", sorted(NOT_APPLICABLE))
def test_not_applicable_pairs_are_refused_by_validate(pair, task_overrides):
    method, task = pair
    with pytest.raises(TunelabInputError):
        make_job(method, task, task_overrides)


def test_a_method_missing_part_of_the_protocol_is_refused_when_registered():
    from tunelab.methods.base import Method, register

    class Unloadable(Method):
        name, description = "unloadable", "prepares but cannot load what it saved"

        def prepare(self, model, opts, ctx):
            return model

        def expected_trainable_params(self, base_model, opts, ctx):
            return 0

    with pytest.raises(TypeError, match="load"):
        register(Unloadable)
    assert "unloadable" not in registry()


def test_lora_bias_all_counts_what_peft_trains(tmp_path):
    """peft's bias="all" trains parameters named `bias` or `*.bias`; Funnel's relative-attention tables
    `r_w_bias` end in "bias" too and were counted though they stay frozen."""
    from transformers import FunnelConfig, FunnelForSequenceClassification

    from tunelab.methods.base import PrepareContext, get_method
    from tunelab.tasks.base import registry

    model = FunnelForSequenceClassification(FunnelConfig(vocab_size=50, block_sizes=[1, 1], d_model=16, n_head=2,
                                                         d_head=8, d_inner=32, num_labels=2))
    task, method = registry()["classification"], get_method("lora")
    ctx = PrepareContext(str(tmp_path), str(tmp_path), task, task.head_modules(model))
    options = method.Options(bias="all", target_modules=["q_head", "v_head"])
    expected = method.expected_trainable_params(model, options, ctx)
    assert expected == sum(p.numel() for p in method.prepare(model, options, ctx).parameters() if p.requires_grad)
