"""precision auto: the rule where bf16 would be emulated, a measurement where it is native, cached, and a
measurement that leaves the model exactly as it was."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tunelab.config import TrainConfig, load_config
from tunelab.experiment.job import prepare_job
from tunelab.experiment.runner import setup_method
from tunelab.train import precision, setup
from tunelab.train.batches import collate, epoch_batches

AUTO = TrainConfig(precision="auto", device="cpu")


@pytest.fixture
def prepared(tiny_overrides):
    job = prepare_job(load_config(None, [*tiny_overrides, "methods=lora", "train.precision=fp32"]))
    model = setup_method(job, "lora").model
    batch = collate(job.train, epoch_batches(job.train.lengths, 8, 0, 0)[0], torch.device("cpu"))
    return model, batch


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))


def test_no_measurement_where_bf16_would_be_emulated(prepared, monkeypatch, fresh_cache):
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(precision, "step_seconds", lambda *a, **k: pytest.fail("measured"))
    chosen, reason = precision.choose_precision(AUTO, *prepared, key="k")
    assert chosen == "fp32" and "emulated" in reason


def test_a_set_precision_is_kept(prepared, monkeypatch, fresh_cache):
    monkeypatch.setattr(precision, "step_seconds", lambda *a, **k: pytest.fail("measured"))
    assert precision.choose_precision(dataclasses.replace(AUTO, precision="bf16"), *prepared, key="k") == \
        ("bf16", "set by train.precision")


@pytest.mark.parametrize("bf16_s, expected", [(0.5, "bf16"), (1.5, "fp32")])
def test_bf16_only_when_clearly_faster_and_then_from_the_cache(prepared, monkeypatch, fresh_cache, bf16_s, expected):
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(precision, "step_seconds", lambda model, batch, bf16: bf16_s if bf16 else 1.0)
    chosen, reason = precision.choose_precision(AUTO, *prepared, key="model|lora")
    assert chosen == expected and "fp32 1000 ms" in reason
    monkeypatch.setattr(precision, "step_seconds", lambda *a, **k: pytest.fail("measured twice"))
    again, why = precision.choose_precision(AUTO, *prepared, key="model|lora")
    assert again == expected and "measured earlier" in why


def test_a_near_tie_is_fp32_and_measured_again(prepared, monkeypatch, fresh_cache):
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: True)
    calls = []
    monkeypatch.setattr(precision, "step_seconds", lambda model, batch, bf16: calls.append(bf16) or (0.95 if bf16 else 1.0))
    for _ in range(2):
        assert precision.choose_precision(AUTO, *prepared, key="k")[0] == "fp32"
    assert len(calls) == 4  # measured both times: a tie may be a busy machine's noise


def test_without_measuring_native_bf16_follows_the_device_rule(prepared, monkeypatch, fresh_cache):
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(precision, "step_seconds", lambda *a, **k: pytest.fail("measured"))
    chosen, reason = precision.choose_precision(AUTO, *prepared, key="k", can_measure=False)
    assert chosen == "bf16" and "not measured" in reason


class OneOfTwoProcesses:
    """The group as process `rank` of two sees it: `theirs` is what the other process measured (fp32, bf16),
    `main_cached` what the main process read from its cache, which the second process receives."""

    def __init__(self, rank: int, theirs: list[float], main_cached: dict | None = None):
        self.rank, self.world, self.theirs, self.main_cached, self.barriers = rank, 2, theirs, main_cached, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        return obj if self.is_main else self.main_cached

    def barrier(self):
        self.barriers += 1

    def gather(self, obj):
        return [obj, self.theirs] if self.is_main else [self.theirs, obj]


def test_several_processes_measure_together_and_the_slowest_decides(prepared, monkeypatch, fresh_cache):
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(precision, "step_seconds", lambda model, batch, bf16: 0.5 if bf16 else 1.0)
    ranks = OneOfTwoProcesses(0, theirs=[1.0, 0.95])  # bf16 is clearly faster here, not in the other process
    chosen, reason = precision.choose_precision(AUTO, *prepared, key="k", ranks=ranks)
    assert chosen == "fp32" and "in each of 2 processes (the slowest counts): fp32 1000 ms, bf16 950 ms" in reason
    assert ranks.barriers == 2  # each precision timed with both processes starting together
    chosen, _ = precision.choose_precision(AUTO, *prepared, key="k", ranks=OneOfTwoProcesses(0, theirs=[1.2, 0.6]))
    assert chosen == "bf16"
    assert precision.read_measurements(precision.CACHE)  # kept by the main process ...
    chosen, why = precision.choose_precision(AUTO, *prepared, key="k")
    assert chosen == "bf16" and "measured earlier" not in why  # ... for two processes, not for one


def test_the_other_processes_take_the_main_ones_decision_and_write_nothing(prepared, monkeypatch, fresh_cache):
    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(precision, "step_seconds", lambda *a, **k: pytest.fail("measured"))
    main_read = {"precision": "fp32", "reason": "auto: measured ..."}
    chosen, why = precision.choose_precision(AUTO, *prepared, key="k",
                                             ranks=OneOfTwoProcesses(1, theirs=[], main_cached=main_read))
    assert chosen == "fp32" and "measured earlier" in why
    monkeypatch.setattr(precision, "step_seconds", lambda model, batch, bf16: 0.5 if bf16 else 1.0)
    chosen, _ = precision.choose_precision(AUTO, *prepared, key="k", ranks=OneOfTwoProcesses(1, theirs=[1.0, 0.5]))
    assert chosen == "bf16" and not precision.read_measurements(precision.CACHE)


def test_measuring_leaves_weights_gradients_and_random_state_untouched(prepared):
    model, batch = prepared
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    for bf16 in (False, True):
        assert precision.step_seconds(model, batch, bf16=bf16) > 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_a_run_records_the_measured_choice(tiny_overrides, tmp_path, monkeypatch, fresh_cache):
    from tunelab import api

    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(precision, "step_seconds", lambda model, batch, bf16: 0.5 if bf16 else 1.0)
    record = api.compare(None, [*tiny_overrides, "methods=lora", "train.max_steps=2", "train.precision=auto"],
                         tmp_path / "run",
                         show_progress=False, isolate=False).records[0]
    assert record["precision"] == "bf16" and record["precision_reason"].startswith("auto: measured 2 forward")


def test_a_resumed_run_keeps_the_precision_it_started_with(tiny_overrides, tmp_path, monkeypatch, fresh_cache):
    from tunelab import api

    monkeypatch.setattr(setup, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(precision, "step_seconds", lambda model, batch, bf16: 0.5 if bf16 else 1.0)
    run = [*tiny_overrides, "methods=lora", "train.precision=auto", "train.checkpoint_every_steps=3"]
    monkeypatch.setenv("TUNELAB_FAULT", "interrupt@step=4")
    with pytest.raises(Exception):
        api.compare(None, run, tmp_path / "run", show_progress=False, isolate=False)
    monkeypatch.setenv("TUNELAB_FAULT", "")
    # the machine now measures the other way; the resumed run must still train in bf16
    monkeypatch.setattr(precision, "step_seconds", lambda model, batch, bf16: 2.0 if bf16 else 1.0)
    record = api.compare(None, run, tmp_path / "run", show_progress=False, isolate=False, resume=True).records[0]
    assert record["status"] == "success"
    assert record["precision"] == "bf16" and record["precision_reason"].startswith("resumed")


def test_a_bf16_checkpoint_trains_and_is_estimated_in_fp32_weights(tmp_path, tiny_overrides):
    """Most hub checkpoints are stored in bf16, and transformers 5 keeps a checkpoint's dtype by default: AdamW
    on bf16 weights would drop every update smaller than a weight's rounding step (and be emulated on an AVX2
    CPU). The weights train, and are estimated, in fp32 as from an fp32 checkpoint."""
    from transformers import AutoModel

    from conftest import build_tiny_bert
    from tunelab.estimate import estimate

    fp32_folder = build_tiny_bert(tmp_path / "fp32")
    bf16_folder = build_tiny_bert(tmp_path / "bf16")
    AutoModel.from_pretrained(bf16_folder).to(torch.bfloat16).save_pretrained(bf16_folder)
    assert '"dtype": "bfloat16"' in (bf16_folder / "config.json").read_text()
    rest = [o for o in tiny_overrides if not o.startswith("model.name_or_path=")]
    cfg = load_config(None, [f"model.name_or_path={bf16_folder}", *rest, "methods=full,lora"])
    job = prepare_job(cfg)
    for name in ("full", "lora"):
        model = setup_method(job, name).model
        assert {p.dtype for p in model.parameters()} == {torch.float32}, name
    weights = {folder: {m["method"]: m["weights_mb"] for m in estimate(
        load_config(None, [f"model.name_or_path={folder}", *rest, "methods=full,lora"]), train_rows=160)["methods"]}
        for folder in (fp32_folder, bf16_folder)}
    assert weights[bf16_folder] == weights[fp32_folder]


def test_measuring_runs_the_model_as_the_loop_trains_it_and_restores_its_modes(prepared):
    """A freshly loaded base is in eval mode (dropout off); the probe must time dropout on, as training runs."""
    model, batch = prepared
    model.eval()
    model.training = True  # the mixed state setup hands over: a training wrapper around an eval-mode base
    before = {name: module.training for name, module in model.named_modules()}
    seen = []
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m.training, type(m).__name__))) for m in dropouts]
    precision.step_seconds(model, batch, bf16=False)
    for hook in hooks:
        hook.remove()
    assert dropouts and seen and all(training for training, _ in seen)
    assert {kind for _, kind in seen} == {"CheaperDropout"}
    assert before == {name: module.training for name, module in model.named_modules()}
    assert all(type(m) is torch.nn.Dropout for m in dropouts)
