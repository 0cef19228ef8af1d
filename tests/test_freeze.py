"""freeze: top-k blocks + head trained, the frozen bottom in eval mode and its output cached per training row.

The cache must never change the numbers: cached training matches freeze.cache=false to rounding, and what
happens to be cached (a resumed run starts with an empty cache) changes nothing, bit for bit."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tunelab.config import load_config
from tunelab.errors import TunelabInputError
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method
from tunelab.methods.freeze import FrozenBottomModel
from tunelab.train.batches import collate, epoch_batches

from conftest import build_tiny_bert


def make_setup(overrides, *extra):
    job = prepare_job(load_config(None, [*overrides, "methods=freeze", "train.lr=2e-3", "train.warmup_ratio=0",
                                         "train.weight_decay=0", *extra]))
    return job, setup_method(job, "freeze")


def train(job, setup, epochs=2, clear_cache_every=0):
    """The loop's work: its batch order, autocast, optimizer and schedule, in train mode."""
    model = setup.model
    model.train()
    losses, step = [], 0
    for epoch in range(epochs):
        for rows in epoch_batches(job.train.lengths, job.config.train.batch_size, job.config.train.seed, epoch,
                                  job.config.train.bucket_size):
            if clear_cache_every and step % clear_cache_every == 0:
                model.cache.clear()  # what a resumed run sees: rows cached before the crash are gone
            batch = collate(job.train, rows, setup.accelerator.device)
            with setup.accelerator.autocast():
                loss = model(**batch).loss
            loss.backward()
            setup.optimizer.step()
            setup.scheduler.step()
            setup.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def distinct_rows(data) -> int:
    keys = {data.ids[i, :n].tobytes() for i, n in enumerate(data.lengths)}
    return len(keys)


@pytest.fixture(scope="module")
def bert_with_dropout(tiny_bert, tmp_path_factory):
    """The tiny BERT with dropout on: the trainable top's dropout masks must match with and without the cache."""
    folder = tmp_path_factory.mktemp("tiny-bert-dropout")
    shutil.copytree(tiny_bert, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
@pytest.mark.parametrize("k", [0, 1])
def test_cached_training_matches_uncached(task, k, task_overrides, bert_with_dropout):
    overrides = task_overrides[task]
    if task == "classification":
        overrides = [*overrides, f"model.name_or_path={bert_with_dropout}"]
    else:
        overrides = [*overrides, "causal-lm.generation_samples=0"]
    options = [f"freeze.k={k}", "train.precision=fp32"]
    job, cached = make_setup(overrides, *options)
    losses, weights = train(job, cached)
    model = cached.model
    assert isinstance(model, FrozenBottomModel) and model.cache_status == "on"
    assert len(model.cache) == model.cache_misses == distinct_rows(job.train)  # each row computed once
    assert model.cache_hits == 2 * len(job.train) - model.cache_misses  # the whole second epoch came from it

    _, plain = make_setup(overrides, *options, "freeze.cache=false")
    plain_losses, plain_weights = train(job, plain)
    assert plain.model.cache_status.startswith("off") and not plain.model.cache
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5, atol=1e-5)
    assert weights.keys() == plain_weights.keys()
    for name in weights:
        # an attention key bias has a zero gradient in exact arithmetic (softmax ignores a constant per
        # query); Adam scales the rounding noise it gets to full-size steps, so it differs by path
        if not name.endswith("key.bias"):
            torch.testing.assert_close(weights[name], plain_weights[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_results_do_not_depend_on_what_is_cached(precision, task, task_overrides):
    """Rows are computed alone, never inside their batch: emptying the cache (a resume) changes no bit."""
    overrides = [*task_overrides[task], "freeze.k=1", f"train.precision={precision}"]
    if task == "causal-lm":
        overrides.append("causal-lm.generation_samples=0")
    job, first = make_setup(overrides)
    losses, weights = train(job, first)
    job, second = make_setup(overrides)
    losses_cleared, weights_cleared = train(job, second, clear_cache_every=7)
    assert second.model.cache_status == "on" and second.model.cache_misses > distinct_rows(job.train)
    assert losses == losses_cleared
    assert all(torch.equal(weights[n], weights_cleared[n]) for n in weights)


def test_linear_probe_and_top_k_train_only_the_top(tmp_path, tiny_overrides):
    model_dir = build_tiny_bert(tmp_path / "bert3", layers=3)
    overrides = [*tiny_overrides, f"model.name_or_path={model_dir}"]
    head = {"model.classifier.weight", "model.classifier.bias",
            "model.bert.pooler.dense.weight", "model.bert.pooler.dense.bias"}  # everything above the blocks
    for k, blocks in ((0, []), (2, [1, 2]), (3, [0, 1, 2])):
        job, setup = make_setup(overrides, f"freeze.k={k}")
        model = setup.model
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = head | {n for n, _ in model.named_parameters()
                           if any(n.startswith(f"model.bert.encoder.layer.{b}.") for b in blocks)}
        assert trainable == expected, k
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == setup.expected_trainable
        model.train()
        layers = model.model.bert.encoder.layer
        assert not model.model.bert.embeddings.training  # the frozen bottom stays in eval mode
        assert all(layers[i].training == (i in blocks) for i in range(3))
        assert model.model.classifier.training
        assert model.cache_status == ("on" if k < 3 else "off: every block trains, only the embeddings are frozen")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(job, setup, epochs=1)
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        assert changed == expected


def test_k_larger_than_the_stack_is_refused(tiny_overrides):
    with pytest.raises(TunelabInputError) as err:
        prepare_job(load_config(None, [*tiny_overrides, "methods=freeze", "freeze.k=3"]))
    assert "freeze.k: 3 is more than the 2 transformer blocks" in str(err.value)


def test_evaluation_always_computes(task_overrides):
    job, setup = make_setup(task_overrides["classification"], "freeze.k=1", "train.precision=fp32")
    train(job, setup, epochs=1)
    model = setup.model.eval()
    size, hits = len(model.cache), model.cache_hits
    batch = collate(job.validation, np.arange(8), torch.device("cpu"))
    with torch.no_grad():
        wrapped = model(**batch).logits
        inner = model.model(**batch).logits
    assert torch.equal(wrapped, inner)
    assert (len(model.cache), model.cache_hits) == (size, hits)  # validation rows neither read nor stored
    metrics = job.task.evaluate(model, job.validation, job.eval_setup(torch.device("cpu"), setup.accelerator.autocast))
    assert len(model.cache) == size and np.isfinite(metrics.metrics["loss"])


def test_a_failed_first_step_check_switches_the_cache_off(task_overrides, monkeypatch):
    """An architecture whose top cannot run alone must compute normally, never train on wrong numbers."""
    overrides = [*task_overrides["classification"], "freeze.k=1", "train.precision=fp32"]
    job, plain = make_setup(overrides, "freeze.cache=false")
    plain_losses, _ = train(job, plain, epochs=1)
    wrong = FrozenBottomModel._bottom_output
    monkeypatch.setattr(FrozenBottomModel, "_bottom_output", lambda self, *args: wrong(self, *args) + 1)
    job, broken = make_setup(overrides)
    with pytest.warns(RuntimeWarning, match="caching switched off"):
        losses, _ = train(job, broken, epochs=1)
    assert broken.model.cache_status.startswith("off: the cached forward does not reproduce")
    assert losses == plain_losses


def test_a_trainable_parameter_feeding_the_bottom_switches_the_cache_off(tmp_path, toy_data):
    """MPNet's relative attention bias sits after the stack, so it trains, but every block reads it: the
    bottom's output changes as it trains, and a cache would go stale after the first step (where warmup's
    lr 0 made the step check agree). Cached and uncached training must give the same losses."""
    from transformers import MPNetConfig, MPNetModel

    from test_model_heads import ROBERTA_SIZES, build_tiny_encoder

    folder = build_tiny_encoder(tmp_path / "mpnet", MPNetConfig, MPNetModel, **ROBERTA_SIZES)
    overrides = [f"model.name_or_path={folder}", f"data.train_file={toy_data['train']}", "data.max_length=32",
                 "train.batch_size=8", "freeze.k=1", "train.precision=fp32", "train.warmup_ratio=0.1"]
    job, plain = make_setup(overrides, "freeze.cache=false")
    plain_losses, _ = train(job, plain, epochs=1)
    job, cached = make_setup(overrides)
    with pytest.warns(RuntimeWarning, match="trainable parameters feed the frozen bottom"):
        losses, _ = train(job, cached, epochs=1)
    assert "relative_attention_bias" in cached.model.cache_status
    assert losses == plain_losses


def test_the_count_adds_the_top_blocks_whatever_their_sizes(tmp_path):
    """ModernBERT's first block has no attention norm (T5's holds the position table): k blocks of the last
    block's size miscounted what freeze trains."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    from tunelab.methods.base import PrepareContext, get_method
    from tunelab.tasks.base import registry

    model = ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        pad_token_id=0, num_labels=2))
    task, method = registry()["classification"], get_method("freeze")
    ctx = PrepareContext(str(tmp_path), str(tmp_path), task, task.head_modules(model))
    options = method.Options(k=3, cache=False)
    expected = method.expected_trainable_params(model, options, ctx)
    prepared = method.prepare(model, options, ctx)
    assert expected == sum(p.numel() for p in prepared.parameters() if p.requires_grad)
