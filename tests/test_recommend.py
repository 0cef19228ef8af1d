"""`tunelab recommend`: methods that fit first, each with reasons; measured results from the local store win over
rules of thumb; when nothing fits it says what would."""
from __future__ import annotations

import pytest

import tunelab
from tunelab.config import load_config
from tunelab.estimate.recommend import parse_duration_s, parse_size_mb, recommend
from tunelab.estimate.store import similar_results


@pytest.fixture(scope="module")
def llama_7b_shape(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-7b-shape")
    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=4096).save_pretrained(folder)
    return folder


def ranked(folder, memory, *extra, rows=5000):
    # a GPU budget, planned on this machine (which has none): memory as the CUDA allocator counts it
    cfg = load_config(None, ["task=causal-lm", f"model.name_or_path={folder}", "train.batch_size=4",
                             "data.max_length=512", "prompt-tuning.init=random", "train.device=cuda", *extra])
    return recommend(cfg, parse_size_mb(memory), train_examples=rows)


def test_sizes_and_durations_parse():
    assert parse_size_mb("24GB") == 24 * 1024 and parse_size_mb("512MB") == 512 and parse_size_mb("1.5 GiB") == 1536
    assert parse_duration_s("2h") == 7200 and parse_duration_s("90m") == 5400 and parse_duration_s("45min") == 2700
    assert parse_duration_s("2hours") == 7200 and parse_duration_s("3600s") == 3600
    assert parse_size_mb("0.5T") == 512 * 1024 and parse_size_mb("512kb") == 0.5 and parse_duration_s("2d") == 172800
    assert parse_duration_s("1h30m") == 5400 and parse_duration_s("1h 30min 15s") == 5415
    assert parse_duration_s("1e3s") == 1000 and parse_duration_s("1h0m") == 3600
    for bad in ("1h30", "1hx30m", "h30m"):
        with pytest.raises(ValueError, match="1h30m"):
            parse_duration_s(bad)


@pytest.mark.parametrize("memory,budget", [("2", "2h"), ("24GB", "2"), ("lots", "2h"), ("24GB", "soon"),
                                           ("0GB", "2h"), ("GB", "2h")])
def test_a_size_or_duration_without_a_unit_is_refused_naming_the_flag(memory, budget, capsys):
    from tunelab.cli import main

    assert main(["recommend", "--memory", memory, "--time-budget", budget]) == 2
    err = capsys.readouterr().err
    flag = "--memory" if memory in ("2", "lots", "0GB", "GB") else "--time-budget"
    assert err.startswith(f"error: {flag}: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("memory", ["16GB", "24GB", "80GB"])
def test_a_7b_model_gets_adapters_first_and_no_full_fine_tuning(memory, llama_7b_shape):
    result = ranked(llama_7b_shape, memory)
    by_name = {m["method"]: m for m in result["methods"]}
    assert not by_name["full"]["fits"]  # weights + gradients + AdamW alone exceed 80 GB at 7B
    top = result["methods"][0]
    assert top["family"] == "adapter" and top["fits"], [(m["method"], m["reasons"][0]) for m in result["methods"][:3]]
    assert "bitfit" in result["not_applicable"]  # Llama has no biases
    lora = by_name["lora"]
    assert lora["fits"] and lora["gradient_checkpointing"] == (memory != "80GB")  # 7B bf16 weights: 13 GB
    assert lora["train_time_s"] is None  # no GPU here to time
    assert all(any("peak memory" in r for r in m["reasons"]) for m in result["methods"])
    # the rule of thumb is one answer for the job, said once (not a line repeated under every method)
    assert result["rule_of_thumb"]["family_order"][0] == "adapter"
    assert "large model or tight memory" in result["rule_of_thumb"]["reason"]
    assert not any("rule of thumb" in r for m in result["methods"] for r in m["reasons"])


def test_little_data_puts_prompt_methods_first(llama_7b_shape):
    assert ranked(llama_7b_shape, "80GB", rows=200)["methods"][0]["family"] == "prompt"


def test_nothing_fits_says_what_would(llama_7b_shape):
    result = ranked(llama_7b_shape, "2GB")
    assert not any(m["fits"] for m in result["methods"])
    assert any("gradient_accumulation_steps=4" in s for s in result["suggestions"])
    assert any("train.gradient_checkpointing=true" in s for s in result["suggestions"])
    assert any("train.fsdp=true" in s for s in result["suggestions"])
    needs = [min(m["peak_memory_mb"], m["peak_memory_checkpointing_mb"] or m["peak_memory_mb"])
             for m in result["methods"]]
    assert needs == sorted(needs)  # what cannot run goes by the memory it would need, not by measured quality


def test_measured_results_from_compare_rank_first(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_RESULTS_DB", str(tmp_path / "results.db"))  # only this test's comparison
    methods = [*tiny_overrides, "methods=lora,prompt-tuning", "lora.r=4", "lora.lr=1e-2"]
    cfg = load_config(None, [*tiny_overrides, "methods=lora"])
    total = recommend(cfg, 4096.0, train_examples=160)["total_params"]
    tunelab.compare(overrides=[*methods, "train.max_steps=12"], output_dir=tmp_path / "smoke", show_progress=False,
                    isolate=False)
    assert similar_results("classification", total) == []  # 12 steps, 0.6 epochs: a smoke test is not kept
    tunelab.compare(overrides=methods, output_dir=tmp_path / "epoch", show_progress=False, isolate=False)
    result = recommend(cfg, 4096.0, train_examples=160)
    stored = similar_results("classification", result["total_params"])
    assert {"lora", "prompt-tuning"} <= {row["method"] for row in stored}
    measured = [m for m in result["methods"] if any("measured here" in r for r in m["reasons"])]
    assert {m["method"] for m in measured} >= {"lora", "prompt-tuning"}
    assert result["methods"][0]["method"] in {"lora", "prompt-tuning"}  # measured beats unmeasured


def test_a_given_peak_rate_times_a_gpu_that_is_not_here(llama_7b_shape):
    # an H100's dense bf16 peak: 7B LoRA on 5,000 rows of 4 × 512 tokens takes minutes to hours, not nothing
    result = ranked(llama_7b_shape, "80GB")
    timed = recommend(load_config(None, ["task=causal-lm", f"model.name_or_path={llama_7b_shape}",
                                         "train.batch_size=4", "data.max_length=512", "prompt-tuning.init=random",
                                         "train.device=cuda"]), 80 * 1024, 3600, 5000, peak_tflops=989)
    lora = next(m for m in timed["methods"] if m["method"] == "lora")
    assert next(m for m in result["methods"] if m["method"] == "lora")["train_time_s"] is None
    assert 60 < lora["train_time_s"] < 4 * 3600
    assert any("min" in r for r in lora["reasons"])


def test_time_follows_max_steps_and_checkpointing(llama_7b_shape):
    """train.max_steps wins over epochs for the time budget too; a method that fits only with gradient
    checkpointing is timed with the recomputed forwards (4/3 of the compute)."""
    def timed(memory_gb, *extra):
        cfg = load_config(None, ["task=causal-lm", f"model.name_or_path={llama_7b_shape}", "train.batch_size=4",
                                 "data.max_length=512", "prompt-tuning.init=random", "train.device=cuda", *extra])
        methods = recommend(cfg, memory_gb * 1024, 3600, 5000, peak_tflops=989)["methods"]
        return {m["method"]: m for m in methods}

    epoch, ten_steps = timed(80)["lora"], timed(80, "train.max_steps=10")["lora"]
    assert ten_steps["train_time_s"] == pytest.approx(epoch["train_time_s"] * 10 / 1250)  # 5,000 rows / 4
    assert "10 steps" in " ".join(ten_steps["reasons"])
    tight = timed(18)["lora"]  # fits only with checkpointing at 18 GB
    assert tight["gradient_checkpointing"] and tight["train_time_s"] == pytest.approx(epoch["train_time_s"] * 4 / 3)


@pytest.mark.parametrize("command", ["estimate", "recommend"])
@pytest.mark.parametrize("flag, value", [("--peak-tflops", "0"), ("--peak-tflops", "nan"), ("--peak-tflops", "-5"),
                                         ("--train-examples", "0"), ("--train-examples", "-5")])
def test_rates_and_row_counts_must_be_above_zero(command, flag, value, capsys):
    from tunelab.cli import main

    with pytest.raises(SystemExit) as stop:  # 0 and NaN silently meant "not given" or gave NaN times
        main([command, flag, value, *(["--memory", "4GB"] if command == "recommend" else [])])
    assert stop.value.code == 2 and f"argument {flag}: '{value}' is not allowed" in capsys.readouterr().err


def test_under_fsdp_a_method_that_cannot_shard_is_not_recommended(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.fsdp=true"])
    result = recommend(cfg, 2048, train_examples=160)
    assert "adalora" not in {m["method"] for m in result["methods"]}
    assert "cannot train sharded" in result["not_applicable"]["adalora"]


def test_with_checkpointing_a_method_that_cannot_checkpoint_is_not_recommended(tiny_overrides):
    """It ranked prefix tuning first, which `validate` then refused with train.gradient_checkpointing=true."""
    cfg = load_config(None, [*tiny_overrides, "train.gradient_checkpointing=true"])
    result = recommend(cfg, 2048, train_examples=160)
    assert "prefix-tuning" not in {m["method"] for m in result["methods"]}
    assert "cannot train with it" in result["not_applicable"]["prefix-tuning"]


def test_fsdp_in_the_one_process_recommend_plans_is_refused_as_estimate_refuses_it(tiny_overrides):
    import tunelab

    # (it pointed at --nproc, which recommend does not have)
    with pytest.raises(tunelab.TunelabInputError, match=r"train.fsdp: recommend plans for one process; `tunelab "
                                                        r"estimate --nproc N train.fsdp=true`"):
        tunelab.recommend(None, [*tiny_overrides, "train.fsdp=true"], memory="2GB")


def test_an_epoch_is_the_rows_a_run_would_train_on_counted_in_local_data(tiny_bert, toy_data, tmp_path, capsys):
    from tunelab.cli import main
    from tunelab.estimate import estimate

    base = [f"model.name_or_path={tiny_bert}", "data.max_length=32", "train.batch_size=8", "methods=lora",
            "train.precision=fp32"]
    with_validation = load_config(None, [*base, f"data.train_file={toy_data['train']}",
                                         f"data.validation_file={toy_data['validation']}"])
    assert estimate(with_validation)["train_rows"] == 160  # the file's rows, not an unknown epoch
    carved = [*base, f"data.train_file={toy_data['train']}"]  # a tenth held out for validation, as compare does
    assert recommend(load_config(None, carved), 4096.0)["train_examples"] == 144
    assert recommend(load_config(None, [*carved, "data.max_train_samples=100"]), 4096.0)["train_examples"] == 100
    assert recommend(load_config(None, carved), 4096.0, train_examples=7)["train_examples"] == 7
    assert main(["recommend", *carved, "--memory", "4GB"]) == 0
    printed = capsys.readouterr().out
    assert "144 train rows an epoch (counted in data.train_file)" in printed
    assert printed.count("rule of thumb") == 1 and "little data (144 rows)" in printed  # one line for the job
    missing = load_config(None, [*base, f"data.train_file={tmp_path / 'gone.csv'}", "data.max_train_samples=50"])
    result = estimate(missing)
    assert result["train_rows"] == 50 and "could not be counted" in result["train_rows_source"]


def test_a_resumed_experiment_is_stored_once(tmp_path, monkeypatch):
    from tunelab.estimate.store import append_summary

    monkeypatch.setenv("TUNELAB_RESULTS_DB", str(tmp_path / "results.db"))
    record = {"method": "lora", "status": "success", "steps": 500, "total_params": 1000, "peak_memory_mb": 1.0,
              "train_time_s": 2.0}
    payload = {"job": {"task": "classification", "metric_for_best": "accuracy", "metrics": {"accuracy": "higher"}},
               "methods": [record],
               "summary": [{"method": "lora", "n": 1, "metrics": {"accuracy": {"mean": 0.8, "ci95": None}}}]}
    for _ in range(2):  # finished, then --resume'd (which writes the summary again)
        assert append_summary(tmp_path / "exp", payload) == 1
    assert len(similar_results("classification", 1000)) == 1


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny decoder's config.json alone: every method's estimate takes seconds."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=128).save_pretrained(folder)
    return folder


def tiny_gpu_job(folder, *extra):
    return load_config(None, ["task=causal-lm", f"model.name_or_path={folder}", "train.batch_size=4",
                              "data.max_length=100", "prompt-tuning.init=random", "train.device=cuda", *extra])


def lora_of(result) -> dict:
    return next(m for m in result["methods"] if m["method"] == "lora")


def test_a_time_budget_that_cannot_be_checked_is_refused_naming_what_would_allow_it(tiny_llama):
    from tunelab.errors import TunelabInputError

    with pytest.raises(TunelabInputError, match="--time-budget: .* give its peak rate .* with --peak-tflops"):
        recommend(tiny_gpu_job(tiny_llama), 1024, 3600, 5000)  # a GPU not here: nothing to time it on
    hub_data = tiny_gpu_job(tiny_llama, "data.dataset=someone/stories", "data.max_train_samples=null")
    with pytest.raises(TunelabInputError, match="--time-budget: .*rows are unknown.* give --train-examples N"):
        recommend(hub_data, 1024, 3600, peak_tflops=100)  # a hub dataset's rows are not counted
    assert lora_of(recommend(hub_data, 1024))["fits"]  # without a budget, memory alone ranks


def test_checkpointing_is_timed_once_whether_configured_or_needed_to_fit(tiny_llama):
    def lora(memory_mb, *extra):
        return lora_of(recommend(tiny_gpu_job(tiny_llama, *extra), memory_mb, None, 5000, peak_tflops=100))

    plain = lora(1024)
    configured = lora(1024, "train.gradient_checkpointing=true")
    between = (configured["peak_memory_mb"] + configured["peak_memory_checkpointing_mb"]) / 2
    needed = lora(between, "train.gradient_checkpointing=true")  # fits only with it
    assert not configured["gradient_checkpointing"] and needed["gradient_checkpointing"]
    assert configured["train_time_s"] == needed["train_time_s"] == pytest.approx(plain["train_time_s"] * 4 / 3)
    assert all("recomputing for checkpointing" in " ".join(m["reasons"]) for m in (configured, needed))


def test_short_times_read_in_seconds_beside_the_budget(tiny_llama):
    took = lora_of(recommend(tiny_gpu_job(tiny_llama), 1024, None, 5000, peak_tflops=100))["train_time_s"]
    assert took < 1  # 1,250 steps of a tiny model: '0.0 min' said nothing
    over = lora_of(recommend(tiny_gpu_job(tiny_llama), 1024, took / 2, 5000, peak_tflops=100))
    assert not over["fits"]
    assert f"training ≈ {took:.3g} s (1,250 steps" in over["reasons"][1]
    assert over["reasons"][1].endswith(f": over the time budget of {took / 2:.3g} s")
    within = lora_of(recommend(tiny_gpu_job(tiny_llama), 1024, 5400, 5000, peak_tflops=100))
    assert within["fits"] and within["reasons"][1].endswith(": within the time budget of 90.0 min")


def test_methods_that_fit_in_memory_but_not_in_time_are_told_apart_and_get_time_advice(tiny_llama):
    """They were "does not fit" beside "fits" in memory, ranked by memory, and advised gradient checkpointing and
    accumulation, which only make a run slower."""
    result = recommend(tiny_gpu_job(tiny_llama), 1024, 1e-6, 5000, peak_tflops=100)  # (every method is ranked)
    assert {m["verdict"] for m in result["methods"]} == {"over the time budget"}
    times = [m["train_time_s"] for m in result["methods"]]
    assert times == sorted(times)  # the quickest first
    ideas = " ".join(result["suggestions"])
    assert "the quickest method that fits in memory" in ideas and "fewer steps" in ideas
    assert "gradient_checkpointing=true" not in ideas and "accumulation" not in ideas
    tight = recommend(tiny_gpu_job(tiny_llama), 0.5, None, 5000, peak_tflops=100)
    assert {m["verdict"] for m in tight["methods"]} == {"does not fit in memory"}
    assert "the lightest method" in " ".join(tight["suggestions"])


def test_measured_results_are_compared_on_the_jobs_metric_only(tiny_overrides, tmp_path, monkeypatch):
    """Stored accuracies and losses are not one scale: a job ranked by accuracy reads the accuracies alone."""
    from tunelab.estimate.store import append_summary

    monkeypatch.setenv("TUNELAB_RESULTS_DB", str(tmp_path / "results.db"))
    cfg = load_config(None, [*tiny_overrides, "methods=lora"])
    total = recommend(cfg, 4096.0, train_examples=160)["total_params"]

    def stored(experiment, metric, direction, means):
        records = [{"method": m, "status": "success", "steps": 500, "total_params": total} for m in means]
        summary = [{"method": m, "n": 1, "metrics": {metric: {"mean": v}}} for m, v in means.items()]
        job = {"task": "classification", "metric_for_best": metric, "metrics": {metric: direction}}
        append_summary(tmp_path / experiment, {"job": job, "methods": records, "summary": summary})

    stored("by-accuracy", "accuracy", "higher", {"lora": 0.70, "prompt-tuning": 0.90})
    stored("by-loss", "loss", "lower", {"full": 0.05, "lora": 0.01})
    methods = {m["method"]: m for m in recommend(cfg, 4096.0, train_examples=160)["methods"]}
    measured = {name for name, m in methods.items() if any("measured here" in r for r in m["reasons"])}
    assert measured == {"lora", "prompt-tuning"}
    assert any("by accuracy (the job's metric_for_best): 0.700" in r for r in methods["lora"]["reasons"])
    assert methods["prompt-tuning"]["rank"] < methods["lora"]["rank"] < methods["full"]["rank"]


def test_methods_are_scored_within_the_comparisons_they_were_in(tiny_overrides, tmp_path, monkeypatch):
    """An easy dataset's accuracies beat a hard one's: scored on one scale, adalora measured alone on easy data
    ranked above lora and full, which beat it on the hard data where all three ran."""
    from tunelab.estimate.store import append_summary

    monkeypatch.setenv("TUNELAB_RESULTS_DB", str(tmp_path / "results.db"))
    cfg = load_config(None, [*tiny_overrides, "methods=lora"])
    total = recommend(cfg, 4096.0, train_examples=160)["total_params"]

    def stored(experiment, means):
        records = [{"method": m, "status": "success", "steps": 500, "total_params": total} for m in means]
        summary = [{"method": m, "n": 1, "metrics": {"accuracy": {"mean": v}}} for m, v in means.items()]
        job = {"task": "classification", "metric_for_best": "accuracy", "metrics": {"accuracy": "higher"}}
        append_summary(tmp_path / experiment, {"job": job, "methods": records, "summary": summary})

    stored("hard", {"full": 0.62, "lora": 0.60, "adalora": 0.55})
    stored("easy", {"adalora": 0.97, "ia3": 0.96})
    methods = {m["method"]: m for m in recommend(cfg, 4096.0, train_examples=160)["methods"]}
    assert methods["full"]["rank"] < methods["lora"]["rank"] < methods["adalora"]["rank"]
    assert any("placed 0.50 between the worst (0) and the best (1)" in r and "over 2 stored" in r
               for r in methods["adalora"]["reasons"])


def test_nothing_fits_suggests_only_what_would_change_the_job(tiny_llama):
    settled = tiny_gpu_job(tiny_llama, "train.gradient_accumulation_steps=4", "train.gradient_checkpointing=true",
                           "lora.r=1")  # one row per forward, checkpointing on, the lowest rank; auto: bf16
    ideas = " ".join(recommend(settled, 0.1)["suggestions"])
    for in_effect in ("gradient_accumulation_steps", "train.precision=bf16", "gradient_checkpointing=true",
                      "lora.r="):
        assert in_effect not in ideas, ideas
    ideas = " ".join(recommend(tiny_gpu_job(tiny_llama, "train.gradient_accumulation_steps=2",
                                            "train.precision=fp32"), 0.1)["suggestions"])
    assert "train.gradient_accumulation_steps=4" in ideas and "1 row(s) each instead of 2" in ideas
    assert "train.precision=bf16" in ideas and "lora.r=4" in ideas


def test_where_the_process_alone_is_over_the_budget_no_setting_is_suggested(tiny_overrides):
    """At 50 MB a training process here is larger than the budget before its first tensor: checkpointing,
    accumulation, bf16 or a lower rank were still suggested."""
    cfg = load_config(None, tiny_overrides)
    ideas = recommend(cfg, 50, train_examples=160)["suggestions"]
    assert len(ideas) == 2 and "no setting of the job fits; this needs more memory" in ideas[1], ideas
