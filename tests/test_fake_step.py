"""The estimate's step memory comes from running the step on fake tensors: it must count what a real step
holds, byte for byte, and classify it; the allocator's kept memory is a line fitted through two measurements."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from tunelab.estimate.fake_step import LiveTensorBytes, measure_step
from tunelab.train.embedding_grad import KeptEmbeddingGradient
from tunelab.train.fast_dropout import cheaper_cpu_dropout
from tunelab.train.setup import build_optimizer

ROWS, LENGTH = 4, 32


def tiny_bert() -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(
        vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=2))


def tiny_llama(tied: bool = False) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=5000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=tied))


def tiny_tied_llama() -> LlamaForCausalLM:
    return tiny_llama(tied=True)


def inputs(causal: bool, device: str) -> dict[str, torch.Tensor]:
    ids = torch.ones(ROWS, LENGTH, dtype=torch.long, device=device)
    labels = ids if causal else torch.zeros(ROWS, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def real_peak_mb(model: torch.nn.Module, batch: dict, precision: str) -> float:
    """The same two AdamW steps on real tensors, counted by the same counter, with the dropout and the kept
    embedding gradient training uses."""
    counter = LiveTensorBytes()
    for tensor in [*model.parameters(), *model.buffers()]:
        counter.track(tensor)
    optimizer = build_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}])
    model.train()
    kept = KeptEmbeddingGradient.for_model(model, torch.device("cpu"), 1)
    assert kept.embedding is not None  # every model here trains its input embedding
    with counter, cheaper_cpu_dropout(model, torch.device("cpu")), kept.active():
        for step in range(2):
            kept.zero()
            if step:
                counter.reset_peak()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return counter.peak / 2**20


def test_a_gpu_planned_on_cpu_fake_tensors_trains_without_the_loops_cpu_only_ways(monkeypatch):
    """Planning a GPU run here traces the step on the CPU's fake tensors, but the loop's CPU dropout and kept
    embedding gradient apply to CPU training only: a GPU run drops with torch's own masks (a byte an element),
    which the drawn positions (less at p = 0.1) must not stand in for."""
    from tunelab.train import fast_dropout

    used = []
    monkeypatch.setattr(fast_dropout, "dropout", lambda x, p: used.append(p) or x)
    zero = KeptEmbeddingGradient.zero
    monkeypatch.setattr(KeptEmbeddingGradient, "zero",
                        lambda self: (self.embedding is not None and used.append("kept")) or zero(self))
    for target in ("cuda", "cpu"):
        with torch.device("meta"):
            skeleton = tiny_bert()
        measure_step(skeleton, inputs(False, "meta"), "fp32", "cpu", target=target)
        assert bool(used) == (target == "cpu"), target
        used.clear()


@pytest.mark.parametrize("build,causal", [(tiny_bert, False), (tiny_llama, True), (tiny_tied_llama, True)],
                         ids=["encoder", "causal-lm", "tied-embeddings"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_fake_step_holds_what_the_real_step_holds(build, causal, precision):
    torch.manual_seed(0)
    real = real_peak_mb(build(), inputs(causal, "cpu"), precision)
    with torch.device("meta"):
        skeleton = build()
    fake = measure_step(skeleton, inputs(causal, "meta"), precision, "cpu")
    assert fake.peak_mb == pytest.approx(real, rel=0.01)
    # parameters() lists a tied weight once
    assert fake.weights_mb == pytest.approx(sum(p.numel() for p in build().parameters()) * 4 / 2**20, rel=0.01)
    # AdamW keeps two fp32 moments per trained weight (and a step counter)
    assert fake.optimizer_mb == pytest.approx(2 * fake.weights_mb, rel=0.01)
    assert fake.activations_mb > 0
    # every trained weight's gradient and two moments: all heap-sized in a tiny model, except the input
    # embedding's gradient, allocated once and kept
    model = build()
    trained_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    embedding_mb = model.get_input_embeddings().weight.numel() * 4 / 2**20
    assert fake.heap_state_mb == pytest.approx(3 * trained_mb - embedding_mb, rel=0.01)


def test_frozen_weights_and_checkpointing_shrink_the_step():
    with torch.device("meta"):
        full = tiny_llama()
        frozen = tiny_llama()
        checkpointed = tiny_llama()
    for name, param in frozen.named_parameters():
        param.requires_grad_("lm_head" in name)
    plain = measure_step(full, inputs(True, "meta"), "fp32", "cpu")
    head_only = measure_step(frozen, inputs(True, "meta"), "fp32", "cpu")
    recomputed = measure_step(checkpointed, inputs(True, "meta"), "fp32", "cpu", checkpointing=True)
    assert head_only.optimizer_mb < plain.optimizer_mb / 2
    assert head_only.activations_mb < plain.activations_mb
    assert recomputed.activations_mb < plain.activations_mb
    assert recomputed.weights_mb == plain.weights_mb


def test_the_allocators_kept_memory_is_a_line_through_two_measurements():
    import json

    from tunelab.estimate import device

    points = {"8": {"kept_mb": 200.0, "churn_mb": 130.0}, "32": {"kept_mb": 550.0, "churn_mb": 500.0}}

    def run_module(module, args, timeout):  # what the calibration process prints for PRECISION ROWS
        return 0, "a progress line\n" + json.dumps(points[args[1]]) + "\n", ""
    fit = device.allocator_keeping("cpu", "fp32", run_module)
    slope = 350.0 / 370.0
    assert fit["allocator_per_churn_mb"] == pytest.approx(slope, abs=1e-3)
    assert fit["allocator_fixed_mb"] == pytest.approx(200 - slope * 130, abs=0.1)
    assert device.allocator_keeping("cuda", "bf16", run_module) == {"allocator_fixed_mb": 0.0,
                                                                    "allocator_per_churn_mb": 0.0}


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bf16_is_calibrated_in_fp32_where_the_cpu_emulates_it(fast_bf16, monkeypatch):
    import json

    from tunelab.estimate import device
    from tunelab.train import setup

    calibrated = []

    def run_module(module, args, timeout):
        calibrated.append(args[0])
        return 0, json.dumps({"kept_mb": 100.0 * int(args[1]), "churn_mb": 10.0 * int(args[1])}), ""

    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: fast_bf16)
    fit = device.allocator_keeping("cpu", "bf16", run_module)
    assert calibrated == (["bf16", "bf16"] if fast_bf16 else ["fp32", "fp32"])
    assert ("allocator_note" in fit) == (not fast_bf16) and fit["allocator_per_churn_mb"] == 10.0
