"""`tunelab estimate` from a config alone: exact parameter counts per method, memory parts that follow the
method's structure, a config-only folder as the model."""
from __future__ import annotations

import json

import pytest

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.estimate import estimate

from conftest import fake_hub


@pytest.fixture(scope="module")
def roberta_base_config(tmp_path_factory):
    """A folder with only a RoBERTa-base-shaped config.json: no weights, no tokenizer."""
    from transformers import RobertaConfig

    folder = tmp_path_factory.mktemp("roberta-base-shape")
    RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1).save_pretrained(folder)
    return folder


def estimated(folder, *overrides, nproc: int = 1):
    cfg = load_config(None, [f"model.name_or_path={folder}", "data.max_length=128", "train.batch_size=16",
                             "train.precision=fp32", *overrides])
    return {m["method"]: m for m in estimate(cfg, train_rows=1000, nproc=nproc)["methods"]}


def test_lora_r8_on_query_and_value_adds_the_lora_papers_294912(roberta_base_config):
    lora = estimated(roberta_base_config, "methods=lora,full", "lora.r=8")["lora"]
    assert lora["added_params"] == 12 * 2 * 8 * (768 + 768) == 294_912
    full = estimated(roberta_base_config, "methods=full")["full"]
    assert full["trainable_params"] == full["total_params"] > 124_000_000
    # every parameter of the prepared model, as compare counts them: peft's trainable copy of the head too
    head = 768 * 768 + 768 + 768 * 2 + 2  # RoBERTa's classifier: dense and out_proj
    assert lora["total_params"] == full["total_params"] + 294_912 + head


def test_memory_parts_follow_what_trains(roberta_base_config):
    methods = estimated(roberta_base_config, "methods=full,lora,freeze", "freeze.k=2")
    full, lora, freeze = methods["full"], methods["lora"], methods["freeze"]
    assert full["optimizer_mb"] == pytest.approx(2 * full["weights_mb"], rel=1e-3)  # every weight trains, fp32
    assert lora["optimizer_mb"] < 0.01 * full["optimizer_mb"]
    # identical blocks: measured at 3 and 4 of them; freeze's trainable top blocks differ from the others
    assert full["memory_from"] == lora["memory_from"] == "fake steps of 3 and 4 blocks, extrapolated to 12 identical ones"
    assert freeze["memory_from"] == "fake step"
    assert freeze["activations_mb"] < lora["activations_mb"] < full["activations_mb"]  # 2 of 12 blocks keep any
    for m in methods.values():
        parts = sum(m[k] for k in ("weights_mb", "gradients_mb", "optimizer_mb", "activations_mb",
                                   "allocator_kept_mb", "runtime_overhead_mb"))
        assert m["peak_memory_mb"] == pytest.approx(parts, abs=0.5)
    # recomputing blocks pays where the gradient passes through them all; freeze's frozen bottom keeps none
    assert full["peak_memory_checkpointing_mb"] < full["peak_memory_mb"]
    assert lora["peak_memory_checkpointing_mb"] < lora["peak_memory_mb"]
    # the heap keeps what the plain step churns: the recomputed blocks allocate their activations again
    assert full["allocator_kept_checkpointing_mb"] == full["allocator_kept_mb"] > 0
    assert lora["allocator_kept_checkpointing_mb"] == lora["allocator_kept_mb"] > 0


def test_processes_split_the_batch_and_fsdp_splits_the_training_state(roberta_base_config, capsys):
    """One process's memory of N: its micro-batch's activations; under FSDP half the weights, gradients and
    optimizer state plus what is gathered whole; DDP's buckets copy the gradients."""
    import torch

    same_profile = f"train.threads={torch.get_num_threads()}"  # this machine's, measured once per session
    one = estimated(roberta_base_config, "methods=full", same_profile)["full"]
    accumulating = estimated(roberta_base_config, "methods=full", same_profile,
                             "train.gradient_accumulation_steps=2")["full"]
    ddp = estimated(roberta_base_config, "methods=full", same_profile, nproc=2)["full"]
    fsdp = estimated(roberta_base_config, "methods=full", same_profile, "train.fsdp=true", nproc=2)["full"]
    assert accumulating["activations_mb"] == pytest.approx(one["activations_mb"] / 2, rel=0.05)
    assert ddp["activations_mb"] == fsdp["activations_mb"] == accumulating["activations_mb"]
    assert ddp["optimizer_mb"] == one["optimizer_mb"] and fsdp["optimizer_mb"] == pytest.approx(one["optimizer_mb"] / 2)
    assert ddp["collective_buffers_mb"] == pytest.approx(one["weights_mb"], rel=0.01)  # every weight trains, fp32
    assert one["weights_mb"] / 2 < fsdp["weights_mb"] < one["weights_mb"]  # the embeddings (root group) stay whole
    assert fsdp["peak_memory_mb"] < ddp["peak_memory_mb"] < one["peak_memory_mb"]
    assert main(["estimate", f"model.name_or_path={roberta_base_config}", "train.fsdp=true"]) == 2
    assert "train.fsdp: needs several processes" in capsys.readouterr().err


def test_the_cli_prints_one_json_object_with_a_methods_list(roberta_base_config, capsys):
    assert main(["estimate", f"model.name_or_path={roberta_base_config}", "methods=lora,prompt-tuning",
                 "prompt-tuning.init=random", "train.precision=fp32", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [m["method"] for m in payload["methods"]] == ["lora", "prompt-tuning"]
    for key in ("total_params", "trainable_params", "added_params", "weights_mb", "gradients_mb", "optimizer_mb",
                "activations_mb", "peak_memory_mb", "train_flops_per_step", "step_time_s"):
        assert key in payload["methods"][0]


def test_the_runtime_overhead_is_the_childs_own_not_its_parents():
    # Linux hands a child its parent's ru_maxrss across fork and exec; a big parent (a test run, a notebook)
    # must not inflate the measured overhead
    from tunelab.estimate.device import runtime_overhead_mb

    ballast = bytearray(1536 * 2**20)
    try:
        assert 100 < runtime_overhead_mb("cpu") < 1200
    finally:
        del ballast


def test_a_model_that_cannot_run_on_fake_tensors_falls_back_to_the_formula(roberta_base_config, monkeypatch):
    from tunelab.estimate import fake_step

    def no_fake_kernel(*args, **kwargs):
        raise NotImplementedError("aten::custom_op has no fake implementation")

    monkeypatch.setattr(fake_step, "measure_step", no_fake_kernel)
    lora = estimated(roberta_base_config, "methods=lora")["lora"]
    assert lora["memory_from"].startswith("formula (the fake step failed: NotImplementedError")
    assert lora["activations_mb"] > 0 and lora["peak_memory_mb"] > lora["weights_mb"]
    assert lora["peak_memory_checkpointing_mb"] is None and "did not run" in lora["checkpointing_note"]


def test_methods_that_do_not_fit_the_model_are_refused_before_any_is_estimated(tmp_path, monkeypatch):
    """BitFit on Llama stopped the estimate only when its turn came, after the methods before it (22 s)."""
    from tunelab import TunelabInputError
    from tunelab.estimate import fake_step

    steps = []
    monkeypatch.setattr(fake_step, "measure_step", lambda *args, **kwargs: steps.append(args))
    with pytest.raises(TunelabInputError, match="bitfit: model type 'llama' has no bias"):
        estimated(tiny_llama_config(tmp_path), "methods=lora,bitfit", "data.max_length=32")
    assert steps == []  # (a failing fake step falls back to a formula: counted, not raised)


def test_the_table_says_why_a_checkpointed_peak_is_missing(tmp_path, capsys):
    """Prefix tuning cannot checkpoint: its fake step failed with a shape error shown as the reason, and the
    printed table showed an unexplained dash."""
    from tunelab.cli import main

    assert main(["estimate", f"model.name_or_path={tiny_llama_config(tmp_path)}", "data.max_length=32",
                 "methods=prefix-tuning", "train.precision=auto"]) == 0
    out = capsys.readouterr().out
    assert "prefix-tuning, peak (ckpt): cannot train with it: transformers turns the key/value cache off" in out
    assert "note: train.precision=auto: estimated in" in out  # a run decides per method


def test_a_text_initialised_prompt_is_estimated_without_a_tokenizer(tmp_path):
    """A config-only decoder folder: peft would load a tokenizer to embed the init text; the skeleton needs
    only the prompt's shape, which is the same for a random start."""
    tiny_llama_config(tmp_path)
    methods = estimated(tmp_path, "methods=prompt-tuning,lora", "prompt-tuning.init=text",
                        "prompt-tuning.num_virtual_tokens=5", "data.max_length=32")
    assert methods["prompt-tuning"]["added_params"] == 5 * 32


def tiny_llama_config(folder):
    """A folder with a tiny decoder's config.json alone."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(folder)
    return folder


def test_a_hub_model_is_fetched_as_its_config_json_alone(tmp_path, monkeypatch):
    """An estimate reads the config alone: a 7B model's 13 GB of weights (or its tokenizer) are not fetched."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    fetched = []
    fake_hub(monkeypatch, tiny_llama_config(tmp_path / "snapshot"), fetched)
    methods = estimated("someone/llama", "methods=lora", "data.max_length=32")
    assert fetched == [("someone/llama", None, ["config.json"])]
    assert methods["lora"]["added_params"] > 0


def test_a_snapshot_holding_only_the_config_serves_estimates_not_runs(tmp_path, monkeypatch):
    """What an estimate fetched stays in the Hugging Face cache: offline, another estimate uses it; a run
    needs the weights, so it is told they are missing offline, and online fetches them."""
    import huggingface_hub

    from tunelab.errors import TunelabInputError
    from tunelab.models import hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--llama"
    snapshot = tiny_llama_config(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert estimate(load_config(None, ["model.name_or_path=someone/llama", "methods=lora", "data.max_length=32",
                                       "train.batch_size=4"]), train_rows=100)["model_path"] == str(snapshot.resolve())
    with pytest.raises(TunelabInputError, match="is in the local Hugging Face cache without its weights"):
        hub.hub_model_path("someone/llama", None)
    fetched = []
    fake_hub(monkeypatch, snapshot, fetched)
    hub.hub_model_path("someone/llama", None)
    (_, _, patterns), = fetched
    assert "model*.safetensors" in patterns and "*.json" in patterns


def test_a_decoder_classifier_without_a_pad_id_is_traced_as_training_prepares_it(tmp_path):
    """Llama-shaped configs name no pad token; training sets one before the first batch, the estimate did not,
    so its fake step failed ("Cannot handle batch sizes > 1 if no padding token") and a formula stood in,
    too low and without a checkpointed peak."""
    lora = estimated(tiny_llama_config(tmp_path), "methods=lora", "data.max_length=32")["lora"]
    assert not lora["memory_from"].startswith("formula"), lora["memory_from"]
    assert lora["peak_memory_checkpointing_mb"] is not None


def test_a_model_the_task_cannot_build_and_a_length_past_its_positions_are_refused(tmp_path):
    from transformers import ViTConfig

    from tunelab import TunelabInputError

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(TunelabInputError, match="could not build a model from .* for task 'classification'"):
        estimated(tmp_path / "vit", "methods=lora")
    with pytest.raises(TunelabInputError, match=r"data.max_length: 100 is more than the model supports; allowed: 1..64"):
        estimated(tiny_llama_config(tmp_path / "llama"), "methods=lora", "data.max_length=100")
    # within the positions, but not with the virtual tokens: refused as validate refuses it, not ranked
    with pytest.raises(TunelabInputError, match="prompt-tuning: data.max_length 60 \\+ 20 virtual tokens exceeds"):
        estimated(tmp_path / "llama", "methods=lora,prompt-tuning", "data.max_length=60")


def test_the_table_shows_counts_whole_and_measured_values_to_four_digits(capsys):
    """A step time was printed as 4,995.4035, and --train-examples 2.5 was "not a int"."""
    from tunelab.cli import cell

    assert [cell(v) for v in (6738415616, 4995.4035, 0.012345, 123456.7, None)] == \
        ["6,738,415,616", "4,995", "0.01235", "123,457", "—"]
    with pytest.raises(SystemExit):
        main(["estimate", "--train-examples", "2.5"])
    assert "'2.5' is not a whole number" in capsys.readouterr().err


def test_a_gpu_not_here_is_named_as_timed_once_its_peak_rate_is_given():
    """The header said "memory only" next to the times --peak-tflops gave."""
    from tunelab.estimate import with_peak
    from tunelab.estimate.device import absent_gpu_profile

    absent = absent_gpu_profile("bf16")
    assert "memory only" in absent["name"] and with_peak(absent, 989)["effective_flops"] > 0
    assert with_peak(absent, 989)["name"] == "a CUDA device (not on this machine: timed at the given --peak-tflops)"
    here = {**absent, "present": True, "name": "this CPU"}
    assert with_peak(here, 1.0)["name"] == "this CPU"
